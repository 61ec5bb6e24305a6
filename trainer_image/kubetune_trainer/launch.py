"""The training container's entrypoint: torchrun, exiting with the worker's own exit code.

    python -m kubetune_trainer.launch --module kubetune_trainer --config /etc/kubetune/job/config.json

Why (torchrun exits 1 for any failure, which `restartPolicy: ExitCode` cannot tell apart) and how the
workers' thread count is chosen (not torchrun's 1 for every process): docs/trainer.md.
"""

from __future__ import annotations

import sys

from kubetune.api import jobconfig
from kubetune.logs import configure_logging

from .threads import set_launcher_threads


def exit_code_of(worker_code: int) -> int:
    """A worker's exit code as the container's: negative codes (killed by signal N) become 128 + N."""
    if worker_code < 0:
        return 128 + (-worker_code)
    return worker_code or jobconfig.EXIT_FAILED  # a failure without a code is still a failure


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args(sys.argv[1:] if argv is None else argv)
    configure_logging(False)
    set_launcher_threads(torchrun.determine_local_world_size(args.nproc_per_node))
    try:
        torchrun.run(args)
    except ChildFailedError as exc:
        _, failure = exc.get_first_failure()
        return exit_code_of(failure.exitcode)
    except SignalException as exc:  # the agent itself was signalled: the workers were stopped with it
        return 128 + int(exc.sigval)
    return jobconfig.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

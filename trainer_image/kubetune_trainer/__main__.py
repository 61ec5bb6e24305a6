"""`torchrun --module kubetune_trainer --config /etc/kubetune/job/config.json`

Exit codes are the contract with the PyTorchJob's `restartPolicy: ExitCode` (kubetune.api.jobconfig):
0 done, 2 bad input (never retried), 1 a failure no retry fixes (NaN loss, a bug), 143 retryable
(storage or network unavailable, preemption).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

from kubetune.api import jobconfig
from kubetune.logs import configure_logging

from .failures import is_retryable

log = logging.getLogger("kubetune_trainer")


def _report_failure(config: jobconfig.JobConfig, reason: str, message: str, findings: list | None = None) -> None:
    """Leave the reason (and the dataset policy's findings) where the operator and `kubetune local` look
    (progress.json)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    try:
        from . import storage

        store = storage.output_store_from_env(config.spec)
        writer = storage.ProgressWriter(store, config.storage.job_prefix, enabled=True)
        failure = {"reason": reason, "message": message[:4000]}
        if findings:
            failure["findings"] = findings
        writer.update(force=True, stage="failed", failure=failure)
    except Exception:  # the exit code still tells the story
        log.exception("could not record the failure in progress.json")


def default_work_dir(config: jobconfig.JobConfig, temp: Path) -> Path:
    """One directory for every process of the pod (torchrun's workers share the pod's temp dir): local
    rank 0 downloads into it what the others then read. Named by job and stage, never per process."""
    return temp / f"kubetune-{config.job.uid}-{config.stage.kind}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubetune_trainer", description=__doc__)
    parser.add_argument("--config", default=jobconfig.CONFIG_PATH, help="job config JSON (kubetune.api.jobconfig)")
    parser.add_argument("--work-dir", default=os.environ.get("KUBETUNE_WORK_DIR"),
                        help="local scratch for model cache and checkpoints, shared by the pod's processes "
                             "(default: $KUBETUNE_WORK_DIR, else one per job and stage under the temp dir)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    # SIGTERM (preemption, pod deletion) exits with the retryable code; the last checkpoint resumes it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(jobconfig.EXIT_RETRYABLE))
    try:
        config = jobconfig.JobConfig.from_json(Path(args.config).read_text())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.error("cannot read the job config", extra={"path": args.config, "error": str(exc)})
        return jobconfig.EXIT_BAD_INPUT
    work_dir = Path(args.work_dir) if args.work_dir else default_work_dir(config, Path(tempfile.gettempdir()))
    work_dir.mkdir(parents=True, exist_ok=True)

    from .errors import BadInput

    halted: tuple = ()  # the data stage trains nothing, so nothing halts it
    if config.stage.kind == jobconfig.STAGE_DATA:
        from .data_stage import run  # no torch, no weights: the CPU pod before any GPU
    else:
        from . import train  # torch is imported here, after the cheap checks
        from .threads import set_worker_threads

        set_worker_threads()
        run, halted = train.run, train.TrainingHalted
    try:
        document = run(config, work_dir=work_dir)
    except BadInput as exc:
        log.error("bad input: nothing was trained", extra={"reason": "BadInput", "error": str(exc)})
        _report_failure(config, "BadInput", str(exc), exc.findings)
        return jobconfig.EXIT_BAD_INPUT
    except halted as exc:
        log.error("training halted", extra={"reason": exc.reason, "error": str(exc)})
        _report_failure(config, exc.reason, str(exc))
        return jobconfig.EXIT_FAILED
    except Exception as exc:
        if is_retryable(exc):
            log.exception("retryable failure", extra={"reason": "Retryable"})
            return jobconfig.EXIT_RETRYABLE
        log.exception("training failed", extra={"reason": "TrainingFailed"})
        _report_failure(config, "TrainingFailed", f"{type(exc).__name__}: {exc}")
        return jobconfig.EXIT_FAILED
    if document and config.stage.kind == jobconfig.STAGE_DATA:
        print(json.dumps({"stage": config.stage.kind, "result": config.storage.result_uri, "data": document["data"]}))
    elif document and config.stage.kind != jobconfig.STAGE_TRAIN:
        print(json.dumps({"stage": config.stage.kind, "result": config.storage.result_uri,
                          "metrics": document.get("metrics")}))
    elif document:
        print(json.dumps({"published": config.storage.manifest_uri, "digest": document["digest"],
                          "metrics": document.get("metrics"), "baselineMetrics": document.get("baselineMetrics")}))
    return jobconfig.EXIT_OK


def exit_without_teardown(code: int) -> None:
    """End the process with `code` once every log line and printed result is flushed, skipping the
    interpreter's teardown.

    Why: under torchrun with several ranks, a rank sometimes aborted after `main` returned ("terminate
    called without an active exception", SIGABRT; 4 of about 70 runs of the 2-process ZeRO-3 test on
    CPU/gloo). A core dump shows the cause: during `Py_FinalizeEx`, a gloo worker thread
    (`ProcessGroupGloo::runLoop`) drops its last reference to the final barrier's work, which holds
    ZeRO-3's earlier all-gather and its tensors; freeing a tensor's Python object takes the GIL, which a
    finalizing interpreter answers with `pthread_exit`, and the forced unwind through a noexcept
    destructor calls std::terminate (pytorch/pytorch#179291 describes the same race). The process
    group object outlives `destroy_process_group` while DeepSpeed still references it, so destroying it
    cannot prevent this. The launcher would turn the abort into exit 134, which `restartPolicy: ExitCode`
    retries: a finished, published job would train again.

    Skipping teardown loses nothing: the manifest is written last, the tracker is finished, the
    checkpoint upload thread joined and the process group destroyed in `train.run`, and files are closed
    by `with`.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe: nothing more can be said
            stream.flush()
    os._exit(code)


def _entrypoint() -> None:
    try:
        code = main()
    except SystemExit as exc:  # SIGTERM's handler (retryable), argparse's --help and usage errors
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else jobconfig.EXIT_FAILED)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    exit_without_teardown(code)


if __name__ == "__main__":
    _entrypoint()

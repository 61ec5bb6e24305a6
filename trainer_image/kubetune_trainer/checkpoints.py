"""What a resumed run needs: the trainer state, and checkpoints in the output store."""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kubetune.api import storage_layout

from . import distributed, storage

if TYPE_CHECKING:
    from .train import TrainingRun

log = logging.getLogger(__name__)


@dataclass
class TrainerState:
    """Everything besides tensors that a resumed run needs (saved in every checkpoint)."""

    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0  # next micro-batch of `epoch` (data position)
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    plateau_evals: int = 0
    trainable_blocks: int | None = None
    baseline: dict = field(default_factory=dict)
    history: list = field(default_factory=list)  # [{step, trainLoss | eval metrics}]
    padding_tokens: int = 0
    real_tokens: int = 0
    train_seconds: float = 0.0  # optimizer steps only (no evaluation, checkpointing or loading)


# Files that belong to one rank: DeepSpeed's ZeRO shards and the RNG states (ours and DeepSpeed's).
_RANK_FILE = re.compile(r"(?:zero_pp_rank_|rng_state_rank|rng-rank)(\d+)_?")


def pod_ranks(dist) -> range:
    """The global ranks of this pod's processes (torchrun numbers a node's ranks contiguously)."""
    first = dist.rank - dist.local_rank
    return range(first, first + dist.local_world_size)


def needed_by(relative_path: str, ranks: range) -> bool:
    """Whether a pod running `ranks` needs this checkpoint file: shared files always, a rank's own
    files only for its ranks (a pod of an 8-node ZeRO-3 job fetches an eighth of the optimizer)."""
    match = _RANK_FILE.search(relative_path.rsplit("/", 1)[-1])
    return match is None or int(match.group(1)) in ranks


def resume(run: TrainingRun) -> TrainerState | None:
    """The latest checkpoint's state, loaded into the run's model and optimizer; None when there is none.

    Each pod's local rank 0 downloads what its ranks need while the others wait; a failed download is
    shared through a collective, so every rank fails alike instead of waiting in a barrier."""
    pointer = storage.latest_checkpoint(run.store, run.prefix)
    if pointer is None:
        return None
    local = run.work_dir / "resume" / f"step-{pointer['step']}"
    error: Exception | None = None
    if run.dist.local_rank == 0:
        try:
            count = _download_checkpoint(run, pointer["path"], local)
            log.info("downloaded checkpoint", extra={"step": pointer["step"], "files": count})
        except Exception as exc:  # raised below, after every rank has learned of it
            error = exc
    failed = distributed.all_reduce_mean(1.0 if error else 0.0)
    if error is not None:
        raise error
    if failed:
        raise ConnectionError(f"checkpoint {pointer['path']} could not be downloaded on another pod (see its log)")
    return run.runner.load(local)


def _download_checkpoint(run: TrainingRun, prefix: str, local: Path) -> int:
    if local.exists():  # a partial download of an earlier attempt in the same pod
        shutil.rmtree(local)
    ranks = pod_ranks(run.dist)
    objects = [uri for uri in run.store.list(prefix) if needed_by(uri[len(prefix):], ranks)]
    if not objects:
        raise FileNotFoundError(f"checkpoint {prefix}: no files there")
    for uri in objects:
        run.store.download_file(uri, local / uri[len(prefix):])
    return len(objects)


def save_checkpoint(run: TrainingRun) -> None:
    state, dist = run.state, run.dist
    local = run.work_dir / "checkpoints" / f"step-{state.step}"
    run.runner.save(local, state)
    distributed.barrier()
    if dist.local_rank == 0:  # one uploader per pod; each pod holds its own ranks' shards
        count = storage.upload_dir(run.store, local, storage_layout.checkpoint_prefix(run.prefix, state.step))
        log.info("checkpoint uploaded", extra={"step": state.step, "files": count})
    distributed.barrier()
    if dist.local_rank == 0:  # uploaded: the pod's volume keeps no checkpoint copies
        shutil.rmtree(local, ignore_errors=True)
    if dist.is_main:
        storage.mark_latest_checkpoint(run.store, run.prefix, state.step)

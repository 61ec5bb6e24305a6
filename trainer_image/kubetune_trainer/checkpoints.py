"""What a resumed run needs: the trainer state, and checkpoints in the output store."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
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


def resume(run: TrainingRun) -> TrainerState | None:
    """The latest checkpoint's state, loaded into the run's model and optimizer; None when there is none."""
    pointer = storage.latest_checkpoint(run.store, run.prefix)
    if pointer is None:
        return None
    local = run.work_dir / "resume" / f"step-{pointer['step']}"
    if run.dist.local_rank == 0:
        count = storage.download_prefix(run.store, pointer["path"], local)
        log.info("downloaded checkpoint", extra={"step": pointer["step"], "files": count})
    distributed.barrier()
    return run.runner.load(local)


def save_checkpoint(run: TrainingRun) -> None:
    state, dist = run.state, run.dist
    local = run.work_dir / "checkpoints" / f"step-{state.step}"
    run.runner.save(local, state)
    distributed.barrier()
    if dist.local_rank == 0:  # one uploader per pod; each pod holds its own ranks' shards
        count = storage.upload_dir(run.store, local, storage_layout.checkpoint_prefix(run.prefix, state.step))
        log.info("checkpoint uploaded", extra={"step": state.step, "files": count})
    distributed.barrier()
    if dist.is_main:
        storage.mark_latest_checkpoint(run.store, run.prefix, state.step)

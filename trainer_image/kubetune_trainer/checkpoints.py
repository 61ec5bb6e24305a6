"""What a resumed run needs: the trainer state, and checkpoints in the output store (written and
uploaded on one background thread: docs/trainer.md, Checkpoints)."""

from __future__ import annotations

import copy
import logging
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

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


# Files that belong to one rank: DeepSpeed's ZeRO shards, the RNG states (ours and DeepSpeed's) and the
# rank's share of early stopping's best weights.
_RANK_FILE = re.compile(r"(?:zero_pp_rank_|rng_state_rank|rng-rank|best_rank)(\d+)_?")


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


class CheckpointUploads:
    """At most one checkpoint write + upload in flight, on a background thread of the pod's uploader
    (local rank 0). A next checkpoint waits for the previous one rather than skip it, so `checkpointSteps`
    stays the most work a lost pod can cost; an error is kept for the training thread to raise."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.unmarked_step: int | None = None  # uploaded on every pod (once settled), not yet marked latest

    def start(self, step: int, work: Callable[[], None]) -> None:
        if self._thread is not None:
            raise RuntimeError("a checkpoint upload is still in flight: wait() for it first")
        self._error = None
        self._thread = threading.Thread(target=self._run, args=(work,), name=f"checkpoint-{step}", daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as exc:  # raised on the training thread by wait()'s caller
            self._error = exc

    def wait(self) -> BaseException | None:
        """Block until the in-flight upload (if any) ends; its error, or None."""
        if self._thread is None:
            return None
        self._thread.join()
        self._thread, error, self._error = None, self._error, None
        return error


def cpu_snapshot(value):
    """A copy of `value` whose tensors are CPU copies: training goes on updating the live ones (the
    optimizer steps in place) while the background thread writes this one."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: cpu_snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cpu_snapshot(v) for v in value)
    return copy.deepcopy(value)


def single_pod(dist) -> bool:
    return dist.world_size == dist.local_world_size


def save_checkpoint(run: TrainingRun) -> None:
    """Snapshot this step's checkpoint on the training thread (DeepSpeed's save, a collective under ZeRO-3,
    writes its files here), then write and upload it on the pod's background thread. The latest-checkpoint
    pointer is written only after every file is uploaded: by the upload thread of a one-pod job, else by
    the next `settle_uploads` (agreeing that every pod finished is a collective, kept on this thread)."""
    state, dist = run.state, run.dist
    settle_uploads(run)
    local = run.work_dir / "checkpoints" / f"step-{state.step}"
    deferred = run.runner.save(local, state)
    distributed.barrier()  # every rank's files are on the pod's disk before its uploader reads them
    step = state.step
    if dist.local_rank == 0:  # one uploader per pod; each pod holds its own ranks' shards
        mark = dist.is_main and single_pod(dist)
        run.uploads.start(step, lambda: _write_and_upload(run, local, step, deferred, mark=mark))
    if not single_pod(dist):
        run.uploads.unmarked_step = step


def _write_and_upload(run: TrainingRun, local: Path, step: int, deferred: dict, *, mark: bool) -> None:
    started = time.monotonic()
    for name, blob in deferred.items():
        torch.save(blob, local / name)
    count = storage.upload_dir(run.store, local, storage_layout.checkpoint_prefix(run.prefix, step))
    shutil.rmtree(local, ignore_errors=True)  # uploaded: the pod's volume keeps no checkpoint copies
    if mark:
        storage.mark_latest_checkpoint(run.store, run.prefix, step)
    log.info("checkpoint uploaded", extra={"step": step, "files": count,
                                           "seconds": round(time.monotonic() - started, 3)})


def settle_uploads(run: TrainingRun) -> None:
    """Every rank, at the same point: wait for the pod's in-flight upload, fail every rank alike if any
    pod's failed (the run fails as a synchronous upload did: the store client already retried), and on a
    multi-pod job mark the checkpoint that every pod has now uploaded."""
    started = time.monotonic()
    error = run.uploads.wait()
    waited = time.monotonic() - started
    if waited > 0.5:
        log.info("waited for the previous checkpoint upload", extra={"seconds": round(waited, 3)})
    failed = distributed.all_reduce_mean(1.0 if error else 0.0)
    if error is not None:
        raise error
    if failed:
        raise ConnectionError("a checkpoint upload failed on another pod (see its log)")
    step, run.uploads.unmarked_step = run.uploads.unmarked_step, None
    if step is not None and run.dist.is_main:
        storage.mark_latest_checkpoint(run.store, run.prefix, step)


def abandon_uploads(run: TrainingRun) -> None:
    """On a failure path: let the in-flight upload finish (a retry may resume from it; its pointer is
    written only if complete) without collectives, which a failing peer might never join."""
    error = run.uploads.wait()
    if error is not None:
        log.warning("checkpoint upload failed", extra={"error": repr(error)})

"""Checkpoints written and uploaded in the background: a snapshot training cannot change, a pointer only
to a whole upload, and an upload failure raised on the training thread (the run fails, as it did when
the upload was synchronous: the store client has already retried)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kubetune.api import storage_layout
from kubetune.clients.storage import ObjectStore
from kubetune_trainer import checkpoints, distributed
from kubetune_trainer.checkpoints import CheckpointUploads, TrainerState
from kubetune_trainer.step_runner import StepRunner

ONE_PROCESS = distributed.DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, backend="gloo",
                                   device=torch.device("cpu"))


def _run(tmp_path: Path, job_prefix: str) -> SimpleNamespace:
    """What save_checkpoint reads of a TrainingRun, with a real StepRunner on a one-layer model."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    runner = StepRunner(model, optimizer, scheduler, ONE_PROCESS, None, 1.0, 1, None, None)
    return SimpleNamespace(state=TrainerState(), dist=ONE_PROCESS, runner=runner, store=ObjectStore(),
                           prefix=job_prefix, work_dir=tmp_path / "work", uploads=CheckpointUploads())


def _step(run: SimpleNamespace) -> None:
    loss = run.runner.module(torch.ones(3, 4)).pow(2).mean()
    run.runner.backward(loss)
    run.runner.micro_step(boundary=True)
    run.state.step += 1


def test_the_checkpoint_holds_the_step_it_was_taken_at_while_training_goes_on(tmp_path):
    run = _run(tmp_path, f"file://{tmp_path}/out/job")
    _step(run)
    checkpoints.save_checkpoint(run)
    at_save = {k: v.clone() for k, v in run.runner.module.state_dict().items()}
    for _ in range(3):  # in place, perhaps while the thread still writes
        _step(run)
    checkpoints.settle_uploads(run)

    latest = json.loads(run.store.read(storage_layout.latest_checkpoint_uri(run.prefix)))
    assert latest["step"] == 1
    saved = run.store.read(storage_layout.checkpoint_prefix(run.prefix, 1) + "state.pt")
    (tmp_path / "state.pt").write_bytes(saved)
    blob = torch.load(tmp_path / "state.pt", weights_only=False)
    assert blob["trainer"]["step"] == 1
    for name, value in blob["model"].items():
        assert torch.equal(value, at_save[name]), name
        assert not torch.equal(value, run.runner.module.state_dict()[name]), name  # training did move on
    assert blob["optimizer"]["state"][0]["step"] == 1
    assert not (run.work_dir / "checkpoints" / "step-1").exists()  # uploaded: no local copy kept


def test_an_upload_that_fails_in_the_background_fails_the_run_at_the_next_checkpoint(tmp_path):
    (tmp_path / "blocker").write_text("a file where the output prefix's directory would be")
    run = _run(tmp_path, f"file://{tmp_path}/blocker/job")
    _step(run)
    checkpoints.save_checkpoint(run)  # returns at once: the upload fails on the thread
    _step(run)
    with pytest.raises(OSError):
        checkpoints.save_checkpoint(run)
    assert run.uploads.wait() is None  # raised once, not again


def test_a_failure_path_waits_for_the_upload_and_only_logs_its_error(tmp_path, caplog):
    uploads = CheckpointUploads()
    uploads.start(5, lambda: (_ for _ in ()).throw(ConnectionError("storage down")))
    checkpoints.abandon_uploads(SimpleNamespace(uploads=uploads))
    assert "checkpoint upload failed" in caplog.text


def test_one_upload_in_flight_at_a_time():
    uploads = CheckpointUploads()
    uploads.start(1, lambda: None)
    with pytest.raises(RuntimeError, match="in flight"):
        uploads.start(2, lambda: None)
    assert uploads.wait() is None

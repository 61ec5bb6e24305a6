"""A trainer killed (SIGKILL) after a checkpoint resumes at that step when relaunched, as a pod restart
does: a single process (plain PyTorch) and two ZeRO-3 processes under torchrun (DeepSpeed checkpoints)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from kubetune.api import storage_layout
from kubetune.clients.storage import ObjectStore

from .conftest import _free_port, job_spec, lm_corpus, make_config, manifest_of, write_jsonl

ZERO3 = {"nodes": 1, "gpusPerNode": 0, "processesPerNode": 2, "deepspeed": {"enabled": True, "zeroStage": 3}}


def _launch(config_path, work_dir, log_path, nproc: int):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    trainer = ["--config", str(config_path), "--work-dir", str(work_dir)]
    if nproc == 1:
        command = [sys.executable, "-m", "kubetune_trainer", *trainer]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                   str(_free_port()), "--module", "kubetune_trainer", *trainer]
    with open(log_path, "wb") as log:
        # its own process group, so the kill reaches torchrun's workers too (as a pod's end does)
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


@pytest.mark.parametrize(("nproc", "total_steps", "distributed"), [(1, 300, None), (2, 120, ZERO3)],
                         ids=["single-process", "zero3-x2"])
def test_killed_after_a_checkpoint_resumes_from_it(nproc, total_steps, distributed, tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", lm_corpus(96))
    extra = {"distributed": distributed} if distributed else {}
    spec = job_spec(tiny_llama, data, tmp_path / "out", training__maxSteps=total_steps,
                    training__checkpointSteps=10, training__evalSteps=100, training__perDeviceBatchSize=4, **extra)
    config = make_config(spec, name=f"resume-{nproc}")
    config_path = tmp_path / "config.json"
    config_path.write_text(config.to_json())
    store = ObjectStore()
    latest = storage_layout.latest_checkpoint_uri(config.storage.job_prefix)

    first = _launch(config_path, tmp_path / "work-1", tmp_path / "first.log", nproc)
    deadline = time.monotonic() + 180
    while store.read(latest) is None and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # no chance to clean up, like an OOM kill or a lost node
    first.wait(30)
    assert first.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    killed_at = json.loads(store.read(latest))["step"]
    assert 0 < killed_at < total_steps
    assert manifest_of(config) is None  # nothing published by the killed run

    second = _launch(config_path, tmp_path / "work-2", tmp_path / "second.log", nproc)
    assert second.wait(300) == 0, (tmp_path / "second.log").read_text()[-3000:]
    log_lines = [json.loads(line) for line in (tmp_path / "second.log").read_text().splitlines()
                 if line.startswith("{")]
    resumed = [line for line in log_lines if line.get("message") == "resumed from checkpoint"]
    assert len(resumed) == nproc and resumed[0]["step"] >= killed_at  # every rank; a later checkpoint may land
    assert not any(line.get("message") == "baseline" for line in log_lines)  # kept from the checkpoint
    manifest = manifest_of(config)
    steps = [h["step"] for h in manifest["training"]["history"] if "trainLoss" in h]
    assert steps == list(range(1, total_steps + 1))  # every step exactly once: no step lost or repeated
    assert manifest["training"]["steps"] == total_steps
    assert manifest["baselineMetrics"]["eval_loss"] > 0

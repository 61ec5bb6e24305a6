"""A trainer killed (SIGKILL) after a checkpoint resumes at that step when relaunched, as a pod restart does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from kubetune.api import storage_layout
from kubetune.clients.storage import ObjectStore

from .conftest import job_spec, lm_corpus, make_config, manifest_of, write_jsonl

TOTAL_STEPS = 300


def _launch(config_path, work_dir, log_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "kubetune_trainer", "--config", str(config_path),
                                 "--work-dir", str(work_dir)], stdout=log, stderr=subprocess.STDOUT, env=env)


def test_killed_after_a_checkpoint_resumes_from_it(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", lm_corpus(96))
    spec = job_spec(tiny_llama, data, tmp_path / "out", training__maxSteps=TOTAL_STEPS,
                    training__checkpointSteps=10, training__evalSteps=100, training__perDeviceBatchSize=4)
    config = make_config(spec, name="resume")
    config_path = tmp_path / "config.json"
    config_path.write_text(config.to_json())
    store = ObjectStore()
    latest = storage_layout.latest_checkpoint_uri(config.storage.job_prefix)

    first = _launch(config_path, tmp_path / "work-1", tmp_path / "first.log")
    deadline = time.monotonic() + 120
    while store.read(latest) is None and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)  # no chance to clean up, like an OOM kill or a lost node
    first.wait(30)
    assert first.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    killed_at = json.loads(store.read(latest))["step"]
    assert 0 < killed_at < TOTAL_STEPS
    assert manifest_of(config) is None  # nothing published by the killed run

    second = _launch(config_path, tmp_path / "work-2", tmp_path / "second.log")
    assert second.wait(300) == 0, (tmp_path / "second.log").read_text()[-3000:]
    log_lines = [json.loads(line) for line in (tmp_path / "second.log").read_text().splitlines()
                 if line.startswith("{")]
    resumed = [line for line in log_lines if line.get("message") == "resumed from checkpoint"]
    assert resumed and resumed[0]["step"] >= killed_at  # a later checkpoint may land before the kill lands
    assert not any(line.get("message") == "baseline" for line in log_lines)  # kept from the checkpoint
    manifest = manifest_of(config)
    steps = [h["step"] for h in manifest["training"]["history"] if "trainLoss" in h]
    assert steps == list(range(1, TOTAL_STEPS + 1))  # every step exactly once: no step lost or repeated
    assert manifest["training"]["steps"] == TOTAL_STEPS
    assert manifest["baselineMetrics"]["eval_loss"] > 0

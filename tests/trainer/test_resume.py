"""The rendered PyTorchJob's pods, run verbatim by the training-operator stand-in, SIGKILLed after a
checkpoint (the master pod, then a worker pod) and restarted by `restartPolicy: ExitCode`: the new pods
resume at the last checkpoint and finish with the uninterrupted run's metrics. Tolerance: docs/testing.md.
Checkpoints are written and uploaded in the background: a kill may land while one is in flight."""

from __future__ import annotations

import json
import math
import time

import pytest

from kubetune.api import storage_layout
from kubetune.clients.storage import ObjectStore, check_published
from kubetune_testing.training_operator import MASTER, WORKER, PyTorchJobRun

from .conftest import job_spec, lm_corpus, manifest_of, write_jsonl
from .rendered import json_lines, render_run

# Final metrics of a resumed run against the uninterrupted one: the same arithmetic in the same order
# (state, optimizer, LR schedule, per-rank RNG and data position all restored), so only the float
# rounding of a reloaded optimizer state may differ.
REL_TOLERANCE = 1e-4
FULL = {"type": "Full"}
ZERO3 = {"enabled": True, "zeroStage": 3}
DDP = {"enabled": False}
# 1 node x 2 processes (DDP and ZeRO-3) runs through the same stand-in in test_multiprocess.py.
CASES = {
    # nodes, processes per node, DeepSpeed, method, pods SIGKILLed one after the other
    "1x1-lora": (1, 1, DDP, None, [(MASTER, 0)]),  # one pod: its upload thread marks each checkpoint
    "2x2-zero3-lora": (2, 2, ZERO3, None, [(MASTER, 0), (WORKER, 0)]),
    "2x2-ddp-full": (2, 2, DDP, FULL, [(WORKER, 0)]),
}
TOTAL_STEPS, CHECKPOINT_EVERY = 30, 5


def _spec(tiny_llama, tmp_path, nodes, per_node, deepspeed, method) -> dict:
    data = write_jsonl(tmp_path / "train.jsonl", lm_corpus(96))
    extra = {"method": method} if method else {}
    return job_spec(tiny_llama, data, tmp_path / "out", training__maxSteps=TOTAL_STEPS,
                    training__checkpointSteps=CHECKPOINT_EVERY, training__evalSteps=20,
                    training__perDeviceBatchSize=4, training__learningRate=0.002 if method else 0.01,
                    distributed={"nodes": nodes, "gpusPerNode": 0, "processesPerNode": per_node,
                                 "deepspeed": deepspeed}, **extra)


def _checkpoint_after(run: PyTorchJobRun, store: ObjectStore, latest: str, step: int, timeout: float = 240) -> int:
    """Play the controller until a checkpoint later than `step` is marked latest; its step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run.poll()
        raw = store.read(latest)
        if raw and json.loads(raw)["step"] > step:
            return json.loads(raw)["step"]
        assert not run.finished, run.logs()
        time.sleep(0.05)
    raise TimeoutError(f"no checkpoint after step {step}:\n{run.logs()}")


@pytest.mark.parametrize("case", list(CASES))
def test_pods_killed_after_a_checkpoint_resume_to_the_same_result(case, tiny_llama, tmp_path):
    nodes, per_node, deepspeed, method, kills = CASES[case]
    spec = _spec(tiny_llama, tmp_path, nodes, per_node, deepspeed, method)
    store = ObjectStore()

    straight, straight_config = render_run(spec, "straight", tmp_path / "straight")
    straight.start()
    assert straight.wait(600) == "Succeeded", straight.logs()
    expected = manifest_of(straight_config)

    run, config = render_run(spec, "killed", tmp_path / "killed")
    latest = storage_layout.latest_checkpoint_uri(config.storage.job_prefix)
    run.start()
    killed_at = 0
    for replica_type, index in kills:
        killed_at = _checkpoint_after(run, store, latest, killed_at)
        pod = run.kill(replica_type, index)  # no chance to clean up: an OOM kill or a lost node
        assert pod.poll() == 137
    assert 0 < killed_at < TOTAL_STEPS
    assert run.wait(600) == "Succeeded", run.logs()
    assert run.restarts >= len(kills)  # the killed pods, and any peer that lost its collectives

    # every rank of the last attempt of every pod resumed, at the last checkpoint or a later one
    world = nodes * per_node
    last = {p.name: p for p in run.history}.values()
    resumed = [line for pod in last for line in json_lines(pod.log) if line.get("message") == "resumed from checkpoint"]
    assert len(resumed) == world and all(line["step"] >= killed_at for line in resumed), run.logs()
    manifest = manifest_of(config)
    steps = [h["step"] for h in manifest["training"]["history"] if "trainLoss" in h]
    assert steps == list(range(1, TOTAL_STEPS + 1))  # every step exactly once: none lost or repeated
    assert manifest["baselineMetrics"] == expected["baselineMetrics"]  # kept from the checkpoint
    for name, value in expected["metrics"].items():
        assert math.isclose(manifest["metrics"][name], value, rel_tol=REL_TOLERANCE), (name, manifest["metrics"])
    assert check_published(store, config.storage.job_prefix).verified

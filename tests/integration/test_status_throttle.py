"""Throttled status writes through kopf + KMock + SeaweedFS: a running FineTuneJob whose trainer rewrites
progress.json on every poll gets its status written about once per --status-min-interval, not once per
poll, and the final status carries everything (the last progress, the phase, the adapter)."""

from __future__ import annotations

import asyncio
import json

import kmock
import pytest

from kubetune.api import progress as progress_api
from kubetune.api import storage_layout
from kubetune.clients import kube
from kubetune.clients.storage import publish_adapter
from kubetune_operator.controllers import finetunejob as ftj_controller
from kubetune_operator.controllers import metrics
from kubetune_operator.reconcile import statuswrite
from kubetune_testing.factories import finetunejob
from kubetune_testing.seaweedfs import ACCESS_KEY, BUCKET, SECRET_KEY

from .conftest import NS, eventually
from .stage_helpers import pass_data_stage

pytestmark = pytest.mark.integration

INTERVAL = 3.0  # seconds (status timestamps have a resolution of one second)
POLL = 0.25  # the trainer writes progress.json this often; the operator polls every 0.5 s (conftest)
TRAINING = 9.0  # seconds of training watched


def requests_to(k8s, method, name: str, subresource: str | None) -> list:
    return [r for r in list(k8s) if r.method == method and r.resource is not None
            and r.resource.plural == "finetunejobs" and r.name == name and r.subresource == subresource]


def throttled_count() -> float:
    return metrics.STATUS_WRITES.labels(kind="FineTuneJob", result="throttled")._value.get()


@pytest.fixture()
def throttled_operator(operator):
    ftj_controller.RUNTIME.status_min_interval_seconds = INTERVAL
    yield operator
    ftj_controller.RUNTIME.status_min_interval_seconds = 0.0


async def test_progress_is_written_once_per_interval_and_the_final_status_is_complete(
        k8s, throttled_operator, api, s3_server, tmp_path):
    await api.create_secret("s3-creds", {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY})
    doc = finetunejob()
    doc["metadata"] = {"name": "busy", "namespace": NS}
    doc["spec"]["output"] = {"uri": f"s3://{BUCKET}/jobs", "endpoint": s3_server.endpoint,
                             "credentials": {"secretName": "s3-creds"}}
    created, _ = await api.client.create(kube.FINETUNEJOBS, doc)
    await pass_data_stage(api, s3_server, created)
    await eventually(lambda: api.get(kube.PYTORCHJOBS, "busy"))
    await api.set_pytorchjob_conditions("busy", ("Running", "PyTorchJobRunning", "running"))

    async def running():
        job = await api.get(kube.FINETUNEJOBS, "busy")
        return job["status"] if (job.get("status") or {}).get("phase") == "Running" else None
    await eventually(running)

    store = s3_server.store()
    prefix = storage_layout.job_prefix(f"s3://{BUCKET}/jobs", NS, "busy", created["metadata"]["uid"])
    loop = asyncio.get_running_loop()

    def write_progress(step: int) -> None:
        document = {"api": progress_api.PROGRESS_API, "stage": "training", "step": step, "totalSteps": 1000,
                    "trainLoss": 3.0 - step / 1000, "tokensPerSecond": 1000.0 + step,
                    "updateTime": ftj_controller.now_rfc3339()}
        store.write(storage_layout.progress_uri(prefix), json.dumps(document).encode())

    writes_before = len(requests_to(k8s, kmock.method.PATCH, "busy", "status"))
    polls_before = len(requests_to(k8s, kmock.method.GET, "busy", None))
    throttled_before = throttled_count()
    seen_steps = set()
    step, started = 0, loop.time()
    while loop.time() - started < TRAINING:
        step += 1
        await asyncio.to_thread(write_progress, step)
        job = await api.get(kube.FINETUNEJOBS, "busy")
        seen_steps.add(((job.get("status") or {}).get("progress") or {}).get("step"))
        await asyncio.sleep(POLL)
    writes = len(requests_to(k8s, kmock.method.PATCH, "busy", "status")) - writes_before
    polls = len(requests_to(k8s, kmock.method.GET, "busy", None)) - polls_before

    # one write per interval (plus the edges), against a pass every 0.5 s and a new progress every 0.25 s
    assert polls >= TRAINING / 0.5 * 0.6, polls
    assert 2 <= writes <= TRAINING / (INTERVAL - 1) + 2, (writes, polls)
    assert writes * 3 < polls, (writes, polls)
    throttled = throttled_count() - throttled_before  # kubetune_status_writes_total{result="throttled"}
    assert writes < throttled <= polls - writes, (throttled, writes, polls)
    assert len(seen_steps - {None}) >= 2, seen_steps  # the stored progress moves on: it never freezes

    # the trainer finishes: the phase change writes at once, with the last progress it reported
    root = tmp_path / "adapter"
    root.mkdir()
    (root / "adapter_model.safetensors").write_bytes(b"\x07" * 2048)
    (root / "adapter_config.json").write_text(json.dumps({"r": 16, "lora_alpha": 32}))
    publish_adapter(store, root, prefix, {"metrics": {"eval_loss": 0.42}})
    await api.set_pytorchjob_conditions("busy", ("Succeeded", "PyTorchJobSucceeded", "done"))

    async def succeeded():
        job = await api.get(kube.FINETUNEJOBS, "busy")
        return job["status"] if (job.get("status") or {}).get("phase") == "Succeeded" else None
    status = await eventually(succeeded, timeout=10)
    assert status["progress"]["step"] == step
    assert status["progress"]["tokensPerSecond"] == 1000.0 + step
    assert status["progress"]["evalLoss"] == 0.42
    assert status["adapter"]["metrics"] == {"eval_loss": 0.42}
    assert status[statuswrite.LAST_WRITE]

"""Kueue through kopf + KMock + SeaweedFS + the real trainer: the Kueue stand-in (kubetune_testing.kueue)
suspends queued jobs on create and admits them by LocalQueue quota; the operator shows Queued with Kueue's
reason and never unsuspends a job itself (the emulator's journal says so)."""

from __future__ import annotations

import json

import pytest

from kubetune.clients import kube
from kubetune_testing import kueue, training_operator_loop
from kubetune_testing.emulator import EXEMPT_HEADER
from kubetune_testing.seaweedfs import BUCKET
from tests.trainer.conftest import lm_corpus

from .conftest import NS, eventually
from .stage_helpers import data_stage_name, wait_status
from .test_finetunejob_flows import condition, status_of, submit, wait_phase
from .test_trainer_in_cluster import spec_for

# no test here reads kmock's request history: each request is forgotten once served
pytestmark = [pytest.mark.integration, pytest.mark.forget_served_requests]

def queued_spec(tiny_llama, queue: str) -> dict:
    spec = spec_for(tiny_llama, None)
    spec["training"].update(maxSteps=8, evalSteps=4)
    return {**spec, "scheduling": {"queueName": queue}}


async def wait_queued(api, name: str, reason: str) -> dict:
    async def check():
        status = await status_of(api, name)
        queued = condition(status, "Queued")
        return status if status.get("phase") == "Queued" and queued.get("reason") == reason else None
    return await eventually(check, timeout=30)


async def test_queued_stages_wait_for_kueue_and_run_once_admitted(operator, api, k8s, s3_server, tiny_llama,
                                                                 tmp_path):
    api.client._headers[EXEMPT_HEADER] = "1"  # the test, the training operator and Kueue are not the operator
    s3_server.store().write(f"s3://{BUCKET}/data/train.jsonl",
                            "".join(json.dumps(r) + "\n" for r in lm_corpus(48)).encode())
    async with (kueue.running(k8s, api.client, NS, {"team-a": 0, "team-b": 0}) as stand_in,
                training_operator_loop.running(api.client, NS, tmp_path) as pods):
        await submit(api, s3_server, "kq-run", data_stage=False, **queued_spec(tiny_llama, "team-a"))
        await submit(api, s3_server, "kq-held", data_stage=False, **queued_spec(tiny_llama, "team-b"))
        await submit(api, s3_server, "kq-noqueue", data_stage=False, **queued_spec(tiny_llama, "team-z"))

        status = await wait_queued(api, "kq-run", "Pending")
        assert "insufficient unused quota" in condition(status, "Queued")["message"]
        assert "team-a" in condition(status, "Queued")["message"]
        missing = condition(await wait_queued(api, "kq-noqueue", "Inadmissible"), "Queued")
        assert "LocalQueue team-z doesn't exist" in missing["message"]
        data_job = await api.get(kube.PYTORCHJOBS, data_stage_name("kq-run"))
        assert data_job["spec"]["runPolicy"]["suspend"] is True
        assert data_job["metadata"]["labels"][kueue.LABEL_QUEUE] == "team-a"
        assert not pods.runs  # the training operator starts no pod of a suspended job

        stand_in.quotas["team-a"] = 1  # the platform team grants quota: Kueue admits one job at a time
        status = await wait_phase(api, "kq-run", "Succeeded", timeout=400)
        held = await status_of(api, "kq-held")
        noqueue = await status_of(api, "kq-noqueue")

    assert condition(status, "Queued")["status"] == "False" and condition(status, "Queued")["reason"] == "Admitted"
    assert status["adapter"]["digest"]
    stages = [data_stage_name("kq-run"), "kq-run"]
    assert stand_in.admitted[:2] == stages  # each stage waited for its admission, in order
    assert all(pods.runs[name].phase == "Succeeded" for name in stages)
    # created suspended by the operator itself: Kueue's webhook never had to change a create
    assert stand_in.suspended_on_create == []
    # the operator created each PyTorchJob and never wrote one after: no suspend: false of its own
    operator_writes = [w for w in k8s.journal if w.plural == "pytorchjobs" and not w.exempt]
    assert {w.method for w in operator_writes} == {"POST"}, operator_writes
    # never admitted: still queued, nothing failed or timed out, no pod ran
    for waiting, reason in ((held, "Pending"), (noqueue, "Inadmissible")):
        assert waiting["phase"] == "Queued" and condition(waiting, "Queued")["reason"] == reason
        assert "failure" not in waiting and not condition(waiting, "Failed")
    assert not [name for name in pods.runs if name.startswith(("kq-held", "kq-noqueue"))]


async def test_a_users_suspend_reaches_kueue_as_a_deactivated_workload(operator, api, k8s, s3_server):
    """Kueue unsuspends a job whose Workload is admitted: a user's suspend deactivates the Workload instead,
    and resuming reactivates it so Kueue queues and admits it again. The test plays the training operator."""
    api.client._headers[EXEMPT_HEADER] = "1"
    async with kueue.running(k8s, api.client, NS, {"team-a": 1}) as stand_in:
        # the stand-in's webhook: a job created unsuspended with a queue label is stored suspended
        raw = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
               "metadata": {"name": "raw", "namespace": NS, "labels": {kueue.LABEL_QUEUE: "team-z"}},
               "spec": {"runPolicy": {"suspend": False}, "pytorchReplicaSpecs": {}}}
        stored, _ = await api.client.create(kube.PYTORCHJOBS, raw)
        assert stored["spec"]["runPolicy"]["suspend"] is True and stand_in.suspended_on_create == ["raw"]
        await submit(api, s3_server, "kq-pause", scheduling={"queueName": "team-a"})

        async def admitted():
            job = await api.get(kube.PYTORCHJOBS, "kq-pause")
            return job if job and job["spec"]["runPolicy"]["suspend"] is False else None
        await eventually(admitted, timeout=20)
        await api.set_pytorchjob_conditions("kq-pause", ("Running", "PyTorchJobRunning", "running"))
        await wait_phase(api, "kq-pause", "Running")

        await api.client.patch(kube.FINETUNEJOBS, NS, "kq-pause", {"spec": {"runPolicy": {"suspend": True}}})
        status = await wait_phase(api, "kq-pause", "Suspended")
        assert condition(status, "Suspended")["reason"] == "SuspendedBySpec"

        async def evicted():
            job = await api.get(kube.PYTORCHJOBS, "kq-pause")
            return job["spec"]["runPolicy"]["suspend"] is True
        await eventually(evicted, timeout=20)  # Kueue stopped it once its Workload was deactivated
        uid = (await api.get(kube.PYTORCHJOBS, "kq-pause"))["metadata"]["uid"]
        workload, = await api.client.list(kueue.WORKLOADS, NS, f"{kueue.LABEL_JOB_UID}={uid}")
        assert workload["spec"]["active"] is False

        await api.client.patch(kube.FINETUNEJOBS, NS, "kq-pause", {"spec": {"runPolicy": {"suspend": False}}})
        await eventually(admitted, timeout=20)  # reactivated, queued and admitted again
        await wait_status(api, "kq-pause", lambda s: s.get("phase") == "Running", timeout=20)
    assert stand_in.admitted.count("kq-pause") == 2  # admitted, deactivated, admitted again
    operator_writes = [w for w in k8s.journal if not w.exempt and w.plural in ("pytorchjobs", "workloads")]
    assert {(w.plural, w.method) for w in operator_writes} == {("pytorchjobs", "POST"), ("workloads", "PATCH")}

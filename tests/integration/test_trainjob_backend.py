"""backend TrainJob end to end: kopf + KMock + SeaweedFS + the Trainer v2 stand-in running the rendered nodes.

Every stage (data, baseline, two sweep trials, training) of a tiny model runs as a TrainJob whose pods the
stand-in (kubetune_testing.trainer_v2) runs with the torch runtime's PET_* environment; the operator reads
the TrainJobs' Complete/Failed conditions and publishes the adapter. No PyTorchJob is created. The suspend
and Kueue flows play Trainer v2 by writing the TrainJobs' status, as test_stage_flows.py does for PyTorchJobs.
"""

from __future__ import annotations

import json

import pytest

from kubetune.clients import kube
from kubetune.clients.storage import check_published
from kubetune_operator.backends import trainjob
from kubetune_testing import kueue, trainer_v2, training_operator_loop
from kubetune_testing.emulator import EXEMPT_HEADER
from kubetune_testing.seaweedfs import BUCKET
from tests.trainer.conftest import lm_corpus

from .conftest import NS, eventually
from .stage_helpers import (
    data_stage_name,
    row,
    sweep,
    sweep_name,
    sweep_state,
    wait_exists,
    wait_status,
    write_data_result,
    write_sweep_result,
)
from .test_finetunejob_flows import submit, wait_phase
from .test_kueue import wait_queued
from .test_trainer_in_cluster import spec_for

pytestmark = pytest.mark.integration

TRAINJOBS = kube.Resource(*trainjob.BACKEND.api_resource)


def trainjob_spec(tiny_llama) -> dict:
    spec = spec_for(tiny_llama, None)
    spec["backend"] = "TrainJob"
    spec["training"].update(maxSteps=12, evalSteps=6)
    spec["baseline"] = {"enabled": True, "target": {"metric": "eval_loss", "value": 0.01}}  # never met: train
    spec["rankSweep"] = {"ranks": [2, 4], "holdoutFraction": 0.2, "epochs": 1, "maxSteps": 3, "parallelism": 2,
                         "metric": "eval_loss"}
    return spec


async def test_every_stage_runs_as_a_trainjob(operator, api, s3_server, tiny_llama, tmp_path):
    s3_server.store().write(f"s3://{BUCKET}/data/train.jsonl",
                            "".join(json.dumps(r) + "\n" for r in lm_corpus(96)).encode())
    async with training_operator_loop.running(api.client, NS, tmp_path,
                                              controller=trainer_v2.TrainerController) as nodes:
        await submit(api, s3_server, "v2", data_stage=False, **trainjob_spec(tiny_llama))
        status = await wait_phase(api, "v2", "Succeeded", timeout=420)
        runs = dict(nodes.runs)
        logs = "\n".join(run.logs() for run in runs.values())
    names = {"v2-data", "v2-baseline", "v2-rank-sweep", "v2"}  # one halving workload for the sweep
    assert set(runs) == names, logs
    assert all(run.phase == "Complete" and run.restarts == 0 for run in runs.values()), logs
    assert await api.list(kube.PYTORCHJOBS) == []
    trainjobs = {t["metadata"]["name"]: t for t in await api.list(TRAINJOBS)}
    assert set(trainjobs) == names
    train = trainjobs["v2"]
    assert {c["type"]: c["reason"] for c in train["status"]["conditions"]} == {"Complete": "AllJobsCompleted"}
    assert train["status"]["jobsStatus"][0]["succeeded"] == 1
    assert status["data"]["state"] == "Succeeded" and status["baseline"]["met"] is False
    trials = status["sweep"]["trials"]
    assert sorted(t["rank"] for t in trials if "retryOf" not in t) == [2, 4]
    assert [t["state"] for t in trials].count("Succeeded") == 1  # halved down to one
    assert status["rank"] in (2, 4) and status["replicas"]["node"]["succeeded"] == 1
    adapter = status["adapter"]
    assert adapter["metrics"]["eval_loss"] < status["baseline"]["metrics"]["eval_loss"]
    assert check_published(s3_server.store(), adapter["manifestUri"].rsplit("/", 1)[0] + "/").verified


async def test_an_unknown_training_runtime_fails_the_job_naming_it(operator, api, s3_server, tiny_llama, tmp_path):
    spec = {**spec_for(tiny_llama, None), "backend": "TrainJob", "trainingRuntime": "torch-nowhere"}
    async with training_operator_loop.running(api.client, NS, tmp_path, controller=trainer_v2.TrainerController):
        await submit(api, s3_server, "v2-lost", data_stage=False, **spec)
        data = await wait_exists(api, TRAINJOBS, data_stage_name("v2-lost"))
        status = await wait_phase(api, "v2-lost", "Failed", timeout=30)
    assert data["spec"]["runtimeRef"]["name"] == "torch-nowhere"
    assert 'ClusterTrainingRuntime.trainer.kubeflow.org "torch-nowhere" not found' in status["failure"]["message"]


async def write_trainjob_status(api, name: str, *, active: int = 0, complete: bool = False) -> None:
    """Play Trainer v2: the node job's counts and, once it finished, the Complete condition."""
    conditions = [{"type": "Complete", "status": "True", "reason": trainer_v2.COMPLETE_REASON,
                   "message": trainer_v2.COMPLETE_MESSAGE, "lastTransitionTime": "2026-11-28T11:05:00Z"}]
    status = {"conditions": conditions if complete else [],
              "jobsStatus": [{"name": "node", "active": active, "succeeded": int(complete), "failed": 0}]}
    await api.client.patch(TRAINJOBS, NS, name, {"status": status}, subresource="status")


async def suspended_is(api, name: str, suspend: bool) -> bool:
    return (await api.get(TRAINJOBS, name))["spec"]["suspend"] is suspend


async def test_suspend_during_a_sweep_suspends_its_trainjob_and_resume_releases_it(operator, api, s3_server):
    created = await submit(api, s3_server, "v2-pause", data_stage=False, backend="TrainJob",
                           rankSweep=sweep([4, 8]))
    await wait_exists(api, TRAINJOBS, "v2-pause-data")
    write_data_result(s3_server, created)
    await write_trainjob_status(api, "v2-pause-data", complete=True)
    await wait_exists(api, TRAINJOBS, sweep_name("v2-pause"))
    await write_trainjob_status(api, sweep_name("v2-pause"), active=1)
    await wait_status(api, "v2-pause", lambda s: sweep_state(s) == "Running")

    await api.client.patch(kube.FINETUNEJOBS, NS, "v2-pause", {"spec": {"runPolicy": {"suspend": True}}})
    await eventually(lambda: suspended_is(api, sweep_name("v2-pause"), True))
    await wait_phase(api, "v2-pause", "Suspended")
    await api.client.patch(kube.FINETUNEJOBS, NS, "v2-pause", {"spec": {"runPolicy": {"suspend": False}}})
    await eventually(lambda: suspended_is(api, sweep_name("v2-pause"), False))
    await wait_phase(api, "v2-pause", "Sweeping")

    write_sweep_result(s3_server, created, [row(4, "Stopped", 0.9, rung=0), row(8, "Succeeded", 0.7, rung=0)])
    await write_trainjob_status(api, sweep_name("v2-pause"), complete=True)
    training = await wait_exists(api, TRAINJOBS, "v2-pause")
    assert training["spec"]["suspend"] is False and training["spec"]["trainer"]["numNodes"] == 2
    status = await wait_phase(api, "v2-pause", "Pending")
    assert status["rank"] == 8 and status["sweep"]["job"] == sweep_name("v2-pause")
    assert await api.list(kube.PYTORCHJOBS) == []


async def test_queued_trainjobs_wait_for_kueue_and_the_operator_never_unsuspends_them(operator, api, k8s, s3_server):
    api.client._headers[EXEMPT_HEADER] = "1"  # the test and Kueue are not the operator
    async with kueue.running(k8s, api.client, NS, {"team-a": 0}) as stand_in:
        created = await submit(api, s3_server, "v2-queued", data_stage=False, backend="TrainJob",
                               scheduling={"queueName": "team-a"})
        await wait_queued(api, "v2-queued", "Pending")
        data = await api.get(TRAINJOBS, "v2-queued-data")
        assert data["spec"]["suspend"] is True and data["metadata"]["labels"][kueue.LABEL_QUEUE] == "team-a"

        stand_in.quotas["team-a"] = 1  # Kueue admits one at a time: the data stage, then training
        await eventually(lambda: suspended_is(api, "v2-queued-data", False))
        write_data_result(s3_server, created)
        await write_trainjob_status(api, "v2-queued-data", complete=True)
        training = await wait_exists(api, TRAINJOBS, "v2-queued")
        assert training["spec"]["suspend"] is True  # created suspended: Kueue, not the operator, starts it
        await eventually(lambda: suspended_is(api, "v2-queued", False))
        await write_trainjob_status(api, "v2-queued", active=1)
        await wait_phase(api, "v2-queued", "Running")
    assert stand_in.admitted == ["v2-queued-data", "v2-queued"] and stand_in.suspended_on_create == []
    operator_writes = [w for w in k8s.journal if w.plural == "trainjobs" and not w.exempt]
    assert {w.method for w in operator_writes} == {"POST"}, operator_writes

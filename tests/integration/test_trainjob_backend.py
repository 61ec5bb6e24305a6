"""backend TrainJob end to end: kopf + KMock + SeaweedFS + the Trainer v2 stand-in running the rendered nodes.

Every stage (data, baseline, two sweep trials, training) of a tiny model runs as a TrainJob whose pods the
stand-in (kubetune_testing.trainer_v2) runs with the torch runtime's PET_* environment; the operator reads
the TrainJobs' Complete/Failed conditions and publishes the adapter. No PyTorchJob is created.
"""

from __future__ import annotations

import json

import pytest

from kubetune.clients import kube
from kubetune.clients.storage import check_published
from kubetune_operator.backends import trainjob
from kubetune_testing import trainer_v2, training_operator_loop
from kubetune_testing.seaweedfs import BUCKET
from tests.trainer.conftest import lm_corpus

from .conftest import NS
from .stage_helpers import data_stage_name, wait_exists
from .test_finetunejob_flows import submit, wait_phase
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
    names = {"v2-data", "v2-baseline", "v2-sweep-r2", "v2-sweep-r4", "v2"}
    assert set(runs) == names, logs
    assert all(run.phase == "Complete" and run.restarts == 0 for run in runs.values()), logs
    assert await api.list(kube.PYTORCHJOBS) == []
    trainjobs = {t["metadata"]["name"]: t for t in await api.list(TRAINJOBS)}
    assert set(trainjobs) == names
    train = trainjobs["v2"]
    assert {c["type"]: c["reason"] for c in train["status"]["conditions"]} == {"Complete": "AllJobsCompleted"}
    assert train["status"]["jobsStatus"][0]["succeeded"] == 1
    assert status["data"]["state"] == "Succeeded" and status["baseline"]["met"] is False
    assert {t["rank"]: t["state"] for t in status["sweep"]["trials"]} == {2: "Succeeded", 4: "Succeeded"}
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

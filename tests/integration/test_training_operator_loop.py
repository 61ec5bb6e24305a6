"""The training-operator and Trainer v2 stand-ins against the API emulator: each finds its job, runs its pods
with the cluster's Secrets and ConfigMaps, restarts a pod that exits 143, and writes the status kubeflow does."""

from __future__ import annotations

import pytest

from kubetune.clients import kube
from kubetune_testing import trainer_v2, training_operator_loop

from .conftest import NS, eventually

pytestmark = pytest.mark.integration

# Succeeds only when the mounted config and the Secret's value arrive; exits 143 on the first attempt.
SCRIPT = ("import os, pathlib, sys; config = pathlib.Path(os.environ['CONFIG']).read_text(); "
          "marker = pathlib.Path(os.environ['MARKER']); first = not marker.exists(); marker.touch(); "
          "sys.exit(143 if first else 0 if config == 'hello' and os.environ['TOKEN'] == 's3cr3t' else 3)")


def _pytorchjob(marker) -> dict:
    container = {"name": "pytorch", "command": ["python", "-c", SCRIPT],
                 "env": [{"name": "CONFIG", "value": "/etc/job/config.json"}, {"name": "MARKER", "value": str(marker)},
                         {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}}],
                 "volumeMounts": [{"name": "job-config", "mountPath": "/etc/job"}]}
    template = {"spec": {"containers": [container], "volumes": [{"name": "job-config", "configMap": {"name": "cfg"}}]}}
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "loop", "namespace": NS},
            "spec": {"nprocPerNode": "1", "runPolicy": {"backoffLimit": 3},
                     "pytorchReplicaSpecs": {"Master": {"replicas": 1, "restartPolicy": "ExitCode",
                                                        "template": template}}}}


async def test_the_loop_runs_restarts_and_reports_a_pytorchjob(api, tmp_path):
    await api.create_secret("creds", {"token": "s3cr3t"})
    await api.client.create(kube.CONFIGMAPS, {"apiVersion": "v1", "kind": "ConfigMap",
                                              "metadata": {"name": "cfg", "namespace": NS},
                                              "data": {"config.json": "hello"}})
    async with training_operator_loop.running(api.client, NS, tmp_path / "pods") as pods:
        await api.client.create(kube.PYTORCHJOBS, _pytorchjob(tmp_path / "marker"))

        async def succeeded():
            job = await api.get(kube.PYTORCHJOBS, "loop")
            conditions = {c["type"]: c for c in (job.get("status") or {}).get("conditions") or []}
            return job if conditions.get("Succeeded", {}).get("status") == "True" else None

        job = await eventually(succeeded, timeout=60)
        run = pods.runs["loop"]
    assert [p.exit_code for p in run.history] == [143, 0], run.logs()
    status = job["status"]
    assert status["replicaStatuses"]["Master"] == {"active": 0, "succeeded": 1, "failed": 0}
    assert status["startTime"] and status["completionTime"]
    # Restarting replaced Running when the first pod failed; the second finished before a pass saw it run
    assert {c["type"] for c in status["conditions"]} >= {"Created", "Restarting", "Succeeded"}
    assert all(c["reason"] == f"PyTorchJob{c['type']}" for c in status["conditions"])


def _trainjob(marker, suspend: bool) -> dict:
    patch = {"spec": {"template": {"spec": {
        "volumes": [{"name": "job-config", "configMap": {"name": "cfg"}}],
        "containers": [{"name": "node", "volumeMounts": [{"name": "job-config", "mountPath": "/etc/job"}]}]}}}}
    env = [{"name": "CONFIG", "value": "/etc/job/config.json"}, {"name": "MARKER", "value": str(marker)},
           {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}}]
    return {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
            "metadata": {"name": "v2", "namespace": NS},
            "spec": {"runtimeRef": {"name": "torch-distributed"}, "suspend": suspend,
                     "trainer": {"command": ["python", "-c", SCRIPT], "env": env, "numNodes": 1, "numProcPerNode": 1},
                     "runtimePatches": [{"manager": "test", "trainingRuntimeSpec": {"template": {"spec": {
                         "replicatedJobs": [{"name": "node", "template": patch}]}}}}]}}


async def test_the_trainer_v2_stand_in_holds_a_suspended_trainjob_then_runs_and_restarts_it(api, tmp_path):
    await api.create_secret("creds", {"token": "s3cr3t"})
    await api.client.create(kube.CONFIGMAPS, {"apiVersion": "v1", "kind": "ConfigMap",
                                              "metadata": {"name": "cfg", "namespace": NS},
                                              "data": {"config.json": "hello"}})
    trainjobs = trainer_v2.TrainerController.resource
    async with training_operator_loop.running(api.client, NS, tmp_path / "pods", trainer_v2.TrainerController) as ctl:
        await api.client.create(trainjobs, _trainjob(tmp_path / "marker", suspend=True))

        async def conditions():
            job = await api.get(trainjobs, "v2")
            return {c["type"]: c for c in (job.get("status") or {}).get("conditions") or []}

        suspended = await eventually(conditions, timeout=20)
        assert suspended["Suspended"]["reason"] == "Suspended" and "v2" not in ctl.runs
        await api.client.patch(trainjobs, NS, "v2", {"spec": {"suspend": False}})
        done = await eventually(lambda: _complete(conditions), timeout=60)
        run = ctl.runs["v2"]
        job = await api.get(trainjobs, "v2")
    assert [p.exit_code for p in run.history] == [143, 0], run.logs()
    assert run.restarts == 1  # OnFailure restarts the node under the Job's backoffLimit
    assert done["Suspended"]["status"] == "False" and done["Suspended"]["reason"] == "Resumed"
    assert done["Complete"]["reason"] == "AllJobsCompleted"
    assert job["status"]["jobsStatus"] == [{"name": "node", "ready": 0, "active": 0, "succeeded": 1, "failed": 0,
                                            "suspended": 0}]


async def _complete(conditions):
    found = await conditions()
    return found if found.get("Complete", {}).get("status") == "True" else None

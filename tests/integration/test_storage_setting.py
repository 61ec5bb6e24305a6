"""The operator's storage setting on the path a cluster takes: `kubetune operator` started as the chart
starts it with storage.endpoint (KUBETUNE_S3_ENDPOINT, here SeaweedFS's), a FineTuneJob whose spec names
no endpoint, and its training pods run from the rendered manifests (the training-operator stand-in runs
their command and env verbatim, no variable of this process inherited): they read the dataset from and
write results and the adapter to that store, and the operator reads them there."""

from __future__ import annotations

import json
import os

import kmock
import pytest

from kubetune.clients import kube
from kubetune.clients.storage import check_published
from kubetune_testing import operator_process, training_operator_loop
from kubetune_testing.factories import finetunejob
from kubetune_testing.seaweedfs import ACCESS_KEY, BUCKET, SECRET_KEY
from tests.trainer.conftest import lm_corpus

from .conftest import NS, OPERATOR_USER, eventually, write_kubeconfig
from .test_trainer_in_cluster import spec_for

pytestmark = pytest.mark.integration

STORAGE_VARIABLES = ("KUBETUNE_S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION",
                     "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def operator_env(k8s, tmp_path, storage_endpoint: str) -> dict[str, str]:
    """The environment of `kubetune operator -n team-a` with the chart's storage setting and nothing else
    of storage."""
    k8s.objects[kmock.resource("", "v1", "namespaces"), None, NS] = {
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", str(k8s.url),
                                  {"token": k8s.authenticator.issue(OPERATOR_USER)})
    env = {key: value for key, value in os.environ.items() if key not in STORAGE_VARIABLES}
    env.update(KUBECONFIG=str(kubeconfig), KUBETUNE_S3_ENDPOINT=storage_endpoint)
    return env


def silent_spec(tiny_llama) -> dict:
    """Storage by URI and credentials only: no endpoint, no region anywhere in the spec."""
    spec = spec_for(tiny_llama, None)
    spec["dataset"]["uri"] = f"s3://{BUCKET}/silent/train.jsonl"
    spec["training"].update(maxSteps=6, evalSteps=6)
    spec["output"] = {"uri": f"s3://{BUCKET}/silent-jobs", "credentials": {"secretName": "s3-creds"}}
    return spec


def rendered_env(workload: dict) -> dict[str, str]:
    pod = workload["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    return {e["name"]: e["value"] for e in pod["containers"][0]["env"] if "value" in e}


async def test_a_spec_without_endpoint_trains_against_the_operators_store(k8s, api, s3_server, tiny_llama, tmp_path):
    s3_server.store().write(f"s3://{BUCKET}/silent/train.jsonl",
                            "".join(json.dumps(r) + "\n" for r in lm_corpus(48)).encode())
    await api.create_secret("s3-creds", {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY})
    doc = finetunejob(**silent_spec(tiny_llama))
    doc["metadata"] = {"name": "silent", "namespace": NS}
    env = operator_env(k8s, tmp_path, s3_server.endpoint)
    async with operator_process.running(env, "--namespace", NS, "--publish-timeout", "30",
                                        "--status-min-interval", "0") as operator, \
            training_operator_loop.running(api.client, NS, tmp_path / "pods") as pods:
        await api.client.create(kube.FINETUNEJOBS, doc)

        async def finished():
            job = await api.get(kube.FINETUNEJOBS, "silent")
            phase = ((job or {}).get("status") or {}).get("phase")
            return job if phase in ("Succeeded", "Failed") else None

        try:
            job = await eventually(finished, timeout=240, interval=0.5)
        except TimeoutError:
            print((await operator.stop())[-6000:])
            raise
        runs = {name: (run.phase, run.logs()) for name, run in pods.runs.items()}
        workloads = {name: await api.get(kube.PYTORCHJOBS, name) for name in ("silent-data", "silent")}
    status = job["status"]
    assert status["phase"] == "Succeeded", (status, {name: logs[-3000:] for name, (_, logs) in runs.items()})
    for name, workload in workloads.items():  # both pods got the operator's endpoint, and no region
        env = rendered_env(workload)
        assert env["AWS_ENDPOINT_URL"] == s3_server.endpoint, name
        assert "AWS_REGION" not in env and "AWS_DEFAULT_REGION" not in env
        assert runs[name][0] == "Succeeded"
    assert status["data"]["state"] == "Succeeded" and status["data"]["examples"]["train"] > 0  # read there
    adapter = status["adapter"]
    assert adapter["uri"].startswith(f"s3://{BUCKET}/silent-jobs/")
    assert check_published(s3_server.store(), adapter["manifestUri"].rsplit("/", 1)[0] + "/").verified

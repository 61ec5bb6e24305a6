"""Rotated API credentials mid-flow: the emulator rotates the operator's (and the agents') tokens and
refuses the old ones; the flows still reach their end, and the refusals prove the refresh path ran.
Also `kubetune operator` as a process with an exec-plugin kubeconfig (EKS, GKE), outside a cluster."""

from __future__ import annotations

import base64
import os
import sys

import kmock
import pytest

from kubetune.api import serving, storage_layout
from kubetune.clients import credentials, kube
from kubetune.clients.storage import publish_adapter
from kubetune_operator.controllers.adapterdeployment import ADAPTERDEPLOYMENTS, PODS
from kubetune_operator.render import serving as serving_render
from kubetune_testing import auth, operator_process
from kubetune_testing.factories import finetunejob
from kubetune_testing.seaweedfs import ACCESS_KEY, BUCKET, SECRET_KEY

from .conftest import NS, OPERATOR_USER, admin_client, eventually, write_kubeconfig
from .test_adapterdeployment_flows import agent_pods, desired_of, publish, submit, version, wait_for
from .test_finetunejob_flows import fake_adapter, wait_phase
from .test_finetunejob_flows import submit as submit_job

# no test here reads kmock's request history: each request is forgotten once served
pytestmark = [pytest.mark.integration, pytest.mark.forget_served_requests]
EXPIRED = "unknown or expired token"


async def test_a_finetunejob_flow_survives_the_rotation_of_the_operators_token(operator, api, s3_server, k8s,
                                                                                 tmp_path):
    created = await submit_job(api, s3_server, "rotated-job")  # the data stage passed with token 1
    await eventually(lambda: api.get(kube.PYTORCHJOBS, "rotated-job"))
    logins = operator.credentials.logins
    operator.rotate_token()  # kubelet's rotation: a new token in the file, the old one refused
    prefix = storage_layout.job_prefix(f"s3://{BUCKET}/jobs", NS, "rotated-job", created["metadata"]["uid"])
    manifest = publish_adapter(s3_server.store(), fake_adapter(tmp_path), prefix, {"metrics": {"eval_loss": 0.4}})
    await api.set_pytorchjob_conditions("rotated-job", ("Succeeded", "PyTorchJobSucceeded", "done"))
    status = await wait_phase(api, "rotated-job", "Succeeded", timeout=20)
    assert status["adapter"]["digest"] == manifest["digest"]
    assert k8s.authenticator.refused[EXPIRED] >= 1  # the old token was used, refused, and replaced
    assert operator.credentials.logins > logins


class Agent:
    """A serving pod's agent as far as the API server sees it: a pod-bound ServiceAccount token in a
    projected file, and the agent's own client and token file login (kubetune_agent.kube)."""

    def __init__(self, k8s, tmp_path, deployment: str, pod: str):
        self.pod, self.root = pod, tmp_path / "accounts" / pod
        self.root.mkdir(parents=True)
        self.token = k8s.authenticator.issue(
            auth.service_account(NS, serving_render.agent_account_name(deployment), pod=pod), self.root / "token")
        self.client = kube.KubeClient.from_credentials(
            credentials.Refreshing(credentials.token_file_login(str(k8s.url), self.root)))

    async def report(self, desired: serving.DesiredState) -> None:
        report = serving.AgentReport(
            generation=desired.generation, engine_ready=True,
            loaded={n: v.digest for n, v in desired.versions().items()}, errors={}, metrics={},
            started="2026-11-28T10:00:00Z", updated="2026-11-28T10:00:01Z")
        await self.client.patch(PODS, NS, self.pod, {"metadata": {"annotations": {
            serving.ANNOTATION_REPORT: report.to_json()}}})


async def test_an_adapterdeployment_rollout_survives_the_rotation_of_every_token(operator, api, s3_server, k8s,
                                                                                  tmp_path):
    v1 = publish(s3_server, tmp_path, "v1")
    await submit(api, s3_server, "rotating", v1)
    pods = await agent_pods(api, "rotating", 2)
    agents = [Agent(k8s, tmp_path, "rotating", pod) for pod in pods]
    desired = await eventually(lambda: desired_of(api, "rotating"))
    for agent in agents:
        await agent.report(desired)
    await wait_for(api, "rotating", lambda s: s.get("phase") == "Ready")

    refused = k8s.authenticator.refused[EXPIRED]
    k8s.authenticator.rotate_all()  # the operator's and both agents' tokens: the old ones are refused
    v2 = publish(s3_server, tmp_path, "v2", content=b"\x08" * 2048)
    await api.client.patch(ADAPTERDEPLOYMENTS, NS, "rotating", {"spec": {"adapters": [
        {"name": "support-bot", "source": {"uri": v2["manifestUri"], "digest": v2["digest"]}}]}})
    desired = await eventually(lambda: _desired_with(api, "rotating", version(v2)), timeout=15)
    for agent in agents:
        await agent.report(desired)
    status = await wait_for(api, "rotating", lambda s: s.get("phase") == "Ready"
                            and s["adapters"][0]["stable"]["version"] == version(v2), timeout=15)
    assert status["adapters"][0]["podsReady"] == 2
    # the operator's and each agent's first request after the rotation was refused, then retried
    assert k8s.authenticator.refused[EXPIRED] >= refused + 1 + len(agents)
    for agent in agents:
        await agent.client.close()


async def _desired_with(api, name: str, version_name: str) -> serving.DesiredState | None:
    desired = await desired_of(api, name)
    return desired if desired and version_name in desired.versions() else None


EXEC_PLUGIN = """
import json, sys
open(sys.argv[2], "a").write("run\\n")
print(json.dumps({"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
                  "status": {"token": open(sys.argv[1]).read().strip(),
                             "expirationTimestamp": "2099-01-01T00:00:00Z"}}))
"""


def _job(name: str, endpoint: str) -> dict:
    doc = finetunejob()
    doc["metadata"] = {"name": name, "namespace": NS}
    doc["spec"]["output"] = {"uri": "s3://adapters/jobs", "endpoint": endpoint,
                             "credentials": {"secretName": "s3-creds"}}
    return doc


async def test_the_operator_process_logs_in_through_an_exec_plugin_again_after_a_rotation(k8s, s3_server, tmp_path):
    """An exec plugin (a script printing an ExecCredential with the current token, as `aws eks get-token`
    does) drives `kubetune operator` outside a cluster; after a rotation it runs again."""
    k8s.objects[kmock.resource("", "v1", "namespaces"), None, NS] = {
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}
    token_file, runs = tmp_path / "current-token", tmp_path / "plugin-runs"
    token = k8s.authenticator.issue(OPERATOR_USER, token_file)
    plugin = tmp_path / "plugin.py"
    plugin.write_text(EXEC_PLUGIN)
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", str(k8s.url), {"exec": {
        "apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable, "interactiveMode": "Never",
        "args": [str(plugin), str(token_file), str(runs)]}})
    client = admin_client(k8s)
    await client.create(kube.SECRETS, {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds", "namespace": NS},
        "data": {k: base64.b64encode(v.encode()).decode()
                 for k, v in {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}.items()}})
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "KUBETUNE_S3_ENDPOINT": s3_server.endpoint}
    operator = await operator_process.start(env, "--namespace", NS, "--publish-timeout", "5")
    try:
        # its start-up (imports, the plugin's first run) is not what the 30 s below bound: a loaded
        # machine took longer than that to start it
        await eventually(operator.healthy, timeout=120, interval=0.2)
        await client.create(kube.FINETUNEJOBS, _job("before", s3_server.endpoint))
        await eventually(lambda: client.get(kube.PYTORCHJOBS, NS, "before-data"), timeout=30)
        runs_before = runs.read_text().count("run")
        k8s.authenticator.rotate(token)  # the plugin's source now holds a new token; the old one is refused
        await client.create(kube.FINETUNEJOBS, _job("after", s3_server.endpoint))
        await eventually(lambda: client.get(kube.PYTORCHJOBS, NS, "after-data"), timeout=30)
        assert runs.read_text().count("run") > runs_before  # the plugin ran again for the new token
        assert k8s.authenticator.refused[EXPIRED] >= 1
    finally:
        output = await operator.stop()
        await client.close()
    assert operator.process.returncode == 0, output[-3000:]
    assert token not in output

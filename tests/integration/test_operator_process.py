"""`kubetune operator` as a real process (what the chart's Deployment runs): kubeconfig login,
namespace scope, /healthz, Prometheus metrics, structured logs, graceful shutdown."""

from __future__ import annotations

import asyncio
import base64
import json
import os

import aiohttp
import kmock
import pytest

from kubetune.clients import kube
from kubetune_testing import operator_process
from kubetune_testing.factories import finetunejob
from kubetune_testing.seaweedfs import ACCESS_KEY, SECRET_KEY

from .conftest import OPERATOR_USER, admin_client, enforce_watch_namespaces, eventually, write_kubeconfig

pytestmark = pytest.mark.integration


def _job(name: str, namespace: str, endpoint: str) -> dict:
    doc = finetunejob()
    doc["metadata"] = {"name": name, "namespace": namespace}
    doc["spec"]["output"] = {"uri": "s3://adapters/jobs", "endpoint": endpoint,
                             "credentials": {"secretName": "s3-creds"}}
    return doc


async def _http_get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


@pytest.mark.parametrize("scope", [("--namespace", "team-a"), ("--all-namespaces",)], ids=["namespace", "cluster"])
async def test_operator_process(k8s, s3_server, tmp_path, scope):
    """Scoped to team-a, team-b's job is left alone; with --all-namespaces (the chart's default) both run.
    The operator logs in with its ServiceAccount's token, under the chart's RBAC for that scope."""
    client = admin_client(k8s)
    if scope[0] == "--namespace":
        enforce_watch_namespaces(k8s, (scope[1],))
    for namespace in ("team-a", "team-b"):  # KMock's HTTP side cannot create cluster-scoped objects
        k8s.objects[kmock.resource("", "v1", "namespaces"), None, namespace] = {
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", str(k8s.url),
                                  {"token": k8s.authenticator.issue(OPERATOR_USER)})
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "KUBETUNE_S3_ENDPOINT": s3_server.endpoint}
    operator = await operator_process.start(env, *scope, "--publish-timeout", "5")
    try:
        await eventually(operator.healthy, timeout=30, interval=0.2)

        for namespace in ("team-a", "team-b"):
            await client.create(kube.SECRETS, {
                "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds", "namespace": namespace},
                "data": {"AWS_ACCESS_KEY_ID": base64.b64encode(ACCESS_KEY.encode()).decode(),
                         "AWS_SECRET_ACCESS_KEY": base64.b64encode(SECRET_KEY.encode()).decode()}})
            await client.create(kube.FINETUNEJOBS, _job("scoped", namespace, s3_server.endpoint))
        try:
            await eventually(lambda: client.get(kube.PYTORCHJOBS, "team-a", "scoped-data"), timeout=15)
        except TimeoutError:
            print((await operator.stop())[-6000:])
            raise
        if scope == ("--all-namespaces",):
            await eventually(lambda: client.get(kube.PYTORCHJOBS, "team-b", "scoped-data"), timeout=15)
        else:
            await asyncio.sleep(2.0)
            assert await client.get(kube.PYTORCHJOBS, "team-b", "scoped-data") is None  # outside the scope
            other = await client.get(kube.FINETUNEJOBS, "team-b", "scoped")
            assert not other.get("status")

        status, text = await _http_get(operator.metrics_url)
        assert status == 200
        created = 2 if scope == ("--all-namespaces",) else 1
        assert f'kubetune_children_created_total{{kind="PyTorchJob"}} {created}.0' in text
        assert "kubetune_finetunejob_reconcile_seconds_count" in text
    finally:
        output = await operator.stop()
        await client.close()
    assert operator.process.returncode == 0, output[-3000:]
    lines = [line for line in output.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert records, lines[:20]
    assert any(r.get("message") == "created child" and r.get("kind") == "PyTorchJob" for r in records)
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert SECRET_KEY not in output

"""Cluster-wide rollout through kopf + the emulator + SeaweedFS: one AdapterDeployment in a platform
namespace serves the selected pods of three tenant namespaces (2 pods each), one of which does not allow
the source; a canary is promoted across namespaces, the next one rolled back everywhere, and deleting the
AdapterDeployment removes what it wrote into the tenants' namespaces. The test plays the agents."""

from __future__ import annotations

import asyncio

import pytest

from kubetune.api import serving
from kubetune.clients import kube
from kubetune_operator.controllers import adapterdeployment as adep_controller
from kubetune_operator.controllers.adapterdeployment import (
    ADAPTERDEPLOYMENTS,
    NAMESPACES,
    PODS,
    ROLEBINDINGS,
    ROLES,
    SERVICEACCOUNTS,
)
from kubetune_operator.reconcile import adapterdeployment as adp
from kubetune_operator.reconcile import clusterwide
from kubetune_operator.render import serving as serving_render
from kubetune_testing.factories import adapterdeployment
from kubetune_testing.seaweedfs import ACCESS_KEY, BUCKET, SECRET_KEY

from .conftest import eventually
from .test_adapterdeployment_flows import publish

# no test here reads kmock's request history: each request is forgotten once served
pytestmark = [pytest.mark.integration, pytest.mark.forget_served_requests]

HOME, TENANTS, REFUSING = "ml-platform", ("team-a", "team-b", "team-c"), "team-c"
DESIRED = serving.desired_config_map_name("support", HOME)
STRATEGY = {"type": "Canary", "unloadGraceSeconds": 0, "canary": {"steps": [
    {"setWeight": 50}, {"analysis": {"windowSeconds": 10, "minRequests": 40, "maxErrorRateIncrease": 0.05}}]}}


async def make_namespaces(api) -> None:
    for name in (HOME, *TENANTS, "unselected"):
        selected = name in TENANTS
        await api.client.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {
            "name": name, "labels": {"kubetune.io/serving": "on"} if selected else {},
            "annotations": {clusterwide.ACCEPT_ANNOTATION: HOME} if selected else {}}})
        for i in range(2 if name != HOME else 0):
            await api.client.create(PODS, {"apiVersion": "v1", "kind": "Pod", "metadata": {
                "name": f"llm-{i}", "namespace": name, "labels": {"app": "llm"}},
                "spec": {"containers": [{"name": "engine", "image": "vllm"}]},
                "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}})


class Agents:
    """Every selected pod's agent: loads its namespace's desired state, counts traffic, reports on its Pod."""

    def __init__(self, api):
        self.api, self.counters = api, {}

    async def sync(self, requests: int = 0, failing: str = "") -> None:
        for namespace in TENANTS:
            config_map = await self.api.client.get(kube.CONFIGMAPS, namespace, DESIRED)
            if config_map is None:
                continue
            desired = serving.DesiredState.from_json(config_map["data"][serving.DESIRED_KEY])
            for pod in ("llm-0", "llm-1"):
                metrics = self.counters.setdefault((namespace, pod), {})
                for name, version in desired.versions().items():
                    m = metrics.setdefault(name, serving.VersionMetrics())
                    share = requests * version.weight // 100
                    m.requests += share
                    m.errors += share if failing and failing in name else 0
                    m.latency_buckets[2] += share
                    m.latency_sum += 0.02 * share
                report = serving.AgentReport(
                    generation=desired.generation, engine_ready=True,
                    loaded={n: v.digest for n, v in desired.versions().items()}, errors={},
                    metrics={n: m for n, m in metrics.items() if n in desired.versions()},
                    started="2026-12-07T10:00:00Z", updated="2026-12-07T10:00:01Z")
                await self.api.client.patch(PODS, namespace, pod, {"metadata": {"annotations": {
                    serving.ANNOTATION_REPORT: report.to_json()}}})

    async def until(self, api, predicate, timeout: float = 25.0, **traffic) -> dict:
        """Sync (with traffic) every 0.3 s until the AdapterDeployment's status satisfies `predicate`."""
        async def check():
            await self.sync(**traffic)
            status = ((await api.client.get(ADAPTERDEPLOYMENTS, HOME, "support")) or {}).get("status") or {}
            if predicate(status):
                return status
            await asyncio.sleep(0.25)
            return None
        return await eventually(check, timeout=timeout)


def phases(status: dict) -> dict:
    return {n["name"]: n["phase"] for n in status.get("namespaces") or []}


async def set_source(api, adapter: dict) -> None:
    await api.client.patch(ADAPTERDEPLOYMENTS, HOME, "support", {"spec": {"adapters": [
        {"name": "support-bot", "source": {"uri": adapter["manifestUri"], "digest": adapter["digest"]}}]}})


async def desired_in(api, namespace: str) -> serving.DesiredState | None:
    config_map = await api.client.get(kube.CONFIGMAPS, namespace, DESIRED)
    return serving.DesiredState.from_json(config_map["data"][serving.DESIRED_KEY]) if config_map else None


async def test_one_adapterdeployment_rolls_out_canaries_and_rollbacks_across_namespaces(operator, api, s3_server,
                                                                                        tmp_path):
    served = f"s3://{BUCKET}/serving/"
    adep_controller.RUNTIME.settings = adp.Settings(resync_seconds=0.5, allowed_sources={
        HOME: (served,), "team-a": (served,), "team-b": (served,), REFUSING: (f"s3://{BUCKET}/{REFUSING}/",)})
    await make_namespaces(api)
    await api.client.create(kube.SECRETS, {"apiVersion": "v1", "kind": "Secret", "metadata": {
        "name": "s3-creds", "namespace": HOME},
        "stringData": {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}})
    v1, v2, v3 = (publish(s3_server, tmp_path, f"cw-{n}", content=bytes([n]) * 2048) for n in (1, 2, 3))
    doc = adapterdeployment()
    doc["metadata"] = {"name": "support", "namespace": HOME}
    doc["spec"]["runtime"] = {"selector": {"matchLabels": {"app": "llm"}, "maxLoraRank": 16,
                                           "namespaceSelector": {"matchLabels": {"kubetune.io/serving": "on"}}}}
    doc["spec"]["adapters"] = [{"name": "support-bot", "source": {"uri": v1["manifestUri"], "digest": v1["digest"]}}]
    doc["spec"]["strategy"] = STRATEGY
    doc["spec"]["storage"] = {"endpoint": s3_server.endpoint, "credentials": {"secretName": "s3-creds"}}
    await api.client.create(ADAPTERDEPLOYMENTS, doc)
    agents = Agents(api)

    # first version: two namespaces serve it under their own names, the third refuses the source
    status = await agents.until(api, lambda s: s.get("phase") == "Ready" and phases(s).get("team-b") == "Serving")
    assert phases(status) == {"team-a": "Serving", "team-b": "Serving", REFUSING: "Refused"}
    assert status["reach"] == "2/3 namespaces, 4/4 pods (1 refused)"
    refused = next(n for n in status["namespaces"] if n["name"] == REFUSING)
    assert refused["reason"] == "SourceNotAllowed" and f"namespace {REFUSING}" in refused["message"]
    assert await api.client.get(kube.CONFIGMAPS, REFUSING, DESIRED) is None  # nothing offered there
    assert list((await desired_in(api, "team-a")).versions()) == [serving.version_name("team-a", "support-bot",
                                                                                       v1["digest"])]
    config_map = await api.client.get(kube.CONFIGMAPS, "team-b", DESIRED)
    assert config_map["metadata"]["labels"][serving.LABEL_HOME_NAMESPACE] == HOME
    assert "ownerReferences" not in config_map["metadata"]
    events = await api.client.list(kube.EVENTS, HOME)
    assert any(e["reason"] == "NamespaceRefused" and REFUSING in e["message"] for e in events)

    # a canary over the union of the served pods, analysed across namespaces and promoted; the agents' RBAC
    # deleted by hand in one namespace is back with the next desired state written there
    account = serving_render.agent_account_name("support", HOME)
    assert await api.client.delete(ROLEBINDINGS, "team-a", account)
    await set_source(api, v2)
    status = await agents.until(api, lambda s: s["adapters"][0]["stable"]["digest"] == v2["digest"], requests=20)
    assert (await api.client.get(ROLEBINDINGS, "team-a", account))["subjects"][0]["namespace"] == "team-a"
    assert {(await desired_in(api, ns)).versions()[serving.version_name(ns, "support-bot", v2["digest"])].weight
            for ns in ("team-a", "team-b")} == {100}

    # the next canary fails in one namespace: every namespace rolls back
    await set_source(api, v3)
    status = await agents.until(api, lambda s: "rolledBack" in s["adapters"][0], requests=20,
                                failing=f"team-b/support-bot@{v3['digest'][7:19]}")
    assert status["adapters"][0]["stable"]["digest"] == v2["digest"]
    for namespace in ("team-a", "team-b"):
        assert [v.digest for v in (await desired_in(api, namespace)).versions().values()] == [v2["digest"]]

    # deleting it deletes what it wrote into the tenants' namespaces (no ownerReferences reach there)
    await api.client.delete(ADAPTERDEPLOYMENTS, HOME, "support")
    await eventually(lambda: _gone(api), timeout=15)


async def _gone(api) -> bool:
    account = serving_render.agent_account_name("support", HOME)
    for namespace in ("team-a", "team-b"):
        for resource, name in ((kube.CONFIGMAPS, DESIRED), (SERVICEACCOUNTS, account), (ROLES, account),
                               (ROLEBINDINGS, account)):
            if await api.client.get(resource, namespace, name) is not None:
                return False
    return await api.client.get(ADAPTERDEPLOYMENTS, HOME, "support") is None

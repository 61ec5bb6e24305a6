"""AdapterDeployment flows through kopf + KMock + SeaweedFS. The tests play the serving pods' agents:
they read the desired-state ConfigMap and write reports on Pods, as `kubetune_agent` does."""

from __future__ import annotations

import json

import pytest

from kubetune.api import serving, storage_layout
from kubetune.clients import kube
from kubetune.clients.storage import publish_adapter
from kubetune_operator.controllers.adapterdeployment import ADAPTERDEPLOYMENTS, DEPLOYMENTS, PODS, ROLES, SERVICES
from kubetune_operator.reconcile import conditions as cond
from kubetune_operator.render import serving as serving_render
from kubetune_testing.factories import adapterdeployment
from kubetune_testing.seaweedfs import ACCESS_KEY, BUCKET, SECRET_KEY

from .conftest import NS, eventually

# no test here reads kmock's request history: each request is forgotten once served
pytestmark = [pytest.mark.integration, pytest.mark.forget_served_requests]
ROLEBINDINGS = kube.Resource("rbac.authorization.k8s.io", "v1", "rolebindings")
BASE = {"uri": "hf://meta-llama/Llama-2-7b-hf", "revision": "main"}


def publish(s3_server, tmp_path, name: str, rank: int = 16, content: bytes = b"\x07" * 2048, base=None) -> dict:
    root = tmp_path / name
    root.mkdir()
    (root / "adapter_model.safetensors").write_bytes(content)
    (root / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 2 * rank}))
    prefix = storage_layout.job_prefix(f"s3://{BUCKET}/serving", NS, name, f"uid-{name}")
    document = publish_adapter(s3_server.store(), root, prefix, {"rank": rank, "baseModel": base or BASE})
    return {"manifestUri": storage_layout.manifest_uri(prefix), "digest": document["digest"]}


async def submit(api, s3_server, name: str, adapter: dict, strategy: dict | None = None, replicas: int = 2,
                 runtime: dict | None = None) -> dict:
    await api.create_secret("s3-creds", {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY})
    doc = adapterdeployment()
    doc["metadata"] = {"name": name, "namespace": NS}
    doc["spec"]["runtime"] = runtime or {"managed": {"replicas": replicas}}
    doc["spec"]["adapters"] = [{"name": "support-bot", "source": {"uri": adapter["manifestUri"],
                                                                  "digest": adapter["digest"]}}]
    doc["spec"]["strategy"] = strategy or {"type": "Immediate", "unloadGraceSeconds": 0}
    doc["spec"]["storage"] = {"endpoint": s3_server.endpoint, "credentials": {"secretName": "s3-creds"}}
    created, _ = await api.client.create(ADAPTERDEPLOYMENTS, doc)
    return created


async def desired_of(api, name: str) -> serving.DesiredState | None:
    config_map = await api.get(kube.CONFIGMAPS, serving.desired_config_map_name(name))
    return serving.DesiredState.from_json(config_map["data"][serving.DESIRED_KEY]) if config_map else None


async def agent_pods(api, name: str, count: int, labels: dict | None = None) -> list[str]:
    """Serving pods as the Deployment would create them (labels from its template), or with `labels`
    (a `runtime.selector`'s, whose pods the user runs)."""
    if labels is None:
        deployment = await eventually(lambda: api.get(DEPLOYMENTS, f"{name}-serving"))
        labels = deployment["spec"]["template"]["metadata"]["labels"]
    names = []
    for i in range(count):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{name}-serving-{i}", "namespace": NS,
                                                               "labels": labels},
               "spec": {"containers": [{"name": "engine", "image": "vllm"}]},
               "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}
        await api.client.create(PODS, pod)
        names.append(pod["metadata"]["name"])
    return names


COUNTERS: dict[str, dict[str, serving.VersionMetrics]] = {}


def serve(pods: list[str], version_name: str, requests: int, errors: int = 0) -> None:
    """Traffic as the agents count it: per pod, per version, cumulative."""
    for pod in pods:
        m = COUNTERS.setdefault(pod, {}).setdefault(version_name, serving.VersionMetrics())
        m.requests += requests
        m.errors += errors
        m.latency_buckets[2] += requests
        m.latency_sum += 0.02 * requests


async def agents_sync(api, name: str, pods: list[str], refuse: set[str] = frozenset()) -> None:
    """What each agent does: load what is desired (or refuse it), report on its own Pod, with its
    pod-bound token (under the agents' Role and the chart's admission policy), once the operator bound it."""
    await eventually(lambda: api.get(ROLEBINDINGS, serving_render.agent_account_name(name)))
    config_map = await api.agent(name, pods[0]).get(kube.CONFIGMAPS, NS, serving.desired_config_map_name(name))
    desired = serving.DesiredState.from_json(config_map["data"][serving.DESIRED_KEY]) if config_map else None
    for pod in pods:
        versions = desired.versions() if desired else {}
        report = serving.AgentReport(
            generation=desired.generation if desired else -1, engine_ready=True,
            loaded={n: v.digest for n, v in versions.items() if n not in refuse},
            errors={n: {"reason": "DigestMismatch", "message": "adapter_model.safetensors: sha256 differs"}
                    for n in versions if n in refuse},
            metrics=dict(COUNTERS.get(pod, {})), started="2026-11-28T10:00:00Z", updated="2026-11-28T10:00:01Z")
        await api.agent(name, pod).patch(PODS, NS, pod, {"metadata": {"annotations": {
            serving.ANNOTATION_REPORT: report.to_json()}}})


async def status_of(api, name: str) -> dict:
    return ((await api.get(ADAPTERDEPLOYMENTS, name)) or {}).get("status") or {}


async def wait_for(api, name: str, predicate, timeout: float = 10.0) -> dict:
    async def check():
        status = await status_of(api, name)
        return status if predicate(status) else None
    return await eventually(check, timeout=timeout)


def condition(status: dict, kind: str) -> dict:
    return cond.find(status.get("conditions"), kind) or {}


def version(adapter: dict) -> str:
    return serving.version_name(NS, "support-bot", adapter["digest"])


async def test_immediate_rollout_to_every_pod(operator, api, s3_server, tmp_path):
    v1 = publish(s3_server, tmp_path, "v1")
    await submit(api, s3_server, "support", v1)
    desired = await eventually(lambda: desired_of(api, "support"))
    assert {n: v.weight for n, v in desired.versions().items()} == {version(v1): 100}
    for resource, child in ((DEPLOYMENTS, "support-serving"), (SERVICES, "support"), (ROLES, "support-kubetune-agent")):
        await eventually(lambda resource=resource, child=child: api.get(resource, child))
    pods = await agent_pods(api, "support", 3)
    status = await wait_for(api, "support", lambda s: (s.get("adapters") or [{}])[0].get("podsTotal") == 3)
    assert status["phase"] == "Progressing" and condition(status, "Ready")["status"] == "False"
    await agents_sync(api, "support", pods)
    status = await wait_for(api, "support", lambda s: s.get("phase") == "Ready")
    record = status["adapters"][0]
    assert record["stable"]["version"] == version(v1) and record["podsReady"] == record["podsTotal"] == 3
    assert condition(status, "Validated")["status"] == "True"

    v2 = publish(s3_server, tmp_path, "v2", content=b"\x08" * 2048)
    await api.client.patch(ADAPTERDEPLOYMENTS, NS, "support", {"spec": {"adapters": [
        {"name": "support-bot", "source": {"uri": v2["manifestUri"], "digest": v2["digest"]}}]}})

    async def switched():
        desired = await desired_of(api, "support")
        return desired if version(v2) in desired.versions() else None
    desired = await eventually(switched)
    assert desired.versions()[version(v2)].weight == 100
    await agents_sync(api, "support", pods)
    status = await wait_for(api, "support", lambda s: s["adapters"][0]["stable"]["digest"] == v2["digest"])
    assert "canary" not in status["adapters"][0]
    await wait_for(api, "support", lambda s: s.get("phase") == "Ready")


async def test_rollout_with_the_operator_scoped_to_its_namespaces(namespaced_operator, api, s3_server, tmp_path):
    """The chart's watchNamespaces layout: a Role per namespace, only kopf's reads cluster-wide."""
    v1 = publish(s3_server, tmp_path, "v1")
    await submit(api, s3_server, "scoped", v1)
    pods = await agent_pods(api, "scoped", 2)
    await agents_sync(api, "scoped", pods)
    status = await wait_for(api, "scoped", lambda s: s.get("phase") == "Ready")
    assert status["adapters"][0]["podsReady"] == 2


async def test_rank_above_the_runtime_limit_is_refused_before_any_pod_is_touched(operator, api, s3_server, tmp_path):
    small = publish(s3_server, tmp_path, "small", rank=16)
    doc_adapter = small
    await submit(api, s3_server, "limited", doc_adapter)
    await api.client.patch(ADAPTERDEPLOYMENTS, NS, "limited", {"spec": {"runtime": {"managed": {"maxLoraRank": 32}}}})
    pods = await agent_pods(api, "limited", 1)
    await agents_sync(api, "limited", pods)
    await wait_for(api, "limited", lambda s: s.get("phase") == "Ready")
    big = publish(s3_server, tmp_path, "big", rank=64, content=b"\x09" * 2048)
    await api.client.patch(ADAPTERDEPLOYMENTS, NS, "limited", {"spec": {"adapters": [
        {"name": "support-bot", "source": {"uri": big["manifestUri"], "digest": big["digest"]}}]}})
    status = await wait_for(api, "limited", lambda s: condition(s, "Validated").get("status") == "False")
    assert condition(status, "Validated")["reason"] == "RankTooHigh"
    desired = await desired_of(api, "limited")
    assert set(desired.versions()) == {version(small)}  # the pods never hear of the refused version


CANARY = {"type": "Canary", "unloadGraceSeconds": 1, "canary": {"steps": [
    {"setWeight": 20}, {"analysis": {"windowSeconds": 10, "minRequests": 40, "maxErrorRateIncrease": 0.05}},
    {"setWeight": 100}]}}


async def rolled_out(api, s3_server, tmp_path, name: str) -> tuple[dict, list[str]]:
    v1 = publish(s3_server, tmp_path, f"{name}-v1")
    await submit(api, s3_server, name, v1, strategy=CANARY)
    await eventually(lambda: desired_of(api, name))
    pods = await agent_pods(api, name, 2)
    await agents_sync(api, name, pods)
    await wait_for(api, name, lambda s: s.get("phase") == "Ready")
    return v1, pods


async def start_canary(api, s3_server, tmp_path, name: str, pods: list[str]) -> dict:
    v2 = publish(s3_server, tmp_path, f"{name}-v2", content=b"\x0a" * 2048)
    await api.client.patch(ADAPTERDEPLOYMENTS, NS, name, {"spec": {"adapters": [
        {"name": "support-bot", "source": {"uri": v2["manifestUri"], "digest": v2["digest"]}}]}})

    async def canary_offered():
        desired = await desired_of(api, name)
        return desired if version(v2) in desired.versions() else None
    desired = await eventually(canary_offered)
    assert desired.versions()[version(v2)].weight == 20 and desired.versions()[version(v2)].role == "canary"
    await agents_sync(api, name, pods)
    # the setWeight step completes once every pod loaded the canary; the analysis snapshot follows
    await wait_for(api, name, lambda s: (s["adapters"][0].get("analysis") or {}).get("step") == 1)
    await agents_sync(api, name, pods)
    return v2


async def test_canary_is_analysed_and_promoted(operator, api, s3_server, tmp_path):
    v1, pods = await rolled_out(api, s3_server, tmp_path, "promote")
    v2 = await start_canary(api, s3_server, tmp_path, "promote", pods)
    serve(pods, version(v1), 200, errors=2)
    serve(pods, version(v2), 50, errors=0)
    await agents_sync(api, "promote", pods)
    status = await wait_for(api, "promote", lambda s: s["adapters"][0]["stable"]["digest"] == v2["digest"],
                            timeout=20)
    assert "canary" not in status["adapters"][0]
    desired = await desired_of(api, "promote")
    assert desired.versions()[version(v2)].weight == 100
    await wait_for(api, "promote", lambda s: len(s["adapters"][0].get("retiring") or []) == 0, timeout=10)
    reasons = {e["reason"] for e in await api.list(kube.EVENTS)
               if e.get("involvedObject", {}).get("name") == "promote"}
    assert {"RolloutStarted", "AnalysisPassed", "Promoted"} <= reasons


async def test_canary_with_rising_errors_is_rolled_back_automatically(operator, api, s3_server, tmp_path):
    v1, pods = await rolled_out(api, s3_server, tmp_path, "rollback")
    v2 = await start_canary(api, s3_server, tmp_path, "rollback", pods)
    serve(pods, version(v1), 200, errors=1)
    serve(pods, version(v2), 40, errors=12)
    await agents_sync(api, "rollback", pods)
    status = await wait_for(api, "rollback", lambda s: "rolledBack" in s["adapters"][0], timeout=20)
    record = status["adapters"][0]
    assert record["stable"]["digest"] == v1["digest"] and "canary" not in record
    assert record["rolledBack"]["metric"] == "error-rate"
    degraded = condition(status, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "AnalysisFailed"
    desired = await desired_of(api, "rollback")
    assert set(desired.versions()) == {version(v1)}  # the agents unload the canary
    events = [e for e in await api.list(kube.EVENTS) if e.get("involvedObject", {}).get("name") == "rollback"]
    assert any(e["reason"] == "RolledBack" and e["type"] == "Warning" for e in events)


async def test_cross_tenant_source_is_refused(operator, api, s3_server, tmp_path):
    from kubetune_operator.controllers import adapterdeployment as adep_controller
    from kubetune_operator.reconcile import adapterdeployment as adp

    # team-a may serve only from its own prefix; this adapter lives under another team's
    adep_controller.RUNTIME.settings = adp.Settings(resync_seconds=0.5,
                                                    allowed_sources={NS: (f"s3://{BUCKET}/serving/{NS}/mine/",)})
    foreign = publish(s3_server, tmp_path, "theirs")
    await submit(api, s3_server, "tenant", foreign)
    status = await wait_for(api, "tenant", lambda s: condition(s, "Validated").get("status") == "False")
    assert condition(status, "Validated")["reason"] == "SourceNotAllowed"
    desired = await eventually(lambda: desired_of(api, "tenant"))
    assert desired.versions() == {}  # nothing was offered to the pods


async def test_existing_pods_selected_by_labels_are_served_without_a_managed_runtime(operator, api, s3_server,
                                                                                     tmp_path):
    v1 = publish(s3_server, tmp_path, "selected-v1")
    await submit(api, s3_server, "byo", v1, runtime={"selector": {"matchLabels": {"app": "my-vllm"},
                                                                  "maxLoraRank": 64}})
    pods = []
    for i, labels in enumerate(({"app": "my-vllm"}, {"app": "my-vllm", "zone": "b"}, {"app": "other"})):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"byo-{i}", "namespace": NS, "labels": labels},
               "spec": {"containers": [{"name": "engine", "image": "vllm"}]}}
        await api.client.create(PODS, pod)
        pods.append(pod["metadata"]["name"])
    await eventually(lambda: desired_of(api, "byo"))
    await agents_sync(api, "byo", pods[:2])
    status = await wait_for(api, "byo", lambda s: s.get("phase") == "Ready")
    assert status["adapters"][0]["podsTotal"] == 2  # every matching pod, and only those
    assert await api.get(DEPLOYMENTS, "byo-serving") is None  # nothing rendered for pods the user runs
    assert await api.get(ROLES, "byo-kubetune-agent") is not None  # the agents still get their RBAC

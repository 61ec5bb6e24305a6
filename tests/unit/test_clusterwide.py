"""Cluster-wide rollout: the pure decisions of `reconcile.clusterwide`, the children rendered into other
namespaces, and whole passes of `shell.adapterdeployment.run_pass` over a port holding four namespaces
whose agents load what their namespace's desired state says."""

from __future__ import annotations

import asyncio
import time

import pytest

from kubetune.api import serving
from kubetune.api.validation import validate
from kubetune_operator.clients.drift_storage import Analyzer
from kubetune_operator.reconcile import adapterdeployment as adp
from kubetune_operator.reconcile import clusterwide as cw
from kubetune_operator.render import serving as render
from kubetune_operator.shell import adapterdeployment as shell
from kubetune_testing.factories import adapterdeployment

HOME = "ml-platform"
D1, D2 = ("sha256:" + c * 64 for c in "ab")
SELECTOR = {"matchLabels": {"kubetune.io/serving": "on"}}


def manifest(digest: str) -> str:
    return f"s3://shared/adapters/{digest[7:15]}/manifest.json"


def cluster_adep(strategy: dict | None = None, selector: dict | None = SELECTOR) -> dict:
    doc = adapterdeployment()
    doc["metadata"] = {"name": "support", "namespace": HOME, "uid": "u-1", "generation": 1}
    doc["spec"]["runtime"] = {"selector": {"matchLabels": {"app": "llm"}, "maxLoraRank": 16,
                                           **({"namespaceSelector": selector} if selector else {})}}
    doc["spec"]["adapters"] = [{"name": "support-bot", "source": {"uri": manifest(D1), "digest": D1}}]
    doc["spec"]["strategy"] = strategy or {"type": "Immediate", "unloadGraceSeconds": 0}
    result = validate(doc)
    assert result.ok, result.errors
    return {**doc, "spec": result.defaulted["spec"]}


# --- pure decisions ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("selector", "labels", "expected"), [
    ({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
    ({"matchLabels": {"a": "1"}}, {"a": "2"}, False),
    ({"matchExpressions": [{"key": "team", "operator": "In", "values": ["x", "y"]}]}, {"team": "y"}, True),
    ({"matchExpressions": [{"key": "team", "operator": "In", "values": ["x"]}]}, {}, False),
    ({"matchExpressions": [{"key": "team", "operator": "NotIn", "values": ["x"]}]}, {}, True),
    ({"matchExpressions": [{"key": "team", "operator": "NotIn", "values": ["x"]}]}, {"team": "x"}, False),
    ({"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}, {"gpu": ""}, True),
    ({"matchExpressions": [{"key": "gpu", "operator": "DoesNotExist"}]}, {"gpu": ""}, False),
    ({"matchLabels": {"a": "1"}, "matchExpressions": [{"key": "b", "operator": "Exists"}]}, {"a": "1"}, False),
])
def test_namespace_selector_means_what_a_label_selector_means(selector, labels, expected):
    assert cw.selects(selector, labels) is expected


def test_targets_are_the_matching_namespaces_or_its_own_without_a_selector():
    namespaces = [cw.Namespace("team-b", {"kubetune.io/serving": "on"}), cw.Namespace("other"),
                  cw.Namespace("team-a", {"kubetune.io/serving": "on"}), cw.Namespace(HOME)]
    assert [n.name for n in cw.targets(cluster_adep(), namespaces)] == ["team-a", "team-b"]
    assert [n.name for n in cw.targets(cluster_adep(selector=None), namespaces)] == [HOME]
    assert [n.name for n in cw.targets(cluster_adep(), None)] == [HOME]  # `kubetune local`: one namespace


def test_a_namespace_must_accept_the_adapters_and_allow_their_storage():
    adep = cluster_adep()
    manifests = {"support-bot": manifest(D1)}
    accepting = {cw.ACCEPT_ANNOTATION: f"other, {HOME}"}
    assert cw.refusal(adep, cw.Namespace(HOME), manifests, {HOME: ("s3://nothing/",)}) is None  # preflight's
    reason, message = cw.refusal(adep, cw.Namespace("team-a"), manifests, {})
    assert reason == "NotAccepted" and cw.ACCEPT_ANNOTATION in message and HOME in message
    assert cw.refusal(adep, cw.Namespace("team-a", annotations=accepting), manifests, {}) is None
    assert cw.refusal(adep, cw.Namespace("team-a", annotations={cw.ACCEPT_ANNOTATION: "*"}), manifests, {}) is None
    allowed = {"team-a": ("s3://shared/",), "team-b": ("s3://team-b/",)}
    assert cw.refusal(adep, cw.Namespace("team-a", annotations=accepting), manifests, allowed) is None
    reason, message = cw.refusal(adep, cw.Namespace("team-b", annotations=accepting), manifests, allowed)
    assert reason == "SourceNotAllowed"
    assert message == (f"adapters[support-bot]: {manifest(D1)} is outside the storage prefixes namespace team-b "
                       "may serve from")
    sampled = {**adep, "spec": {**adep["spec"], "trafficSampling": {"rate": 0.1, "uri": "s3://samples/x"}}}
    reason, message = cw.refusal(sampled, cw.Namespace("team-a", annotations=accepting), manifests, allowed)
    assert reason == "StorageNotAllowed" and "spec.trafficSampling.uri: s3://samples/x" in message


def test_reports_and_desired_states_translate_between_namespaces():
    report = {"loaded": {"team-a/support-bot@aaaa": D1, "team-a/other@bbbb": D2}, "metrics": {
        "team-a/support-bot@aaaa": {"requests": 3}}, "errors": {}}
    home_view = cw.to_home_names(report, "team-a", HOME, ["support-bot"])
    assert home_view["loaded"] == {f"{HOME}/support-bot@aaaa": D1, "team-a/other@bbbb": D2}
    assert home_view["metrics"] == {f"{HOME}/support-bot@aaaa": {"requests": 3}}
    assert cw.to_home_names(report, HOME, HOME, ["support-bot"]) is report
    version = serving.Version(f"{HOME}/support-bot@aaaa", D1, manifest(D1), 100)
    desired = serving.DesiredState(generation=4, adapters=[serving.AliasState(f"{HOME}/support-bot", [version])])
    there = cw.desired_for(desired, HOME, "team-a", refused=False)
    assert [a.alias for a in there.adapters] == ["team-a/support-bot"]
    assert list(there.versions()) == ["team-a/support-bot@aaaa"] and there.generation == 4
    assert cw.desired_for(desired, HOME, "team-a", refused=True).adapters == []


def test_reach_records_each_namespace_and_releases_the_ones_left_once_unloaded():
    adep = cluster_adep()
    adep["status"] = {"namespaces": [{"name": "team-c", "phase": "Refused", "reason": "SourceNotAllowed"}]}
    stable = {"version": f"{HOME}/support-bot@aaaaaaaaaaaa", "digest": D1}
    loaded = {"loaded": {"team-a/support-bot@aaaaaaaaaaaa": D1}}
    pods = {"team-a": [adp.Pod("p0", True, loaded), adp.Pod("p1", True, {"loaded": {}})],
            "team-b": [], "team-c": [adp.Pod("p0", True, None)],
            "gone": [adp.Pod("p0", True, {"loaded": {"gone/support-bot@aaaaaaaaaaaa": D1}})], "gone-clean": []}
    served = [cw.Namespace(n) for n in ("team-a", "team-b", "team-c", "team-d")]
    refusals = {"team-c": ("SourceNotAllowed", "not here"), "team-d": ("NotAccepted", "not asked for")}
    reach = cw.reach(adep, served, refusals, pods, ["gone", "gone-clean"], [{"stable": stable}], "support-bot aaa")
    by_name = {r["name"]: r for r in reach.records}
    assert by_name["team-a"] == {"name": "team-a", "phase": "Progressing", "podsReady": 1, "podsTotal": 2,
                                 "versions": "support-bot aaa"}
    assert by_name["team-b"]["phase"] == "NoPods"
    assert by_name["team-c"]["phase"] == "Refused" and by_name["team-c"]["message"] == "not here"
    assert by_name["gone"]["phase"] == "Released" and "gone-clean" not in by_name
    assert reach.release == ["gone-clean"]
    # only the newly refused namespace is announced
    assert reach.events == [("Warning", "NamespaceRefused", "namespace team-d: not asked for")]
    assert reach.summary == "0/4 namespaces, 1/2 pods (2 refused)"


def test_writes_create_where_served_empty_where_refused_or_left_and_delete_once_unloaded():
    adep = cluster_adep()
    version = serving.Version(f"{HOME}/support-bot@aaaa", D1, manifest(D1), 100)
    desired = serving.DesiredState(generation=2, adapters=[serving.AliasState(f"{HOME}/support-bot", [version])])
    served = [cw.Namespace(HOME), cw.Namespace("team-a"), cw.Namespace("team-c")]
    out = cw.writes(adep, desired, served, {"team-c": ("NotAccepted", "no")}, ["gone", "gone-clean"],
                    cw.Reach(release=["gone-clean"]))
    summary = [(name, None if state is None else list(state.versions()), create) for name, state, create in out]
    assert summary == [("team-a", ["team-a/support-bot@aaaa"], True), ("team-c", [], False), ("gone", [], False),
                       ("gone-clean", None, False)]  # its own namespace: apply_serving's


def test_status_names_namespaces_only_while_it_may_reach_others():
    reach = cw.Reach(records=[{"name": HOME, "phase": "Serving", "podsReady": 1, "podsTotal": 1}],
                     summary="1/1 pods")
    single = cw.with_reach({"phase": "Ready", "namespaces": []}, cluster_adep(selector=None), reach)
    assert single == {"phase": "Ready", "reach": "1/1 pods"}
    assert cw.with_reach({}, cluster_adep(), reach)["namespaces"] == reach.records


def test_children_in_another_namespace_are_labelled_not_owned():
    adep = cluster_adep()
    children = render.render_remote_children(adep, "team-a", serving.DesiredState(generation=1))
    assert [c["kind"] for c in children] == ["ConfigMap", "ServiceAccount", "Role", "RoleBinding"]
    for child in children:
        meta = child["metadata"]
        assert meta["namespace"] == "team-a" and "ownerReferences" not in meta
        assert meta["labels"][serving.LABEL_HOME_NAMESPACE] == HOME
        assert meta["labels"][serving.LABEL_ADAPTERDEPLOYMENT] == "support"
    config_map, account, role, binding = children
    assert config_map["metadata"]["name"] == f"{HOME}.support-desired"
    assert account["metadata"]["name"] == role["metadata"]["name"] == f"{HOME}.support-kubetune-agent"
    assert role["rules"][0]["resourceNames"] == [f"{HOME}.support-desired"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{HOME}.support-kubetune-agent",
                                    "namespace": "team-a"}]
    home_children = render.render_children(adep, render.ServingSettings(), serving.DesiredState(generation=1), 16)
    assert home_children[0]["metadata"]["ownerReferences"][0]["uid"] == "u-1"


# --- whole passes --------------------------------------------------------------------------------------


class Cluster:
    """Four namespaces (team-a..c selected, 2 pods each, team-c outside the source's prefixes for it; other
    not selected) and the port one pass uses; the agents load their namespace's desired state."""

    def __init__(self, adep: dict):
        self.adep = adep
        self.namespace_objects = [cw.Namespace(n, {"kubetune.io/serving": "on"}, {cw.ACCEPT_ANNOTATION: HOME})
                                  for n in ("team-a", "team-b", "team-c")] + [cw.Namespace("other")]
        self.pod_names = {n: ["llm-0", "llm-1"] for n in ("team-a", "team-b", "team-c", "other")}
        self.reports: dict = {}  # (namespace, pod) -> report
        self.config_maps: dict = {}  # namespace -> DesiredState (another namespace's)
        self.home_desired: serving.DesiredState | None = None
        self.released: list = []
        self.errors: dict = {}  # namespace -> error count per request
        self.verified = {(manifest(d), d): adp.Source(manifest_uri=manifest(d), digest=d, rank=8) for d in (D1, D2)}
        self.base_identities: dict = {}
        self.analyzer = Analyzer(last_analysis={(HOME, "support", "support-bot"): time.monotonic()})
        self.events: list = []

    async def read(self):
        return self.adep

    async def object_store(self, adep):
        return None

    async def locate_source(self, adep, adapter):
        return adapter["source"]["uri"], adapter["source"]["digest"]

    async def namespaces(self, adep):
        return self.namespace_objects

    async def pods(self, adep, namespace):
        return [adp.Pod(p, True, self.reports.get((namespace, p))) for p in self.pod_names.get(namespace, [])]

    async def desired_state(self, adep):
        return self.home_desired

    async def secrets_found(self, adep):
        return None

    async def apply_serving(self, adep, changed, desired, max_rank):
        self.home_desired = desired

    async def apply_remote(self, adep, namespace, desired, create):
        if create or namespace in self.config_maps:
            self.config_maps[namespace] = desired

    async def release(self, adep, namespace):
        self.released.append(namespace)
        self.config_maps.pop(namespace)

    async def write_status(self, adep, status):
        self.adep = {**self.adep, "status": status}

    async def post_events(self, adep, events):
        self.events += events

    async def retrain_jobs(self, adep, adapter):
        return []

    async def retrains_in_flight(self):
        return 0

    async def create_retrain(self, job):
        raise AssertionError("no drift here")

    def agents_sync(self, requests: int = 0) -> None:
        """Every agent loads its namespace's desired state and counts `requests` per version."""
        for namespace, state in self.config_maps.items():
            for pod in self.pod_names[namespace]:
                before = (self.reports.get((namespace, pod)) or {}).get("metrics") or {}
                metrics = {}
                for name in state.versions():
                    old = before.get(name) or {"requests": 0, "errors": 0, "latency_sum": 0.0,
                                               "latency_buckets": [0] * 14}
                    errors = requests if "@" + D2[7:19] in name and self.errors.get(namespace) else 0
                    metrics[name] = {"requests": old["requests"] + requests, "errors": old["errors"] + errors,
                                     "latency_sum": old["latency_sum"] + 0.02 * requests,
                                     "latency_buckets": [b + (requests if i == 2 else 0)
                                                         for i, b in enumerate(old["latency_buckets"])]}
                self.reports[(namespace, pod)] = {"loaded": {n: v.digest for n, v in state.versions().items()},
                                                  "errors": {}, "metrics": metrics,
                                                  "started": "2026-12-07T10:00:00Z"}

    def run(self, settings: adp.Settings) -> dict:
        asyncio.run(shell.run_pass(self, settings))
        return self.adep["status"]

    def source(self, digest: str) -> None:
        spec = self.adep["spec"]
        self.adep = {**self.adep, "spec": {**spec, "adapters": [
            {"name": "support-bot", "source": {"uri": manifest(digest), "digest": digest}}]}}


SETTINGS = adp.Settings(allowed_sources={"team-a": ("s3://shared/",), "team-b": ("s3://shared/",),
                                         "team-c": ("s3://team-c/",), HOME: ("s3://shared/",)})


def test_every_selected_namespace_is_served_and_the_refusing_one_says_so():
    cluster = Cluster(cluster_adep())
    status = cluster.run(SETTINGS)
    assert set(cluster.config_maps) == {"team-a", "team-b"}  # nothing is written where it is refused
    assert list(cluster.config_maps["team-a"].versions()) == [f"team-a/support-bot@{D1[7:19]}"]
    cluster.agents_sync()
    status = cluster.run(SETTINGS)
    phases = {n["name"]: n["phase"] for n in status["namespaces"]}
    assert phases == {"team-a": "Serving", "team-b": "Serving", "team-c": "Refused"}
    refused = next(n for n in status["namespaces"] if n["name"] == "team-c")
    assert refused["reason"] == "SourceNotAllowed" and "namespace team-c" in refused["message"]
    assert refused["podsTotal"] == 2 and refused["podsReady"] == 0
    assert status["reach"] == "2/3 namespaces, 4/4 pods (1 refused)"
    assert status["phase"] == "Ready" and status["adapters"][0]["podsTotal"] == 4
    assert [e.reason for e in cluster.events].count("NamespaceRefused") == 1


def test_a_canary_steps_over_the_union_and_a_rollback_reverts_every_namespace():
    strategy = {"type": "Canary", "unloadGraceSeconds": 0, "canary": {"steps": [
        {"setWeight": 50}, {"analysis": {"windowSeconds": 10, "minRequests": 20}}]}}
    cluster = Cluster(cluster_adep(strategy))
    cluster.run(SETTINGS)
    cluster.agents_sync()
    cluster.run(SETTINGS)
    cluster.source(D2)
    cluster.run(SETTINGS)
    for namespace in ("team-a", "team-b"):
        weights = {v.role: v.weight for v in cluster.config_maps[namespace].versions().values()}
        assert weights == {"stable": 50, "canary": 50}
    # the weight step completes only when the pods of every served namespace loaded the canary
    cluster.agents_sync()
    status = cluster.run(SETTINGS)
    assert status["adapters"][0]["stepIndex"] == 1  # analysis: counters snapshot across namespaces
    assert set(status["adapters"][0]["analysis"]["canary"]) == {"team-a/llm-0", "team-a/llm-1",
                                                                "team-b/llm-0", "team-b/llm-1"}
    cluster.errors["team-b"] = True  # the canary fails in one namespace: every namespace rolls back
    cluster.agents_sync(requests=10)
    status = cluster.run(SETTINGS)
    record = status["adapters"][0]
    assert record["rolledBack"]["digest"] == D2 and record["stable"]["digest"] == D1 and "canary" not in record
    for namespace in ("team-a", "team-b"):
        assert [v.digest for v in cluster.config_maps[namespace].versions().values()] == [D1]


def test_a_namespace_that_leaves_the_selection_unloads_then_is_released():
    cluster = Cluster(cluster_adep())
    cluster.run(SETTINGS)
    cluster.agents_sync()
    cluster.run(SETTINGS)
    cluster.namespace_objects[1] = cw.Namespace("team-b")  # its label is removed
    status = cluster.run(SETTINGS)
    assert cluster.config_maps["team-b"].adapters == []
    assert {n["name"]: n["phase"] for n in status["namespaces"]}["team-b"] == "Released"
    cluster.agents_sync()  # team-b's agents unload
    status = cluster.run(SETTINGS)
    assert cluster.released == ["team-b"] and "team-b" not in {n["name"] for n in status["namespaces"]}
    assert status["reach"] == "1/2 namespaces, 2/2 pods (1 refused)"


def test_a_port_that_knows_only_its_own_namespace_serves_it_whatever_the_selector():
    cluster = Cluster(cluster_adep())  # `kubetune local`: one machine, one namespace
    cluster.namespace_objects = None
    cluster.pod_names[HOME] = ["local-0"]
    status = cluster.run(adp.Settings())
    assert cluster.config_maps == {} and status["adapters"][0]["podsTotal"] == 1
    assert [(n["name"], n["podsTotal"]) for n in status["namespaces"]] == [(HOME, 1)]


class NamespaceList:
    """A client whose one LIST of namespaces is all the cluster port may read here."""

    async def list(self, resource, namespace=None, label_selector=None):
        assert resource.plural == "namespaces" and namespace is None and label_selector is None
        return [{"metadata": {"name": n, "labels": {"kubetune.io/serving": "on"}}} for n in ("team-a", "team-b")] + [
            {"metadata": {"name": "team-z", "labels": {"kubetune.io/serving": "on"},
                          "deletionTimestamp": "2026-12-07T10:00:00Z"}}]


def test_the_cluster_port_reads_namespaces_only_for_a_selector_and_only_the_watched_ones(monkeypatch):
    from kubetune_operator.controllers import adapterdeployment as controller

    port = controller.ClusterPort(NamespaceList(), HOME, "support")
    assert asyncio.run(port.namespaces(cluster_adep(selector=None))) is None  # no LIST at all
    assert [n.name for n in asyncio.run(port.namespaces(cluster_adep()))] == ["team-a", "team-b"]
    monkeypatch.setattr(controller.RUNTIME, "watch_namespaces", (HOME, "team-b"))
    assert [n.name for n in asyncio.run(port.namespaces(cluster_adep()))] == ["team-b"]

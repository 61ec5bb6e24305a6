"""The AdapterDeployment state machine and canary analysis, driven purely: a simulated fleet of agents
loads what the desired state says (or refuses it) and counts requests as the tests say."""

from __future__ import annotations

import copy
import datetime as dt

import jsonschema

from kubetune.api import serving
from kubetune.api.schema import strict_json_schema
from kubetune.api.validation import root_schema, validate
from kubetune_operator.reconcile import adapterdeployment as adp
from kubetune_operator.reconcile import analysis
from kubetune_testing.factories import adapterdeployment

NS = "team-a"
D1, D2, D3 = ("sha256:" + c * 64 for c in "abc")
BASE = {"uri": "hf://meta-llama/Llama-2-7b-hf", "revision": "main"}


def source(digest: str, rank: int = 16, **kw) -> adp.Source:
    return adp.Source(manifest_uri=f"s3://adapters/{digest[7:15]}/manifest.json", digest=digest, rank=rank,
                      base_model=kw.pop("base_model", BASE), **kw)


class Fleet:
    """N serving pods whose agents load every desired version (unless told to refuse one)."""

    def __init__(self, adep: dict, pods: int = 2):
        result = validate(adep)
        assert result.ok, result.errors
        self.adep = {**adep, "metadata": {**adep["metadata"], "namespace": NS, "generation": 1},
                     "spec": result.defaulted["spec"]}
        self.pods = {f"pod-{i}": {"loaded": {}, "errors": {}, "metrics": {}, "started": "2026-11-28T10:00:00Z"}
                     for i in range(pods)}
        self.desired: serving.DesiredState | None = None
        self.clock = dt.datetime(2026, 11, 28, 12, 0, 0, tzinfo=dt.UTC)
        self.refuse: set[str] = set()
        self.events: list[adp.Event] = []
        self.settings = adp.Settings()

    @property
    def now(self) -> str:
        return self.clock.isoformat(timespec="seconds").replace("+00:00", "Z")

    def tick(self, seconds: float) -> None:
        self.clock += dt.timedelta(seconds=seconds)

    def reconcile(self, sources: dict) -> adp.Plan:
        observed = adp.Observed(adep=self.adep, now=self.now, sources=sources, desired=self.desired,
                                pods=[adp.Pod(name, True, {**r, "generation": 1}) for name, r in self.pods.items()])
        plan = adp.decide(observed, self.settings)
        self.adep = {**self.adep, "status": plan.status}
        self.events += plan.events
        if plan.desired is not None:
            self.desired = plan.desired
        return plan

    def agents_sync(self) -> None:
        wanted = self.desired.versions() if self.desired else {}
        for report in self.pods.values():
            report["loaded"] = {n: v.digest for n, v in wanted.items() if n not in self.refuse}
            report["errors"] = {n: {"reason": "DigestMismatch", "message": "file x: sha256 differs"}
                                for n in wanted if n in self.refuse}

    def serve(self, version: str, requests: int, errors: int = 0, latency_bucket: int = 2, confidence: float = 0.9):
        for report in self.pods.values():
            m = report["metrics"].setdefault(version, {"requests": 0, "errors": 0, "latency_sum": 0.0,
                                                       "latency_buckets": [0] * (len(serving.LATENCY_BUCKETS) + 1),
                                                       "confidence_sum": 0.0, "confidence_count": 0})
            m["requests"] += requests
            m["errors"] += errors
            m["latency_buckets"][latency_bucket] += requests
            m["confidence_sum"] += confidence * requests
            m["confidence_count"] += requests

    def record(self, name: str = "support-bot") -> dict:
        return next(r for r in self.adep["status"]["adapters"] if r["name"] == name)

    def condition(self, kind: str) -> dict:
        return next(c for c in self.adep["status"]["conditions"] if c["type"] == kind)

    def weights(self) -> dict:
        return {v.name: v.weight for v in self.desired.versions().values()}


STATUS_SCHEMA = jsonschema.Draft4Validator(
    strict_json_schema(root_schema("AdapterDeployment")["properties"]["status"]))


def status_errors(status: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in STATUS_SCHEMA.iter_errors(status)]


def canary_adep(steps=None, **strategy) -> dict:
    doc = adapterdeployment()
    doc["spec"]["strategy"] = {"type": "Canary", "canary": {"steps": steps or [
        {"setWeight": 10}, {"analysis": {"windowSeconds": 60, "minRequests": 50}}, {"setWeight": 50},
        {"pause": {"seconds": 30}}, {"setWeight": 100}]}, **strategy}
    return doc


def v(digest: str) -> str:
    return serving.version_name(NS, "support-bot", digest)


def rolled_out_fleet(adep=None) -> Fleet:
    fleet = Fleet(adep or canary_adep())
    fleet.reconcile({"support-bot": source(D1)})
    fleet.agents_sync()
    fleet.reconcile({"support-bot": source(D1)})
    return fleet


def test_first_version_is_stable_at_once_and_ready_when_every_pod_loaded_it():
    fleet = Fleet(canary_adep())
    plan = fleet.reconcile({"support-bot": source(D1)})
    assert fleet.record()["stable"]["version"] == v(D1) and "canary" not in fleet.record()
    assert plan.desired.generation == 1 and fleet.weights() == {v(D1): 100}
    assert fleet.adep["status"]["phase"] == "Progressing" and fleet.condition("Ready")["status"] == "False"
    fleet.agents_sync()
    plan = fleet.reconcile({"support-bot": source(D1)})
    assert plan.desired is None  # nothing changed: the ConfigMap is not rewritten
    assert fleet.adep["status"]["phase"] == "Ready" and fleet.condition("Ready")["status"] == "True"
    assert fleet.record()["podsReady"] == fleet.record()["podsTotal"] == 2
    assert fleet.record()["alias"] == "team-a/support-bot"


def test_canary_promoted_through_weight_analysis_and_pause_then_old_version_unloaded_after_grace():
    fleet = rolled_out_fleet(canary_adep(unloadGraceSeconds=60))
    fleet.reconcile({"support-bot": source(D2)})
    assert fleet.record()["canary"]["version"] == v(D2)
    assert fleet.weights() == {v(D1): 90, v(D2): 10}
    assert fleet.record()["stepIndex"] == 0  # setWeight waits until every pod loaded the canary
    fleet.agents_sync()
    fleet.reconcile({"support-bot": source(D2)})
    assert fleet.record()["stepIndex"] == 1 and "analysis" in fleet.record()  # snapshot taken
    fleet.serve(v(D1), 450)
    fleet.serve(v(D2), 50)
    fleet.tick(30)
    fleet.reconcile({"support-bot": source(D2)})
    assert fleet.record()["stepIndex"] == 1  # the window (60 s) has not passed
    fleet.tick(31)
    fleet.reconcile({"support-bot": source(D2)})
    assert fleet.record()["stepIndex"] == 3 and fleet.weights()[v(D2)] == 50  # analysis passed, weight 50, pause
    assert fleet.record()["canary"]["podsLoaded"] == fleet.record()["stable"]["podsLoaded"] == 2
    assert status_errors(fleet.adep["status"]) == []  # the API server accepts it
    fleet.tick(31)
    fleet.reconcile({"support-bot": source(D2)})
    record = fleet.record()
    assert record["stable"]["version"] == v(D2) and "canary" not in record
    assert fleet.weights() == {v(D2): 100, v(D1): 0}  # the old version stays loaded, without traffic
    reasons = [e.reason for e in fleet.events]
    assert reasons.count("Promoted") == 1 and "AnalysisPassed" in reasons
    assert status_errors(fleet.adep["status"]) == []
    fleet.tick(61)
    fleet.reconcile({"support-bot": source(D2)})
    assert fleet.weights() == {v(D2): 100} and "retiring" not in fleet.record()


def test_canary_with_a_higher_error_rate_is_rolled_back_and_never_retried():
    fleet = rolled_out_fleet()
    fleet.reconcile({"support-bot": source(D2)})
    fleet.agents_sync()
    fleet.reconcile({"support-bot": source(D2)})
    fleet.serve(v(D1), 500, errors=1)
    fleet.serve(v(D2), 60, errors=9)
    fleet.tick(5)
    fleet.reconcile({"support-bot": source(D2)})  # a failing metric fails at once, before the window ends
    record = fleet.record()
    assert "canary" not in record and record["stable"]["version"] == v(D1)
    assert record["rolledBack"]["metric"] == "error-rate" and record["rolledBack"]["digest"] == D2
    assert fleet.weights() == {v(D1): 100}  # agents unload the canary
    degraded = fleet.condition("Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "AnalysisFailed"
    assert "error rate" in degraded["message"]
    assert fleet.adep["status"]["phase"] == "Degraded"
    assert any(e.reason == "RolledBack" and e.type == "Warning" for e in fleet.events)
    assert status_errors(fleet.adep["status"]) == []
    fleet.tick(600)
    fleet.reconcile({"support-bot": source(D2)})
    assert "canary" not in fleet.record()  # the same digest is not tried again
    fleet.reconcile({"support-bot": source(D3)})
    assert fleet.record()["canary"]["version"] == v(D3)  # a new one is


def test_latency_and_confidence_regressions_fail_the_analysis():
    for kwargs, metric in (({"latency_bucket": 9}, "latency-p95"), ({"confidence": 0.6}, "confidence")):
        fleet = rolled_out_fleet()
        fleet.reconcile({"support-bot": source(D2)})
        fleet.agents_sync()
        fleet.reconcile({"support-bot": source(D2)})
        fleet.serve(v(D1), 500)
        fleet.serve(v(D2), 60, **kwargs)
        fleet.tick(61)
        fleet.reconcile({"support-bot": source(D2)})
        assert fleet.record()["rolledBack"]["metric"] == metric


def test_analysis_waits_for_enough_canary_requests():
    fleet = rolled_out_fleet()
    fleet.reconcile({"support-bot": source(D2)})
    fleet.agents_sync()
    fleet.reconcile({"support-bot": source(D2)})
    fleet.serve(v(D2), 10)
    fleet.tick(600)
    fleet.reconcile({"support-bot": source(D2)})
    assert fleet.record()["stepIndex"] == 1 and fleet.record()["analysis"]["last"]["outcome"] == "Wait"


def test_immediate_strategy_switches_every_pod_then_promotes():
    adep = adapterdeployment()
    adep["spec"]["strategy"] = {"type": "Immediate", "unloadGraceSeconds": 0}
    fleet = rolled_out_fleet(adep)
    fleet.reconcile({"support-bot": source(D2)})
    assert fleet.weights() == {v(D1): 0, v(D2): 100}  # the old one serves where the new is not loaded yet
    fleet.agents_sync()
    fleet.reconcile({"support-bot": source(D2)})
    assert fleet.record()["stable"]["digest"] == D2 and fleet.weights() == {v(D2): 100}  # no grace: unloaded


def test_preflight_refusals_never_touch_the_pods():
    cases = [
        (source(D2, rank=128), "RankTooHigh", {"managed": {"replicas": 2, "maxLoraRank": 64}}),
        (source(D2, base_model={"uri": "hf://mistralai/Mistral-7B-v0.1"}), "BaseModelMismatch", None),
        (source(D2, problems=(("ManifestMissing", "no manifest at s3://x"),)), "ManifestMissing", None),
    ]
    for candidate, reason, runtime in cases:
        adep = canary_adep()
        if runtime:
            adep["spec"]["runtime"] = runtime
        fleet = rolled_out_fleet(adep)
        fleet.reconcile({"support-bot": candidate})
        assert "canary" not in fleet.record() and fleet.weights() == {v(D1): 100}, reason
        validated = fleet.condition("Validated")
        assert validated["status"] == "False" and validated["reason"] == reason
        assert fleet.record()["refused"]["reason"] == reason
        assert any(e.reason == reason and e.type == "Warning" for e in fleet.events)


def test_sources_outside_the_namespaces_allowed_prefixes_are_refused():
    fleet = Fleet(canary_adep())
    fleet.settings = adp.Settings(allowed_sources={NS: ("s3://team-a-adapters/",)})
    fleet.reconcile({"support-bot": source(D1)})
    assert fleet.condition("Validated")["reason"] == "SourceNotAllowed" and fleet.desired.adapters == []
    fleet.settings = adp.Settings(allowed_sources={"*": ("s3://adapters/",)})
    fleet.reconcile({"support-bot": source(D1)})
    assert fleet.condition("Validated")["status"] == "True" and fleet.weights() == {v(D1): 100}


def test_uri_source_digest_must_match_the_manifest():
    adep = canary_adep()
    adep["spec"]["adapters"] = [{"name": "support-bot", "source": {"uri": "s3://adapters/x/manifest.json",
                                                                   "digest": D3}}]
    fleet = Fleet(adep)
    fleet.reconcile({"support-bot": source(D1)})
    assert fleet.condition("Validated")["reason"] == "DigestMismatch"


def test_agent_refusal_is_reported_per_pod_and_degrades():
    fleet = rolled_out_fleet()
    fleet.refuse.add(v(D2))
    fleet.reconcile({"support-bot": source(D2)})
    fleet.agents_sync()
    fleet.reconcile({"support-bot": source(D2)})
    record = fleet.record()
    assert record["stepIndex"] == 0 and record["podsReady"] == 0  # never loaded anywhere: the step waits
    assert {e["pod"] for e in record["podErrors"]} == {"pod-0", "pod-1"}
    assert record["podErrors"][0]["reason"] == "DigestMismatch"
    assert fleet.condition("Degraded")["reason"] == "AgentErrors"
    assert status_errors(fleet.adep["status"]) == []


def test_max_lora_rank_is_derived_from_the_adapters_within_vllms_values():
    spec = {"runtime": {"managed": {}}}
    assert adp.runtime_max_rank(spec, [4, 12]) == 16
    assert adp.runtime_max_rank(spec, [300]) == 320
    assert adp.runtime_max_rank(spec, [1024]) is None
    assert adp.runtime_max_rank({"runtime": {"selector": {"maxLoraRank": 32}}}, [4]) == 32


def test_window_survives_an_agent_restart_and_quantiles_come_from_buckets():
    buckets = [0] * (len(serving.LATENCY_BUCKETS) + 1)
    buckets[3] = 90
    buckets[6] = 10
    report = {"started": "t1", "metrics": {"x": {"requests": 100, "errors": 2, "latency_buckets": buckets,
                                                  "confidence_sum": 80.0, "confidence_count": 100}}}
    before = analysis.snapshot({"p": report}, "x")
    restarted = copy.deepcopy(report)
    restarted["started"] = "t2"
    restarted["metrics"]["x"]["requests"] = 30  # counters began again
    window = analysis.window({"p": restarted}, "x", before)
    assert window.requests == 30  # not 30 - 100
    full = analysis.window({"p": report}, "x", {})
    assert full.requests == 100 and full.error_rate == 0.02 and full.mean_confidence == 0.8
    assert full.latency_quantile(0.5) == serving.LATENCY_BUCKETS[3]
    assert full.latency_quantile(0.95) == serving.LATENCY_BUCKETS[6]
    assert analysis.Window().latency_quantile(0.95) is None


def test_max_lora_rank_never_shrinks_below_a_version_still_served():
    adep = {"spec": {"runtime": {"managed": {}}}, "status": {"adapters": [
        {"name": "a", "stable": {"rank": 64}, "retiring": [{"rank": 128}]}]}}
    ranks = adp.served_ranks(adep, {"a": source(D2, rank=8)})
    assert sorted(ranks) == [8, 64, 128] and adp.runtime_max_rank(adep["spec"], ranks) == 128

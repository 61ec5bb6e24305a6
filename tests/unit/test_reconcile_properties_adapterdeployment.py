"""Properties (hypothesis, derandomized) of the AdapterDeployment state machine and of `validate`: whatever
the spec, the sources and the agents' reports (any JSON in a Pod annotation) hold, `decide` returns a plan
and writes a status the API server accepts. Then the bugs the properties found, as plain examples."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kubetune.api import serving
from kubetune.api import v1alpha1 as api
from kubetune.api.validation import validate
from kubetune_operator.reconcile import adapterdeployment as adp
from tests.unit.reconcile_properties import (
    ADEP_STATUS_SCHEMA,
    ANY_JSON,
    DIGESTS,
    NOW,
    NS,
    PROPERTIES,
    TIMES,
    assert_writable,
)

# --- AdapterDeployment --------------------------------------------------------------------------------------


ANALYSIS_STEP = st.fixed_dictionaries({}, optional={"windowSeconds": st.integers(10, 600),
                                                    "minRequests": st.integers(1, 50),
                                                    "maxErrorRateIncrease": st.floats(0, 1),
                                                    "maxLatencyRatio": st.floats(1, 3),
                                                    "maxConfidenceDrop": st.floats(0, 1)})
STEPS = st.lists(st.one_of(st.builds(lambda w: {"setWeight": w}, st.integers(0, 100)),
                           st.builds(lambda s: {"pause": {"seconds": s}}, st.integers(1, 120)),
                           st.builds(lambda a: {"analysis": a}, ANALYSIS_STEP)), min_size=1, max_size=5)
ADAPTER_NAMES = ("support-bot", "intents", "sql")


@st.composite
def adep_specs(draw) -> dict:
    names = draw(st.lists(st.sampled_from(ADAPTER_NAMES), min_size=1, max_size=3, unique=True))
    adapters = []
    for name in names:
        source = {"fineTuneJobRef": {"name": f"{name}-job"}}
        if draw(st.integers(0, 3)) == 2:
            source = {"uri": "s3://adapters/x/manifest.json", "digest": draw(st.sampled_from(DIGESTS))}
        adapters.append({"name": name, "source": source})
    managed = {"replicas": draw(st.integers(0, 3))}
    if draw(st.booleans()):
        managed["maxLoraRank"] = draw(st.sampled_from([8, 16, 64]))
    runtime = {"managed": managed} if draw(st.booleans()) else {"selector": {"matchLabels": {"app": "vllm"}}}
    strategy = {"type": draw(st.sampled_from(["Immediate", "Canary"])),
                "unloadGraceSeconds": draw(st.sampled_from([0, 60]))}
    if strategy["type"] == "Canary" or draw(st.booleans()):
        strategy["canary"] = {"steps": draw(STEPS)}
    spec = {"baseModel": {"uri": "hf://org/model", "revision": "main"}, "runtime": runtime, "adapters": adapters,
            "strategy": strategy}
    if draw(st.booleans()):
        spec["trafficSampling"] = {"rate": draw(st.floats(0, 1)), "uri": "s3://samples/p"}
    return spec


def versions(name: str) -> st.SearchStrategy:
    return st.builds(lambda d, r: {"version": serving.version_name(NS, name, d), "digest": d,
                                   "manifestUri": f"s3://adapters/{d[7:15]}/manifest.json", "rank": r},
                     st.sampled_from(DIGESTS), st.sampled_from([8, 16, 64]))


POD_METRICS = st.fixed_dictionaries({}, optional={
    "requests": st.integers(0, 10_000), "errors": st.integers(0, 100),
    "latency_buckets": st.lists(st.integers(0, 1000), max_size=len(serving.LATENCY_BUCKETS) + 1),
    "confidence_sum": st.floats(0, 10_000), "confidence_count": st.integers(0, 10_000)})


@st.composite
def adep_records(draw, name: str, steps: int) -> dict:
    record: dict = {"name": name, "alias": serving.alias_name(NS, name)}
    if draw(st.integers(0, 4)) != 3:
        record["stable"] = draw(versions(name))
    if draw(st.booleans()):
        record["canary"] = draw(versions(name))
        record["canaryWeight"] = draw(st.integers(0, 100))
        record["stepIndex"] = draw(st.integers(0, steps + 1))
        record["stepStartTime"] = draw(TIMES)
        if draw(st.booleans()):
            pods = st.dictionaries(st.sampled_from(["pod-0", "pod-1"]), POD_METRICS.map(
                lambda m: {"started": "2026-11-28T10:00:00Z", **m}), max_size=2)
            record["analysis"] = {"step": record["stepIndex"], "startTime": draw(TIMES),
                                  "stable": draw(pods), "canary": draw(pods)}
    if draw(st.booleans()):
        record["retiring"] = [{**draw(versions(name)), "unloadAfter": draw(TIMES)}]
    if draw(st.booleans()):
        digest = draw(st.sampled_from(DIGESTS))
        record["rolledBack"] = {"digest": digest, "version": serving.version_name(NS, name, digest),
                                "reason": "AnalysisFailed", "metric": "error-rate", "time": draw(TIMES),
                                "message": f"{name}: canary rolled back: canary error rate 0.100 vs stable 0.000"}
    return record


GOOD_SOURCES = st.builds(adp.Source, manifest_uri=st.just("s3://adapters/x/manifest.json"),
                         digest=st.sampled_from(DIGESTS), rank=st.sampled_from([8, 16]),
                         base_model=st.just({"uri": "hf://org/model", "revision": "main"}))
ODD_SOURCES = st.builds(
    adp.Source, manifest_uri=st.sampled_from(["s3://adapters/x/manifest.json", "s3://elsewhere/m.json"]),
    digest=st.sampled_from(DIGESTS), rank=st.sampled_from([None, 4, 16, 64, 600]),
    base_model=st.one_of(st.none(), st.just({"uri": "hf://org/model", "revision": "main"}),
                         st.just({"uri": "hf://org/other"}), st.just({"uri": "hf://org/model", "revision": "v2"})))
UNRESOLVED = st.builds(adp.Source, problems=st.just((("FineTuneJobNotReady", "not published yet"),)))


def sources() -> st.SearchStrategy:
    """Mostly sources that pass preflight; one in five is refused or odd."""
    return st.integers(0, 9).flatmap(lambda n: {3: UNRESOLVED, 6: ODD_SOURCES}.get(n, GOOD_SOURCES))


@st.composite
def agent_reports(draw, names: list[str]) -> object:
    """A Pod's agent report: None, any JSON at all, or report-shaped with random versions and counters."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return None
    if kind == 1:
        return draw(ANY_JSON)
    served = [(serving.version_name(NS, n, d), d) for n in names for d in DIGESTS]
    version_names = st.one_of(st.sampled_from([v for v, _ in served]), st.text(max_size=10))
    anything = draw(st.integers(0, 3)) == 0
    counters = ANY_JSON if anything else POD_METRICS
    return {"api": serving.REPORT_API, "generation": draw(st.integers(-1, 5)), "engine_ready": draw(st.booleans()),
            "started": draw(st.sampled_from(["2026-11-28T10:00:00Z", "2026-11-28T11:00:00Z"])), "updated": NOW,
            "loaded": draw(st.one_of(st.lists(st.sampled_from(served), max_size=4).map(dict),
                                     st.dictionaries(version_names, st.sampled_from(DIGESTS), max_size=3),
                                     ANY_JSON if anything else st.just({}))),
            "errors": draw(st.one_of(st.dictionaries(version_names, st.fixed_dictionaries(
                {"reason": st.text(max_size=8), "message": st.text(max_size=20)}), max_size=2),
                ANY_JSON if anything else st.just({}))),
            "metrics": draw(st.dictionaries(version_names, counters, max_size=3))}


@st.composite
def adep_observations(draw) -> tuple[adp.Observed, adp.Settings]:
    spec = draw(adep_specs())
    adep = {"apiVersion": api.API_VERSION, "kind": "AdapterDeployment",
            "metadata": {"name": "support", "namespace": NS, "generation": draw(st.integers(1, 4))}, "spec": spec}
    result = validate(adep)
    assert result.ok, result.errors
    adep["spec"] = result.defaulted["spec"]
    names = [a["name"] for a in spec["adapters"]]
    steps = len((spec["strategy"].get("canary") or {}).get("steps") or [])
    if draw(st.booleans()):
        # names of adapters removed from the spec may still have records
        recorded = names if draw(st.booleans()) else draw(st.lists(st.sampled_from(ADAPTER_NAMES), max_size=3,
                                                                    unique=True))
        adep["status"] = {"observedGeneration": 1, "conditions": [],
                          "adapters": [draw(adep_records(n, steps)) for n in recorded]}
    resolved = {n: draw(sources()) for n in names if draw(st.integers(0, 9)) != 4}
    if draw(st.booleans()):
        pods = [adp.Pod(f"pod-{i}", draw(st.booleans()), draw(agent_reports(names)))
                for i in range(draw(st.integers(0, 3)))]
    else:  # a fleet that loaded every version in sight and served traffic on each: rollouts move on
        versions_seen = {serving.version_name(NS, n, s.digest): s.digest for n, s in resolved.items() if s.digest}
        for record in (adep.get("status") or {}).get("adapters") or []:
            versions_seen.update({v["version"]: v["digest"] for v in (record.get("stable"), record.get("canary")) if v})
        pods = [adp.Pod(f"pod-{i}", True, {"started": "2026-11-28T10:00:00Z", "loaded": dict(versions_seen),
                                           "errors": {}, "metrics": {v: draw(POD_METRICS) for v in versions_seen}})
                for i in range(draw(st.integers(1, 3)))]
    desired = draw(st.one_of(st.none(), st.builds(serving.DesiredState, generation=st.integers(1, 9))))
    allowed = {2: {NS: ["s3://adapters/", "hf://"]}, 5: {"*": ["s3://elsewhere/"]}}.get(draw(st.integers(0, 9)), {})
    return adp.Observed(adep=adep, now=NOW, sources=resolved, pods=pods, desired=desired), adp.Settings(allowed)


@PROPERTIES
@given(adep_observations())
def test_adapterdeployment_decide_never_raises(observation):
    observed, adp_settings = observation
    plan = adp.decide(observed, adp_settings)
    assert isinstance(plan, adp.Plan)
    assert_writable(plan.status, ADEP_STATUS_SCHEMA)
    assert [r["name"] for r in plan.status["adapters"]] == [a["name"] for a in observed.adep["spec"]["adapters"]]
    assert plan.requeue_after is not None and plan.requeue_after > 0
    assert all(isinstance(e.message, str) and isinstance(e.reason, str) for e in plan.events)
    if plan.desired is not None:
        state = serving.DesiredState.from_json(plan.desired.to_json())
        assert state.generation >= 1
        for alias in state.adapters:
            assert alias.alias.startswith(f"{NS}/")
            assert all(0 <= v.weight <= 100 for v in alias.versions)
            live = [v for v in alias.versions if v.role in ("stable", "canary")]
            assert sum(v.weight for v in live) == 100 or not any(v.role == "stable" for v in live)


@PROPERTIES
@given(st.sampled_from(sorted(api.KINDS)), st.one_of(ANY_JSON, st.dictionaries(
    st.sampled_from(["baseModel", "runtime", "adapters", "strategy", "dataset", "method", "training", "output"]),
    ANY_JSON)), st.one_of(st.just({"name": "x", "namespace": NS}), ANY_JSON))
def test_validate_never_raises(kind, spec, metadata):
    """`validate` is the gate before either `decide` (and the CLI's): any object gets errors, not an exception."""
    result = validate({"apiVersion": api.API_VERSION, "kind": kind, "metadata": metadata, "spec": spec})
    assert result.ok or all(isinstance(e.path, str) and isinstance(e.message, str) for e in result.errors)




def test_malformed_agent_reports_do_not_stop_a_rollout():
    """Reports are Pod annotations: any JSON. A malformed one counts as no report; its well-typed parts count, and
    NaN counters never reach the status (the analysis step snapshots them there)."""
    spec = {"baseModel": {"uri": "hf://org/model"}, "runtime": {"selector": {"matchLabels": {"app": "vllm"}}},
            "adapters": [{"name": "support-bot", "source": {"fineTuneJobRef": {"name": "j"}}}],
            "strategy": {"type": "Canary", "canary": {"steps": [{"analysis": {}}, {"setWeight": 100}]}}}
    adep = {"apiVersion": api.API_VERSION, "kind": "AdapterDeployment",
            "metadata": {"name": "support", "namespace": NS, "generation": 1}, "spec": validate(
                {"apiVersion": api.API_VERSION, "kind": "AdapterDeployment", "metadata": {"name": "support"},
                 "spec": spec}).defaulted["spec"]}
    old, new = (serving.version_name(NS, "support-bot", d) for d in DIGESTS[:2])
    adep["status"] = {"adapters": [{"name": "support-bot", "stable": {
        "version": old, "digest": DIGESTS[0], "manifestUri": "s3://adapters/a/manifest.json", "rank": 8}}]}
    nan_counters = {"requests": 10, "confidence_sum": float("nan"), "confidence_count": 10}
    reports = [True, [], "report", {"loaded": ["x"], "errors": {old: "boom"}, "metrics": []},
               {"loaded": {old: DIGESTS[0], new: DIGESTS[1]}, "errors": {new: {"reason": 7}},
                "metrics": {old: nan_counters, new: nan_counters}, "started": "2026-11-28T10:00:00Z"}]
    source = adp.Source(manifest_uri="s3://adapters/b/manifest.json", digest=DIGESTS[1], rank=8,
                        base_model={"uri": "hf://org/model", "revision": "main"})
    plan = adp.decide(adp.Observed(adep=adep, now=NOW, sources={"support-bot": source},
                                   pods=[adp.Pod(f"pod-{i}", True, r) for i, r in enumerate(reports)]), adp.Settings())
    record = plan.status["adapters"][0]
    assert record["canary"]["digest"] == DIGESTS[1] and record["analysis"]["step"] == 0
    assert record["analysis"]["canary"] == {"pod-4": {"started": "2026-11-28T10:00:00Z", "requests": 10,
                                                      "confidence_count": 10}}
    assert record["podErrors"] == [{"pod": "pod-4", "version": new, "reason": "7", "message": ""}]
    assert_writable(plan.status, ADEP_STATUS_SCHEMA)

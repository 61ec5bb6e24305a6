"""Property-based tests (hypothesis) of the two state machines: whatever the spec, the children, the
trainer's files and the agents' reports hold, `decide()` returns a plan (never raises), every child it
asks for has its deterministic name, labels and owner, and the status it writes is what the API server
accepts (JSON without NaN or Infinity, which `json.dumps(..., allow_nan=False)` refuses as the API server
does, and within the CRD's status schema).

Inputs are of two kinds: well-shaped objects with random values (mostly valid specs, PyTorchJobs with
random conditions, status as the operator writes it), and garbage where it can really come from: files
the trainer writes to storage (progress.json, result.json, manifest metrics: any JSON, NaN included,
which Python's json module reads) and the agents' reports (any JSON in a Pod annotation anyone who can
patch Pods can write). A spec of any shape makes a FineTuneJob fail with InvalidSpec; an AdapterDeployment's
spec is validated before its `decide` (the controller's gate, `validate`, is checked on garbage too).

Derandomized, so CI runs the same examples every time.
"""

from __future__ import annotations

import copy
import json
import re

import jsonschema
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubetune.api import jobconfig, serving
from kubetune.api import manifest as manifest_api
from kubetune.api import progress as progress_api
from kubetune.api import v1alpha1 as api
from kubetune.api.schema import strict_json_schema
from kubetune.api.validation import root_schema, validate
from kubetune.backends import pytorchjob
from kubetune.reconcile import adapterdeployment as adp
from kubetune.reconcile import conditions as cond
from kubetune.reconcile import finetunejob as ftj
from kubetune.reconcile.finetunejob_plan import Plan, StageReport
from kubetune.render import training as render

PROPERTIES = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

NS = "team-a"
NOW = "2026-11-28T12:00:00Z"
TIMES = st.sampled_from(["2026-11-28T11:00:00Z", "2026-11-28T11:59:30Z", NOW, "2026-11-28T12:00:30Z",
                         "2026-11-20T00:00:00Z"])
DIGESTS = tuple("sha256:" + c * 64 for c in "abc")
RANKS = (4, 8, 16, 32, 64)
FTJ_STATUS_SCHEMA = jsonschema.Draft4Validator(strict_json_schema(root_schema("FineTuneJob")["properties"]["status"]))
ADEP_STATUS_SCHEMA = jsonschema.Draft4Validator(
    strict_json_schema(root_schema("AdapterDeployment")["properties"]["status"]))

# --- any JSON (what json.loads gives for a file or an annotation; Python reads NaN and Infinity too) ------------

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(), st.text(max_size=12))
ANY_JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                        max_leaves=12)
NUMBERISH = st.one_of(st.floats(), st.integers(-5, 10**6), st.none(), st.text(max_size=6), st.booleans(),
                      st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.5, 2.0]))
METRIC_NAMES = st.sampled_from(["eval_loss", "accuracy", "macro_f1", "perplexity", "loss", ""])
GARBAGE_METRICS = st.one_of(ANY_JSON, st.dictionaries(METRIC_NAMES, NUMBERISH, max_size=4))
FINITE = st.floats(min_value=0, max_value=100, allow_nan=False, allow_infinity=False)


def status_errors(validator: jsonschema.Draft4Validator, status: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(status)]


def pruned(value: object) -> object:
    """The API server prunes null fields (not `nullable`) before it validates, as a merge patch drops them."""
    if isinstance(value, dict):
        return {k: pruned(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [pruned(v) for v in value]
    return value


def assert_writable(status: dict, validator: jsonschema.Draft4Validator) -> None:
    """What the API server's status subresource would accept."""
    json.dumps(status, allow_nan=False)  # ValueError on NaN/Infinity anywhere
    assert status_errors(validator, pruned(status)) == []


# --- FineTuneJob --------------------------------------------------------------------------------------------


@st.composite
def ftj_specs(draw) -> dict:
    """Specs shaped like real ones with random choices: most are valid, some break a CEL or semantic rule."""
    task = draw(st.sampled_from(api.TASKS))
    fmt = "text-label" if task == "SequenceClassification" else draw(st.sampled_from(api.DATASET_FORMATS[:3]))
    method = draw(st.sampled_from(api.METHODS))
    gpus = draw(st.sampled_from([1, 8] if method == "QLoRA" else [0, 1, 8]))
    spec: dict = {
        "baseModel": {"uri": "hf://org/model"},
        "task": task,
        "dataset": {"uri": "s3://data/train.jsonl", "format": fmt,
                    "validationSplit": {5: 0, 6: 0.5}.get(draw(st.integers(0, 9)), 0.1)},
        "method": {"type": method},
        "training": {"perDeviceBatchSize": draw(st.integers(1, 8))},
        "distributed": {"nodes": draw(st.integers(1, 3)), "gpusPerNode": gpus,
                        "deepspeed": {"enabled": gpus > 0 and method != "FreezeThaw" and draw(st.booleans())}},
        "output": {"uri": "s3://adapters/team-a", "credentials": {"secretName": "s3-creds"}},
    }
    if method in ("LoRA", "QLoRA"):
        spec["method"]["lora"] = {"rank": draw(st.sampled_from(RANKS)), "alpha": draw(st.sampled_from([8, 16, 32]))}
    if method == "QLoRA":
        spec["method"]["quantization"] = {}
    if method == "FreezeThaw":
        spec["method"]["freezeThaw"] = {"initialTrainableBlocks": draw(st.integers(0, 3))}
    if draw(st.booleans()):
        spec["training"]["epochs"] = draw(st.sampled_from([0.5, 1, 3]))
    else:
        spec["training"]["maxSteps"] = draw(st.integers(1, 1000))
    if draw(st.booleans()):
        metric = draw(st.sampled_from(["eval_loss", "accuracy"] if task == "SequenceClassification"
                                      else ["eval_loss", "perplexity"]))
        spec["baseline"] = {"target": {"metric": metric, "value": draw(st.floats(0, 1))},
                            "forceTraining": draw(st.booleans())}
    if method in ("LoRA", "QLoRA") and draw(st.booleans()):
        spec["rankSweep"] = {"ranks": draw(st.lists(st.sampled_from(RANKS), min_size=2, max_size=4, unique=True)),
                             "parallelism": draw(st.integers(1, 3)),
                             "tieTolerance": draw(st.sampled_from([0, 0.01]))}
    if draw(st.booleans()):
        spec["runPolicy"] = {"suspend": draw(st.booleans())}
    return spec


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))


@st.composite
def mutated(draw, specs) -> dict:
    """A spec with one field replaced by any JSON, or removed."""
    spec = copy.deepcopy(draw(specs))
    paths = [p for p in _paths(spec) if p]
    path = draw(st.sampled_from(paths))
    node = spec
    for key in path[:-1]:
        node = node[key]
    if draw(st.booleans()):
        del node[path[-1]]
    else:
        node[path[-1]] = draw(ANY_JSON)
    return spec


def condition(kind: str) -> st.SearchStrategy:
    return st.fixed_dictionaries({"type": st.just(kind), "status": st.sampled_from(["True", "False", "Unknown"]),
                                  "reason": st.text(max_size=8), "message": st.text(max_size=20),
                                  "lastTransitionTime": TIMES, "observedGeneration": st.integers(1, 5)})


CONDITIONS = st.lists(st.sampled_from(ftj.CONDITION_TYPES).flatmap(condition), max_size=4,
                      unique_by=lambda c: c["type"])
FINITE_METRICS = st.dictionaries(st.sampled_from(["eval_loss", "accuracy", "macro_f1", "perplexity"]), FINITE,
                                 max_size=3)


@st.composite
def ftj_status(draw, name: str) -> dict | None:
    """A status as the operator could have written it (the API server keeps it within the schema)."""
    if draw(st.integers(0, 3)) == 0:
        return None
    status: dict = {"observedGeneration": draw(st.integers(1, 5)), "conditions": draw(CONDITIONS)}
    phase = draw(st.sampled_from((None, *api.FINETUNEJOB_PHASES)))
    if phase:
        status["phase"] = phase
    if draw(st.booleans()):
        status["trainingJob"] = {"name": name, "configMap": f"{name}-config", "generation": draw(st.integers(1, 5))}
    if draw(st.booleans()):
        status["baseline"] = {"source": draw(st.sampled_from(["BaselineJob", "TrainingJob"])),
                              "job": f"{name}-baseline",
                              "state": draw(st.sampled_from(api.STAGE_STATES)), "metrics": draw(FINITE_METRICS)}
    if draw(st.booleans()):
        ranks = draw(st.lists(st.sampled_from(RANKS), max_size=4, unique=True))
        trials = []
        for rank in sorted(ranks):
            trial = {"rank": rank, "state": draw(st.sampled_from(api.TRIAL_STATES)), "alpha": 2 * rank,
                     "job": f"{name}-sweep-r{rank}"}
            if trial["state"] == "Succeeded" and draw(st.booleans()):
                trial["metric"] = draw(FINITE)
            trials.append(trial)
        status["sweep"] = {"trials": trials}
        if trials and draw(st.booleans()):
            status["sweep"]["bestRank"] = trials[0]["rank"]
    if draw(st.booleans()):
        status["completionTime"] = draw(TIMES)
    return status


def pytorchjobs(name: str, labels: dict | None = None) -> st.SearchStrategy:
    kinds = st.sampled_from(["Created", "Running", "Restarting", "Succeeded", "Failed", "Suspended", "Unknown"])
    pj_conditions = st.lists(kinds.flatmap(condition), max_size=3)
    replicas = st.dictionaries(st.sampled_from(["Master", "Worker"]),
                               st.dictionaries(st.sampled_from(["active", "succeeded", "failed"]),
                                               st.one_of(st.none(), st.integers(0, 5)), max_size=3), max_size=2)
    return st.fixed_dictionaries(
        {"metadata": st.just({"name": name, "namespace": NS, "labels": labels or {}}),
         "spec": st.fixed_dictionaries({"runPolicy": st.fixed_dictionaries({"suspend": st.booleans()})}),
         "status": st.fixed_dictionaries({"conditions": pj_conditions, "replicaStatuses": replicas},
                                         optional={"startTime": TIMES, "completionTime": TIMES})})


PROGRESS = st.one_of(
    st.none(), ANY_JSON,
    st.fixed_dictionaries(
        {"api": st.sampled_from([progress_api.PROGRESS_API, "other"])},
        optional={"stage": st.one_of(st.text(max_size=10), NUMBERISH), "step": NUMBERISH, "totalSteps": NUMBERISH,
                  "epoch": NUMBERISH, "trainLoss": NUMBERISH, "evalLoss": NUMBERISH, "tokensPerSecond": NUMBERISH,
                  "etaSeconds": NUMBERISH, "updateTime": st.one_of(TIMES, NUMBERISH), "evalMetrics": GARBAGE_METRICS,
                  "baselineMetrics": GARBAGE_METRICS,
                  "failure": st.one_of(ANY_JSON, st.fixed_dictionaries({"reason": st.text(max_size=10),
                                                                        "message": st.text(max_size=20)}))}))
RESULT = st.one_of(st.none(), ANY_JSON, st.fixed_dictionaries({}, optional={"metrics": GARBAGE_METRICS,
                                                                           "seconds": NUMBERISH}))
STAGE_REPORTS = st.builds(StageReport, result=RESULT, progress=PROGRESS)


@st.composite
def manifests(draw) -> manifest_api.ManifestCheck | None:
    if draw(st.booleans()):
        return None
    found = draw(st.booleans())
    problems = draw(st.lists(st.builds(manifest_api.ManifestProblem, st.sampled_from(["DigestMismatch",
                                                                                        "AdapterFileMissing"]),
                                       st.text(max_size=20)), max_size=2)) if found else []
    document = {"digest": draw(st.sampled_from(DIGESTS)), "files": [{"path": "adapter_model.safetensors",
                                                                     "size": 10, "sha256": "a" * 64}],
                "metrics": draw(GARBAGE_METRICS), "baselineMetrics": draw(GARBAGE_METRICS),
                "createdAt": draw(st.one_of(TIMES, st.none()))}
    return manifest_api.ManifestCheck(found=found, problems=problems, document=document if found else None,
                                      adapter_uri="s3://adapters/team-a/x/" if found else None)


@st.composite
def ftj_observations(draw, specs) -> ftj.Observed:
    # mostly valid names; one in ten breaks a name rule (too long for its children's names, or a child's name)
    name = {7: "b" * 60, 11: "support-baseline", 3: "j", 5: "a" * 45}.get(draw(st.integers(0, 19)), "llama-lora")
    job = {"apiVersion": api.API_VERSION, "kind": "FineTuneJob",
           "metadata": {"name": name, "namespace": NS, "uid": "uid-1", "generation": draw(st.integers(1, 5))},
           "spec": draw(specs)}
    status = draw(ftj_status(name))
    if status is not None:
        job["status"] = status
    if draw(st.integers(0, 19)) == 0:
        job["metadata"]["deletionTimestamp"] = NOW
    stage_jobs = {}
    stage_names = [render.stage_job_name(name, jobconfig.Stage(kind=jobconfig.STAGE_BASELINE))]
    stage_labels = [{render.LABEL_STAGE: jobconfig.STAGE_BASELINE}]
    for rank in RANKS:
        stage_names.append(render.stage_job_name(name, jobconfig.Stage(kind=jobconfig.STAGE_TRIAL, rank=rank)))
        stage_labels.append({render.LABEL_STAGE: jobconfig.STAGE_TRIAL, render.LABEL_RANK: str(rank)})
    for index in draw(st.lists(st.integers(0, len(stage_names) - 1), max_size=3, unique=True)):
        labels = stage_labels[index] if draw(st.integers(0, 4)) else {render.LABEL_STAGE: "trial",
                                                                      render.LABEL_RANK: "r?"}
        stage_jobs[stage_names[index]] = pytorchjob.read_status(draw(pytorchjobs(stage_names[index], labels)))
    reports = {n: draw(STAGE_REPORTS) for n in stage_names if draw(st.booleans())}
    return ftj.Observed(
        job=job, now=NOW,
        config_map=draw(st.one_of(st.none(), st.just({"metadata": {"name": render.config_map_name(name)}}))),
        workload=draw(st.one_of(st.none(), pytorchjobs(name).map(pytorchjob.read_status))),
        manifest=draw(manifests()),
        progress=draw(PROGRESS),
        stage_jobs=stage_jobs,
        stage_config_maps=frozenset(draw(st.lists(st.sampled_from([f"{n}-config" for n in stage_names]),
                                                  max_size=3))),
        stage_reports=reports,
    )


SETTINGS = ftj.Settings(publish_timeout_seconds=600)


def _started(job: dict) -> bool:
    status = job.get("status") or {}
    return bool(status.get("trainingJob")) or ftj._stages_started(status)


def check_finetunejob_plan(observed: ftj.Observed, plan: Plan) -> None:
    job = observed.job
    name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
    assert isinstance(plan, Plan)
    assert_writable(plan.status, FTJ_STATUS_SCHEMA)
    assert all(isinstance(e.message, str) and isinstance(e.reason, str) for e in plan.events)
    assert plan.requeue_after is None or plan.requeue_after > 0
    existing = {w.name for w in observed.stage_jobs.values()}
    existing |= {observed.workload.name} if observed.workload else set()
    existing_config_maps = set(observed.stage_config_maps)
    if observed.config_map:
        existing_config_maps.add(observed.config_map["metadata"]["name"])
    created = [(c["kind"], c["metadata"]["name"]) for c in plan.create]
    assert len(created) == len(set(created)), f"a child asked for twice: {created}"
    for child in plan.create:
        meta = child["metadata"]
        assert meta["namespace"] == namespace
        assert meta["ownerReferences"] == [render.owner_reference(job)]
        assert meta["labels"][render.LABEL_JOB] == name
        rank = meta["labels"].get(render.LABEL_RANK)
        stage = jobconfig.Stage(kind=meta["labels"][render.LABEL_STAGE], rank=int(rank) if rank else None)
        if child["kind"] == "PyTorchJob":
            assert meta["name"] == render.stage_job_name(name, stage)
            assert meta["name"] not in existing, f"{meta['name']} exists and would be created again"
        else:
            assert child["kind"] == "ConfigMap"
            assert meta["name"] == render.stage_config_map_name(name, stage)
            assert meta["name"] not in existing_config_maps, f"{meta['name']} exists and would be created again"
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", meta["name"]) and len(meta["name"]) <= 253


@PROPERTIES
@given(ftj_observations(st.one_of(ftj_specs(), ftj_specs(), ftj_specs(), mutated(ftj_specs()), ANY_JSON)))
def test_finetunejob_decide_never_raises(observed):
    plan = ftj.decide(observed, SETTINGS)
    check_finetunejob_plan(observed, plan)
    job = observed.job
    if job["metadata"].get("deletionTimestamp"):
        assert plan.create == []
        return
    phase = (job.get("status") or {}).get("phase")
    finished = phase in ftj.TERMINAL and (_started(job) or phase != "Failed")  # a finished record is final
    if finished or validate(job).ok:
        return
    if _started(job):  # the running stages or training go on; nothing new starts until the spec is fixed
        accepted = cond.find(plan.status.get("conditions"), "Accepted")
        assert accepted["status"] == "False" and accepted["reason"] == "InvalidSpecUpdate", plan.status
        assert plan.create == []
    else:
        assert_invalid_spec(plan)


def assert_invalid_spec(plan: Plan) -> None:
    accepted = cond.find(plan.status.get("conditions"), "Accepted")
    assert accepted and accepted["status"] == "False" and accepted["reason"] == "InvalidSpec", plan.status
    assert plan.status["phase"] == "Failed" and plan.status["failure"]["reason"] == "InvalidSpec"
    assert plan.create == [] and plan.suspend_workload is None and plan.suspend_stage_jobs == {}


@PROPERTIES
@given(st.one_of(ANY_JSON, st.dictionaries(st.sampled_from(list(api.FINETUNEJOB_SPEC["properties"])), ANY_JSON)),
       st.sampled_from(["llama-lora", "x" * 80]), st.integers(1, 3))
def test_finetunejob_garbage_spec_is_invalid_spec(spec, name, generation):
    """A spec of any shape on a job that has not started: InvalidSpec, nothing created, no exception."""
    job = {"apiVersion": api.API_VERSION, "kind": "FineTuneJob",
           "metadata": {"name": name, "namespace": NS, "uid": "uid-1", "generation": generation}, "spec": spec}
    result = validate(job)
    plan = ftj.decide(ftj.Observed(job=job, now=NOW), SETTINGS)
    check_finetunejob_plan(ftj.Observed(job=job, now=NOW), plan)
    if not result.ok:
        assert_invalid_spec(plan)


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


# --- the bugs the properties found, as plain examples ---------------------------------------------------------


def _sweeping_job() -> dict:
    """A job whose rank-4 trial ran and whose PyTorchJob is gone (TTL): its result.json decides."""
    spec = {"baseModel": {"uri": "hf://org/model"}, "dataset": {"uri": "s3://data/train.jsonl", "format": "chat"},
            "method": {"type": "LoRA", "lora": {"rank": 8}}, "training": {"maxSteps": 100},
            "distributed": {"nodes": 1, "gpusPerNode": 1}, "rankSweep": {"ranks": [4, 8]},
            "output": {"uri": "s3://adapters/team-a"}}
    return {"apiVersion": api.API_VERSION, "kind": "FineTuneJob",
            "metadata": {"name": "llama-lora", "namespace": NS, "uid": "uid-1", "generation": 1}, "spec": spec,
            "status": {"phase": "Sweeping", "sweep": {"trials": [
                {"rank": 4, "state": "Running", "alpha": 8, "job": "llama-lora-sweep-r4"},
                {"rank": 8, "state": "Queued", "alpha": 16, "job": "llama-lora-sweep-r8"}]}}}


def test_trial_result_with_nan_seconds_keeps_status_writable():
    result = {"metrics": {"eval_loss": 1.25}, "seconds": float("nan")}
    observed = ftj.Observed(job=_sweeping_job(), now=NOW,
                            stage_reports={"llama-lora-sweep-r4": StageReport(result=result)})
    plan = ftj.decide(observed, SETTINGS)
    trial = plan.status["sweep"]["trials"][0]
    assert trial["state"] == "Succeeded" and trial["metric"] == 1.25 and "durationSeconds" not in trial
    assert_writable(plan.status, FTJ_STATUS_SCHEMA)


def test_trainer_files_that_are_not_objects():
    """progress.json or result.json holding a list, a number or a string (a truncated or foreign file): read as
    empty objects (the trial reported no metric), never an AttributeError that stops every reconcile of the job."""
    for garbage in ([], [1, 2], True, 3, "done"):
        observed = ftj.Observed(job=_sweeping_job(), now=NOW, stage_reports={
            "llama-lora-sweep-r4": StageReport(result=garbage, progress=garbage)})
        plan = ftj.decide(observed, SETTINGS)
        trial = plan.status["sweep"]["trials"][0]
        assert trial["state"] == "Failed" and "reported no eval_loss" in trial["message"], garbage
        observed = ftj.Observed(job=_sweeping_job(), now=NOW, stage_reports={
            "llama-lora-sweep-r4": StageReport(result={"metrics": garbage})})
        assert ftj.decide(observed, SETTINGS).status["sweep"]["trials"][0]["state"] == "Failed"
        job = {**_sweeping_job(), "status": {"phase": "Running", "trainingJob": {"name": "llama-lora"}}}
        running = {"metadata": {"name": "llama-lora"}, "status": {"conditions": [
            {"type": "Running", "status": "True", "lastTransitionTime": NOW}]}}
        observed = ftj.Observed(job=job, now=NOW, workload=pytorchjob.read_status(running), progress=garbage)
        plan = ftj.decide(observed, SETTINGS)
        assert plan.status["phase"] == "Running"


def test_running_job_whose_spec_lost_its_shape():
    """A spec no API server with this CRD stores (output gone, runPolicy a string) on a job whose training
    started: InvalidSpecUpdate, the record stays as it is, no KeyError while following the PyTorchJob."""
    job = {**_sweeping_job(), "status": {"phase": "Running", "trainingJob": {"name": "llama-lora"}}}
    job["spec"] = {**job["spec"], "runPolicy": "suspend"}
    del job["spec"]["output"]
    for workload in (None, pytorchjob.read_status({"metadata": {"name": "llama-lora"}, "status": {"conditions": [
            {"type": "Succeeded", "status": "True", "lastTransitionTime": NOW}]}})):
        plan = ftj.decide(ftj.Observed(job=job, now=NOW, workload=workload, progress={"baselineMetrics": {}}),
                          SETTINGS)
        accepted = cond.find(plan.status["conditions"], "Accepted")
        assert accepted["reason"] == "InvalidSpecUpdate" and "spec.output: required field is missing" in \
            accepted["message"]
        assert plan.status["phase"] == "Running" and plan.create == []


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

"""Properties (hypothesis, derandomized) of the FineTuneJob state machine: whatever the spec, the children
and the trainer's files (any JSON, NaN included) hold, `decide` returns a plan, asks for each child by its
deterministic name, labels and owner, and writes a status the API server accepts. A spec of any shape
fails with InvalidSpec. Then the bugs the properties found, as plain examples."""

from __future__ import annotations

import copy
import re

from hypothesis import given
from hypothesis import strategies as st

from kubetune.api import jobconfig
from kubetune.api import manifest as manifest_api
from kubetune.api import progress as progress_api
from kubetune.api import v1alpha1 as api
from kubetune.api.v1alpha1 import dataset as dataset_api
from kubetune.api.v1alpha1 import finetunejob as ftj_api
from kubetune.api.v1alpha1 import finetunejob_status as ftj_status_api
from kubetune.api.validation import validate
from kubetune_operator.backends import pytorchjob
from kubetune_operator.reconcile import conditions as cond
from kubetune_operator.reconcile import finetunejob as ftj
from kubetune_operator.reconcile.finetunejob_plan import Plan, StageReport
from kubetune_operator.render import training as render
from tests.unit.reconcile_properties import (
    ANY_JSON,
    DIGESTS,
    FINITE,
    FTJ_STATUS_SCHEMA,
    GARBAGE_METRICS,
    NOW,
    NS,
    NUMBERISH,
    PROPERTIES,
    RANKS,
    TIMES,
    assert_writable,
)

# --- FineTuneJob --------------------------------------------------------------------------------------------


@st.composite
def ftj_specs(draw) -> dict:
    """Specs shaped like real ones with random choices: most are valid, some break a CEL or semantic rule."""
    task = draw(st.sampled_from(ftj_api.TASKS))
    fmt = "text-label" if task == "SequenceClassification" else draw(st.sampled_from(dataset_api.DATASET_FORMATS[:3]))
    method = draw(st.sampled_from(ftj_api.METHODS))
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
    phase = draw(st.sampled_from((None, *ftj_status_api.FINETUNEJOB_PHASES)))
    if phase:
        status["phase"] = phase
    if draw(st.booleans()):
        status["trainingJob"] = {"name": name, "configMap": f"{name}-config", "generation": draw(st.integers(1, 5))}
    if draw(st.booleans()):
        status["baseline"] = {"source": draw(st.sampled_from(["BaselineJob", "TrainingJob"])),
                              "job": f"{name}-baseline",
                              "state": draw(st.sampled_from(ftj_status_api.STAGE_STATES)),
                              "metrics": draw(FINITE_METRICS)}
    if draw(st.booleans()):
        ranks = draw(st.lists(st.sampled_from(RANKS), max_size=4, unique=True))
        trials = []
        for rank in sorted(ranks):
            trial = {"rank": rank, "state": draw(st.sampled_from(ftj_status_api.SWEEP_TRIAL_STATES)),
                     "alpha": 2 * rank, "learningRate": 1e-3, "rung": draw(st.integers(0, 2))}
            if trial["state"] != "Running" and draw(st.booleans()):
                trial["metric"] = draw(FINITE)
            trials.append(trial)
        status["sweep"] = {"trials": trials, "job": f"{name}-rank-sweep"}
        if draw(st.booleans()):
            status["sweep"]["state"] = draw(st.sampled_from(ftj_status_api.STAGE_STATES))
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
    stage_names.append(render.stage_job_name(name, jobconfig.Stage(kind=jobconfig.STAGE_SWEEP)))
    stage_labels.append({render.LABEL_STAGE: jobconfig.STAGE_SWEEP})
    for index in draw(st.lists(st.integers(0, len(stage_names) - 1), max_size=3, unique=True)):
        labels = stage_labels[index] if draw(st.integers(0, 4)) else {render.LABEL_STAGE: "trial"}
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
        stage = jobconfig.Stage(kind=meta["labels"][render.LABEL_STAGE])
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
@given(st.one_of(ANY_JSON, st.dictionaries(st.sampled_from(list(ftj_api.FINETUNEJOB_SPEC["properties"])), ANY_JSON)),
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




# --- the bugs the properties found, as plain examples ---------------------------------------------------------


def _sweeping_job() -> dict:
    """A job whose sweep ran and whose PyTorchJob is gone (TTL): its result.json decides."""
    spec = {"baseModel": {"uri": "hf://org/model"}, "dataset": {"uri": "s3://data/train.jsonl", "format": "chat"},
            "method": {"type": "LoRA", "lora": {"rank": 8}}, "training": {"maxSteps": 100},
            "distributed": {"nodes": 1, "gpusPerNode": 1}, "rankSweep": {"ranks": [4, 8]},
            "output": {"uri": "s3://adapters/team-a"}}
    return {"apiVersion": api.API_VERSION, "kind": "FineTuneJob",
            "metadata": {"name": "llama-lora", "namespace": NS, "uid": "uid-1", "generation": 1}, "spec": spec,
            "status": {"phase": "Sweeping", "data": {"state": "Succeeded", "job": "llama-lora-data"},
                       "sweep": {"job": "llama-lora-rank-sweep", "state": "Running"}}}


def test_sweep_result_with_nan_seconds_and_metrics_keeps_status_writable():
    rows = [{"rank": 4, "state": "Succeeded", "metric": 1.25, "rung": 0, "learningRate": 1e-3, "seconds": float("nan")},
            {"rank": 8, "state": "Stopped", "metric": float("nan"), "rung": 0, "learningRate": float("inf")}]
    result = {"trials": rows, "metrics": {"eval_loss": float("nan")}, "seconds": float("nan")}
    observed = ftj.Observed(job=_sweeping_job(), now=NOW,
                            stage_reports={"llama-lora-rank-sweep": StageReport(result=result)})
    plan = ftj.decide(observed, SETTINGS)
    sweep = plan.status["sweep"]
    assert sweep["state"] == "Succeeded" and sweep["bestRank"] == 4 and "durationSeconds" not in sweep
    assert sweep["trials"][1] == {"rank": 8, "state": "Stopped", "rung": 0}
    assert_writable(plan.status, FTJ_STATUS_SCHEMA)


def test_trainer_files_that_are_not_objects():
    """progress.json or result.json holding a list, a number or a string (a truncated or foreign file): read as
    empty objects (the sweep reported no table), never an AttributeError that stops every reconcile of the job."""
    for garbage in ([], [1, 2], True, 3, "done"):
        observed = ftj.Observed(job=_sweeping_job(), now=NOW, stage_reports={
            "llama-lora-rank-sweep": StageReport(result=garbage, progress=garbage)})
        plan = ftj.decide(observed, SETTINGS)
        assert plan.status["failure"]["reason"] == "SweepFailed", garbage
        observed = ftj.Observed(job=_sweeping_job(), now=NOW, stage_reports={
            "llama-lora-rank-sweep": StageReport(result={"trials": garbage})})
        assert ftj.decide(observed, SETTINGS).status["failure"]["reason"] == "SweepFailed"
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

"""The FineTuneJob state machine: observed state in, desired children + status + events out.

Pure: no I/O, no clock, no kopf. The operator's handlers and the local runner call `decide` with
what they observed and carry out the returned `Plan`. Level-based: the same observation always
gives the same plan, so reconciling twice, after a crash or from two triggers, is harmless.

Phases (informational; conditions carry the decisions):

    Baseline ──▶ Sweeping ──▶ Pending ──▶ Running ──▶ Publishing ──▶ Succeeded
       │            │            │  ▲        │  ▲          │
       ▼            ▼            ▼  │        ▼  │          ▼
    Skipped      Failed       Suspended ◀───┘  │        Failed   (also: invalid spec, baseline or
    (target met)  (all trials failed)                               training failed, a job lost,
                                                                    manifest missing for too long)

Baseline runs only when spec.baseline has a target (otherwise training's own first evaluation is the
baseline); Sweeping only with spec.rankSweep. Their state lives in status (status.baseline,
status.sweep.trials), and their PyTorchJobs have deterministic names, so an operator restart resumes
them: finished trials are never re-run, a running one is followed, never created twice.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from dataclasses import dataclass, field

from kubetune.api import jobconfig, storage_layout
from kubetune.api import manifest as manifest_api
from kubetune.api import progress as progress_api
from kubetune.api.methods import METHODS
from kubetune.api.schema import apply_defaults
from kubetune.api.validation import root_schema, structural_errors, validate
from kubetune.render import training as render

from . import conditions as cond
from . import secrets, stages, tenancy

TERMINAL = ("Succeeded", "Skipped", "Failed")
# Phases whose progress is followed closely (every progress_seconds). Not Pending: its pods have not
# started, so there is no progress to read, and the PyTorchJob's own events (watched) say when they do; the
# slower resync covers it. Following Pending jobs too made every queued job cost ~1 API request/s
# (BENCHMARKS.md, Scale).
ACTIVE = ("Baseline", "Sweeping", "Running")
CONDITION_TYPES = ("Accepted", "BaselineSufficient", "RankSelected", "Running", "Suspended", "Succeeded", "Failed",
                   "AdapterPublished", secrets.CONDITION)


@dataclass(frozen=True)
class Settings:
    render: render.RenderSettings = field(default_factory=render.RenderSettings)
    publish_timeout_seconds: int = 600  # how long a missing manifest may take to appear after success
    resync_seconds: float = 30.0
    progress_seconds: float = progress_api.WRITE_INTERVAL_SECONDS  # how often a running job's progress is read
    local: bool = False  # `kubetune local`: file:// outputs are allowed
    # namespace -> storage URI prefixes its FineTuneJobs may name ("*": every namespace). Empty: no limit
    # (`--allowed-storage`, see reconcile.tenancy).
    allowed_storage: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Observed:
    job: dict  # the FineTuneJob as read from the API (with apiVersion/kind/metadata/spec/status)
    now: str  # RFC 3339, injected so decisions are reproducible
    config_map: dict | None = None
    pytorchjob: dict | None = None
    manifest: manifest_api.ManifestCheck | None = None  # None: not looked at (see `needs_manifest`)
    progress: dict | None = None  # progress.json as the trainer last wrote it (see `needs_progress`)
    stage_jobs: dict = field(default_factory=dict)  # PyTorchJobs of the baseline and the trials, by name
    stage_config_maps: frozenset = frozenset()  # names of the stages' ConfigMaps that exist
    stage_reports: dict = field(default_factory=dict)  # name -> StageReport (see `needs_stage_reports`)
    # Secret name -> its keys (None: no such Secret), for the names `needs_secrets` asked for; None: not
    # looked at (`kubetune local` has no Secrets), nothing is checked.
    secrets: dict | None = None


@dataclass(frozen=True)
class StageReport:
    """What a baseline or trial job left in its storage prefix."""

    result: dict | None = None  # result.json: written last, so its presence means the stage finished
    progress: dict | None = None  # progress.json: carries the trainer's failure reason


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Plan:
    create: list[dict] = field(default_factory=list)
    patch_pytorchjob: dict | None = None  # merge patch for the existing PyTorchJob
    patch_stage_jobs: dict = field(default_factory=dict)  # stage PyTorchJob name -> merge patch
    status: dict = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None


# --- reading a PyTorchJob ----------------------------------------------------------------------------


def _pj_conditions(pytorchjob: dict | None) -> list[dict]:
    return ((pytorchjob or {}).get("status") or {}).get("conditions") or []


def _pj_condition(pytorchjob: dict | None, kind: str) -> dict | None:
    condition = cond.find(_pj_conditions(pytorchjob), kind)
    return condition if condition and condition.get("status") == "True" else None


def _replica_counts(pytorchjob: dict) -> dict:
    statuses = (pytorchjob.get("status") or {}).get("replicaStatuses") or {}
    return {
        replica: {k: int(v.get(k, 0) or 0) for k in ("active", "succeeded", "failed")}
        for replica, v in statuses.items()
        if isinstance(v, dict)
    }


def _attempts(replicas: dict) -> int:
    master = replicas.get("Master", {})
    return sum(master.values())


# --- the decision ------------------------------------------------------------------------------------


def needs_manifest(job: dict, pytorchjob: dict | None) -> bool:
    """Whether the shell should read the job's manifest.json before calling `decide`."""
    status = job.get("status") or {}
    if status.get("phase") in TERMINAL:
        return False
    if _pj_condition(pytorchjob, "Succeeded"):
        return True
    # Finished while the operator was away and the PyTorchJob was already removed by its TTL:
    # a verified manifest (written last, after training) proves success.
    return pytorchjob is None and bool(status.get("trainingJob"))


# PyTorchJob conditions that mean its pods started at some point (the training operator keeps a condition
# listed with status False once it no longer holds): before any of them, no trainer has written anything.
_STARTED_CONDITIONS = frozenset({"Running", "Restarting", "Succeeded", "Failed"})


def needs_progress(job: dict, pytorchjob: dict | None) -> bool:
    """Whether the shell should read the trainer's progress.json: while its PyTorchJob exists, its pods
    have started (only Created: nothing to read yet) and the job has not finished (a failed trainer leaves
    its reason there too)."""
    if pytorchjob is None or (job.get("status") or {}).get("phase") in TERMINAL:
        return False
    return any(c.get("type") in _STARTED_CONDITIONS for c in _pj_conditions(pytorchjob))


def _stage_entries(job: dict) -> dict[str, tuple[jobconfig.Stage, str | None]]:
    """Stage jobs the status knows about: name -> (stage, recorded state)."""
    status = job.get("status") or {}
    name = job["metadata"]["name"]
    out: dict[str, tuple[jobconfig.Stage, str | None]] = {}
    baseline = status.get("baseline") or {}
    if baseline.get("source") == "BaselineJob":
        stage = jobconfig.Stage(kind=jobconfig.STAGE_BASELINE)
        out[render.stage_job_name(name, stage)] = (stage, baseline.get("state"))
    for trial in (status.get("sweep") or {}).get("trials") or []:
        stage = jobconfig.Stage(kind=jobconfig.STAGE_TRIAL, rank=int(trial["rank"]))
        out[render.stage_job_name(name, stage)] = (stage, trial.get("state"))
    return out


def stage_of(job: dict, pytorchjob: dict) -> jobconfig.Stage | None:
    """The stage a child PyTorchJob runs, from its labels (None: the training job, or not a stage)."""
    labels = pytorchjob.get("metadata", {}).get("labels") or {}
    kind = labels.get(render.LABEL_STAGE)
    if kind == jobconfig.STAGE_BASELINE:
        return jobconfig.Stage(kind=kind)
    if kind == jobconfig.STAGE_TRIAL and str(labels.get(render.LABEL_RANK, "")).isdigit():
        return jobconfig.Stage(kind=kind, rank=int(labels[render.LABEL_RANK]))
    return None


def needs_stage_reports(job: dict, stage_jobs: dict) -> dict[str, str]:
    """Stage jobs whose result.json / progress.json the shell should read: name -> the stage's storage
    prefix. Those that finished (or vanished) and whose outcome the status has not recorded yet."""
    if (job.get("status") or {}).get("phase") in TERMINAL:
        return {}
    root = job_prefix(job)
    entries = _stage_entries(job)
    for name, pytorchjob in stage_jobs.items():
        stage = stage_of(job, pytorchjob)
        if stage is not None:
            entries.setdefault(name, (stage, None))
    wanted = {}
    for name, (stage, state) in entries.items():
        pytorchjob = stage_jobs.get(name)
        if state in stages.FINISHED or (state == stages.QUEUED and pytorchjob is None):
            continue
        if state == stages.QUEUED:
            state = None  # created, then the status write was lost: adopted like an unrecorded job
        finished = pytorchjob is not None and (_pj_condition(pytorchjob, "Succeeded") or
                                               _pj_condition(pytorchjob, "Failed"))
        if finished or (pytorchjob is None and state is not None):
            wanted[name] = jobconfig.stage_prefix(root, stage)
    return wanted


def needs_secrets(job: dict) -> list[str]:
    """The Secrets to read before deciding: every one the spec names, until the training job is created
    (and after, only while `SecretsFound` is False, to see it fixed). Not on every progress pass of a
    running job: those come every few seconds, and its pods already found their Secrets."""
    status = job.get("status") or {}
    if status.get("phase") in TERMINAL:
        return []
    problem = cond.find(status.get("conditions"), secrets.CONDITION)
    if status.get("trainingJob") and not (problem and problem.get("status") == "False"):
        return []
    return secrets.named_secrets(job.get("spec"))


def job_prefix(job: dict) -> str:
    meta = job["metadata"]
    return storage_layout.job_prefix(job["spec"]["output"]["uri"], meta["namespace"], meta["name"], meta["uid"])


def _seconds_between(start: str | None, end: str) -> float:
    if not start:
        return 0.0
    return (dt.datetime.fromisoformat(end.replace("Z", "+00:00"))
            - dt.datetime.fromisoformat(start.replace("Z", "+00:00"))).total_seconds()


class _Status:
    """Mutable builder of the new status, remembering the generation and the clock."""

    def __init__(self, job: dict, now: str):
        self.now = now
        self.generation = int(job["metadata"].get("generation", 1))
        self.value = _deep_copy(job.get("status") or {})
        self.value["observedGeneration"] = self.generation

    def condition(self, kind: str, status: bool, reason: str, message: str) -> None:
        self.value["conditions"] = cond.set_condition(
            self.value.get("conditions"), kind, status, reason, message, self.generation, self.now
        )

    def clear(self, kind: str, reason: str, message: str) -> None:
        """Set a condition False, but only if it was ever set (no noise on a fresh object)."""
        if cond.find(self.value.get("conditions"), kind):
            self.condition(kind, False, reason, message)

    def fail(self, reason: str, message: str) -> None:
        self.value["phase"] = "Failed"
        self.value["failure"] = {"reason": reason, "message": message}
        self.condition("Failed", True, reason, message)
        self.clear("Running", reason, "training is not running")
        self.value.setdefault("completionTime", self.now)


def _json_object(value: object) -> dict | None:
    """A file read from storage, as an object: absent (None) stays absent; JSON that is not an object
    (a list, a number: a truncated or foreign file) reads as an empty object."""
    return value if value is None or isinstance(value, dict) else {}


def _objects(observed: Observed) -> Observed:
    """The trainer's files (progress.json, the stages' result.json) are whatever JSON storage holds."""
    reports = {name: StageReport(result=_json_object(report.result), progress=_json_object(report.progress))
               for name, report in observed.stage_reports.items()}
    return dataclasses.replace(observed, progress=_json_object(observed.progress), stage_reports=reports)


def decide(observed: Observed, settings: Settings) -> Plan:
    observed = _objects(observed)
    job = observed.job
    plan = Plan()
    if job["metadata"].get("deletionTimestamp"):
        plan.status = _deep_copy(job.get("status") or {})
        return plan  # children go with the owner (ownerReferences); nothing to decide
    status = _Status(job, observed.now)
    before = (job.get("status") or {}).get("phase")
    _decide_into(observed, settings, plan, status)
    plan.status = status.value
    after = plan.status.get("phase")
    if after != before and after:
        plan.events.append(_phase_event(after, plan.status))
    if after not in TERMINAL and plan.requeue_after is None:
        running = after in ACTIVE
        plan.requeue_after = settings.progress_seconds if running else settings.resync_seconds
    return plan


def _stages_started(previous: dict) -> bool:
    baseline = previous.get("baseline") or {}
    if baseline.get("source") == "BaselineJob" and baseline.get("state"):
        return True
    return any(t.get("state") != stages.QUEUED for t in (previous.get("sweep") or {}).get("trials") or [])


def _decide_into(observed: Observed, settings: Settings, plan: Plan, status: _Status) -> None:
    job, pytorchjob = observed.job, observed.pytorchjob
    previous = job.get("status") or {}
    started = bool(previous.get("trainingJob"))
    stages_started = _stages_started(previous)

    phase = previous.get("phase")
    if phase in TERMINAL and (started or stages_started or phase != "Failed"):
        # The record of a finished run is final; children may be gone (TTL) and must not come back.
        if previous.get("observedGeneration") != status.generation:
            status.condition("Accepted", True, "Finished",
                             "the job has finished; spec changes take effect only in a new FineTuneJob")
        return

    result = validate(job, local=settings.local)
    # storage outside the namespace's prefixes (--allowed-storage, reconcile.tenancy)
    refused = tenancy.finetunejob_refusals(result.defaulted, settings.allowed_storage) if result.ok else []
    valid = result.ok and not refused
    if not result.ok:
        message = "; ".join(str(error) for error in result.errors)
        if started or stages_started:
            status.condition("Accepted", False, "InvalidSpecUpdate",
                             f"the updated spec is invalid and was not applied: {message}")
            if not started:
                return  # stage jobs already running go on; nothing new starts until the spec is fixed
            if any(error.message != "unknown field" for error in structural_errors("FineTuneJob", job)):
                return  # a spec of the wrong shape (no API server stores one) cannot even say where the adapter goes
            job = apply_defaults(root_schema("FineTuneJob"), job)  # as the API server stores it
        else:
            status.condition("Accepted", False, "InvalidSpec", message)
            status.fail("InvalidSpec", message)
            return
    elif refused:
        message = "; ".join(refused)
        if started or stages_started:
            status.condition("Accepted", False, "StorageNotAllowed",
                             f"the spec names storage this namespace may not use; nothing new starts: {message}")
            if not started:
                return  # as for an invalid update: what runs goes on, nothing new starts
        else:
            status.condition("Accepted", False, "StorageNotAllowed", message)
            status.fail("StorageNotAllowed", message)
            return
    else:
        job = {**job, "spec": result.defaulted["spec"]}
        spec = job["spec"]
        status.value["method"] = spec["method"]["type"]
        best_rank = (previous.get("sweep") or {}).get("bestRank")
        if METHODS[spec["method"]["type"]].has_lora_rank:
            if best_rank is not None:
                status.value["rank"] = best_rank
            elif not stages.sweep_requested(spec):
                status.value["rank"] = spec["method"]["lora"]["rank"]
        accepted_message = "spec is valid"
        if result.warnings:
            accepted_message += "; warnings: " + "; ".join(str(w) for w in result.warnings)
        created_from = (previous.get("trainingJob") or {}).get("generation")
        locked = started and created_from not in (None, status.generation)
        if locked:
            accepted_message = ("training has started: only runPolicy.suspend applies to the running job; other "
                                "spec changes take effect in a new FineTuneJob")
        status.condition("Accepted", True, "TrainingSpecLocked" if locked else "Validated", accepted_message)

    underway = started or stages_started or pytorchjob is not None or bool(observed.stage_jobs)
    if valid and observed.secrets is not None and _secrets_missing(observed, job, plan, status, underway):
        return

    if pytorchjob is None:
        if started:
            _follow_missing_pytorchjob(observed, job, settings, status)
            return
        if not _pre_training_stages(observed, settings, job, plan, status):
            return
        training_job, training_stage = _training_inputs(job, status.value)
        plan.create += render.render_children(training_job, settings.render, training_stage)
        if observed.config_map is not None:
            plan.create = [c for c in plan.create if c["metadata"]["name"] != observed.config_map["metadata"]["name"]]
        # a spec fixed after an InvalidSpec failure starts afresh
        status.value.pop("failure", None)
        status.value.pop("completionTime", None)
        status.clear("Failed", "SpecFixed", "the spec is valid now; training is starting")
        meta = job["metadata"]
        status.value["trainingJob"] = {
            "name": render.pytorchjob_name(meta["name"]),
            "configMap": render.config_map_name(meta["name"]),
            "generation": status.generation,
        }
        suspended = bool(job["spec"].get("runPolicy", {}).get("suspend"))
        status.value["phase"] = "Suspended" if suspended else "Pending"
        if suspended:
            status.condition("Suspended", True, "SuspendedBySpec", "spec.runPolicy.suspend is true")
        plan.events.append(Event("Normal", "Created",
                                 f"created PyTorchJob {status.value['trainingJob']['name']} and its job config"))
        return

    finished = _pj_condition(pytorchjob, "Succeeded") or _pj_condition(pytorchjob, "Failed")
    if observed.config_map is None and valid and not finished:
        training_job, training_stage = _training_inputs(job, status.value)
        plan.create = [render.render_config_map(training_job, stage=training_stage)]  # pods cannot start without it
    status.value.setdefault("trainingJob", {
        "name": pytorchjob["metadata"]["name"],
        "configMap": render.config_map_name(job["metadata"]["name"]),
    })
    _follow_pytorchjob(observed, job, settings, plan, status)


def _secrets_missing(observed: Observed, job: dict, plan: Plan, status: _Status, underway: bool) -> bool:
    """Report Secrets or keys the training pods reference but that do not exist (reconcile.secrets).
    True when nothing may start: the job waits in Pending (not failed: a GitOps sync may create the
    Secret a moment later). Pods already created are left alone; the condition says why they wait."""
    refs = secrets.secret_refs(render.trainer_env(job["spec"]))
    found = secrets.problem(refs, observed.secrets, job["metadata"]["namespace"])
    conditions, warning = secrets.report(status.value.get("conditions"), found, "training pods", status.generation,
                                         status.now)
    if conditions is not None:
        status.value["conditions"] = conditions
    if warning:
        plan.events.append(Event("Warning", warning.reason, warning.message))
    if found is None or underway:
        return False
    status.value["phase"] = status.value.get("phase") or "Pending"
    return True


def _training_inputs(job: dict, status: dict) -> tuple[dict, jobconfig.Stage]:
    """The spec the full run trains with (the sweep's rank) and its stage (the separate baseline's
    metrics, so the base model is not evaluated twice)."""
    spec = stages.training_spec(job["spec"], (status.get("sweep") or {}).get("bestRank"))
    baseline = status.get("baseline") or {}
    metrics = None
    if baseline.get("source") == "BaselineJob" and baseline.get("state") == stages.SUCCEEDED:
        metrics = dict(baseline.get("metrics") or {})
    return {**job, "spec": spec}, jobconfig.Stage(kind=jobconfig.STAGE_TRAIN, baseline_metrics=metrics)


# --- the stages before training ----------------------------------------------------------------------


def _pre_training_stages(observed: Observed, settings: Settings, job: dict, plan: Plan, status: _Status) -> bool:
    """Run the baseline gate and the rank sweep; True once training may start."""
    spec = job["spec"]
    if stages.baseline_gates(spec) and not _baseline_stage(observed, settings, job, plan, status):
        return False
    return not stages.sweep_requested(spec) or _sweep_stage(observed, settings, job, plan, status)


def _suspend_stage_job(plan: Plan, name: str, pytorchjob: dict, desired: bool) -> None:
    actual = bool(((pytorchjob.get("spec") or {}).get("runPolicy") or {}).get("suspend"))
    finished = _pj_condition(pytorchjob, "Succeeded") or _pj_condition(pytorchjob, "Failed")
    if actual != desired and not finished:
        plan.patch_stage_jobs[name] = {"spec": {"runPolicy": {"suspend": desired}}}


def _launch_stage(observed: Observed, settings: Settings, job: dict, stage_spec: dict, stage: jobconfig.Stage,
                  plan: Plan) -> str:
    stage_job = {**job, "spec": stage_spec}
    children = render.render_children(stage_job, settings.render, stage)
    plan.create += [c for c in children if c["kind"] != "ConfigMap"
                    or c["metadata"]["name"] not in observed.stage_config_maps]
    return children[1]["metadata"]["name"]


def _follow_stage(observed: Observed, settings: Settings, job: dict, stage_spec: dict, stage: jobconfig.Stage,
                  record: dict, plan: Plan) -> None:
    """Move a baseline or trial record along with its PyTorchJob (or, when the job is gone, its result)."""
    name = record["job"]
    pytorchjob = observed.stage_jobs.get(name)
    report = observed.stage_reports.get(name) or StageReport()
    if pytorchjob is None:
        if record.get("state") in (stages.PENDING, stages.RUNNING):
            if report.result is not None:  # finished, then removed by its TTL before we looked
                _stage_succeeded(record, report.result, observed.now)
            else:
                _stage_failed(record, "JobLost", f"PyTorchJob {name} was deleted before it finished", observed.now)
        return
    if record.get("state") in (None, stages.QUEUED):
        record["state"] = stages.PENDING  # adopted (its status write was lost): it exists, it is not queued
    config_map = render.stage_config_map_name(job["metadata"]["name"], stage)
    pj_status = pytorchjob.get("status") or {}
    if pj_status.get("startTime"):
        record["startTime"] = pj_status["startTime"]
    failed, succeeded = _pj_condition(pytorchjob, "Failed"), _pj_condition(pytorchjob, "Succeeded")
    if failed:
        message = failed.get("message") or "the PyTorchJob failed"
        trainer_failure = (report.progress or {}).get("failure")
        reason = "TrainingFailed"
        if isinstance(trainer_failure, dict) and trainer_failure.get("reason"):
            reason = str(trainer_failure["reason"])
            message = f"{trainer_failure.get('message', '')} ({message})"
        _stage_failed(record, reason, message, pj_status.get("completionTime") or observed.now)
        return
    if succeeded:
        completed = pj_status.get("completionTime") or succeeded.get("lastTransitionTime") or observed.now
        if report.result is not None:
            _stage_succeeded(record, report.result, completed)
        elif _seconds_between(completed, observed.now) >= settings.publish_timeout_seconds:
            _stage_failed(record, "ResultMissing", f"{name} succeeded but wrote no result.json within "
                          f"{settings.publish_timeout_seconds}s", completed)
        return
    if config_map not in observed.stage_config_maps:
        plan.create.append(render.render_config_map({**job, "spec": stage_spec}, stage=stage))
    running = _pj_condition(pytorchjob, "Running") or _pj_condition(pytorchjob, "Restarting")
    record["state"] = stages.RUNNING if running else stages.PENDING


def _stage_succeeded(record: dict, result: dict, completed: str) -> None:
    record["state"] = stages.SUCCEEDED
    record["metrics"] = manifest_api.numeric_metrics(result.get("metrics"))
    record["completionTime"] = completed
    _duration(record, result)
    record.pop("message", None)


def _stage_failed(record: dict, reason: str, message: str, completed: str) -> None:
    record["state"] = stages.FAILED
    record["message"] = f"{reason}: {message}"[:4000]
    record["completionTime"] = completed
    _duration(record, {})


def _duration(record: dict, result: dict) -> None:
    if record.get("startTime") and record.get("completionTime"):
        record["durationSeconds"] = max(0.0, _seconds_between(record["startTime"], record["completionTime"]))
    elif _seconds_value(result.get("seconds")):
        record["durationSeconds"] = float(result["seconds"])


def _seconds_value(value: object) -> bool:
    """A duration the status can hold: JSON from storage may carry NaN or Infinity, which no API server stores."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _baseline_stage(observed: Observed, settings: Settings, job: dict, plan: Plan, status: _Status) -> bool:
    spec, meta = job["spec"], job["metadata"]
    target = spec["baseline"]["target"]
    stage = jobconfig.Stage(kind=jobconfig.STAGE_BASELINE)
    name = render.stage_job_name(meta["name"], stage)
    record = dict(status.value.get("baseline") or {})
    record.update(source="BaselineJob", job=name, target=dict(target))
    before = record.get("state")
    suspended = bool(spec.get("runPolicy", {}).get("suspend"))
    pytorchjob = observed.stage_jobs.get(name)
    if before not in stages.FINISHED:
        if pytorchjob is not None or before is not None:
            _follow_stage(observed, settings, job, spec, stage, record, plan)
        elif not suspended:
            _launch_stage(observed, settings, job, spec, stage, plan)
            record["state"] = stages.PENDING
            plan.events.append(Event("Normal", "BaselineStarted",
                                     f"evaluating the base model on the validation split ({name})"))
        if pytorchjob is not None:
            _suspend_stage_job(plan, name, pytorchjob, suspended)
    status.value["baseline"] = record
    state = record.get("state")
    if state == stages.FAILED:
        status.fail("BaselineFailed", f"the base model could not be evaluated: {record.get('message', '')}")
        return False
    if state != stages.SUCCEEDED:
        _stage_phase(status, suspended, "Baseline", "the baseline evaluation is suspended")
        return False
    metrics = record.get("metrics") or {}
    met = stages.baseline_met(metrics, target)
    record["met"] = bool(met)
    record["summary"] = stages.baseline_summary(metrics, target, spec["task"])
    if before != stages.SUCCEEDED:
        plan.events.append(Event("Normal", "BaselineEvaluated", f"base model: {_metrics_text(metrics)}"))
    if met:
        message = (f"the base model already meets the target ({record['summary']}); training was skipped. "
                   "Set spec.baseline.forceTraining: true to train anyway")
        status.condition("BaselineSufficient", True, "TargetMet", message)
        status.value["phase"] = "Skipped"
        status.value.setdefault("completionTime", observed.now)
        return False
    reason = "BelowTarget" if met is not None else "MetricMissing"
    status.condition("BaselineSufficient", False, reason, f"the base model does not meet the target "
                     f"({record['summary']}): fine-tuning")
    return True


def _sweep_stage(observed: Observed, settings: Settings, job: dict, plan: Plan, status: _Status) -> bool:
    spec, meta = job["spec"], job["metadata"]
    sweep = spec["rankSweep"]
    metric = sweep["metric"]
    suspended = bool(spec.get("runPolicy", {}).get("suspend"))
    previous = {int(t["rank"]): t for t in (status.value.get("sweep") or {}).get("trials") or []}
    # Ranks added to the spec while the sweep runs join it; a trial that has started stays in it even when
    # its rank is removed (its job runs on, counts against parallelism and its result is still compared).
    launched = {rank for rank, t in previous.items() if t.get("state") != stages.QUEUED}
    launched |= {stage.rank for name, pj in observed.stage_jobs.items()
                 if (stage := stage_of(job, pj)) is not None and stage.kind == jobconfig.STAGE_TRIAL}
    trials = []
    for rank in sorted(set(stages.sweep_ranks(spec)) | launched):
        stage = stages.trial_stage(spec, rank)
        name = render.stage_job_name(meta["name"], stage)
        record = dict(previous.get(rank) or {"rank": rank, "state": stages.QUEUED})
        record.setdefault("alpha", stages.lora_alpha(spec, rank))
        record["job"] = name
        before = record["state"]
        pytorchjob = observed.stage_jobs.get(name)
        if before not in stages.FINISHED and (pytorchjob is not None or before != stages.QUEUED):
            _follow_stage(observed, settings, job, stages.trial_spec(spec, rank), stage, record, plan)
            if record["state"] == stages.SUCCEEDED and "metric" not in record:
                report = observed.stage_reports.get(name) or StageReport()
                value = stages.trial_metric(report.result, metric)
                if value is None:
                    _stage_failed(record, "MetricMissing", f"the trial reported no {metric}",
                                  record["completionTime"])
                else:
                    record["metric"] = value
        if pytorchjob is not None:
            _suspend_stage_job(plan, name, pytorchjob, suspended)
        if record["state"] != before:
            _trial_event(plan, record, metric)
        trials.append(record)
    if not suspended:
        for rank in stages.runnable(trials, sweep["parallelism"]):
            record = next(t for t in trials if t["rank"] == rank)
            _launch_stage(observed, settings, job, stages.trial_spec(spec, rank), stages.trial_stage(spec, rank),
                          plan)
            record["state"] = stages.PENDING
            plan.events.append(Event("Normal", "TrialStarted",
                                     f"rank {rank} (alpha {record['alpha']}): {record['job']}"))
    finished = all(t["state"] in stages.FINISHED for t in trials)
    best = stages.choose_rank(trials, metric, sweep["tieTolerance"]) if finished else None
    record = {
        "metric": metric,
        "trials": trials,
        "completed": sum(1 for t in trials if t["state"] in stages.FINISHED),
        "total": len(trials),
        "summary": stages.sweep_summary(trials, best),
    }
    had_best = (status.value.get("sweep") or {}).get("bestRank")
    status.value["sweep"] = record
    if not finished:
        _stage_phase(status, suspended, "Sweeping", "the rank sweep is suspended")
        return False
    if best is None:
        reasons = "; ".join(f"r{t['rank']}: {t.get('message', 'failed')}" for t in trials)
        status.fail("SweepFailed", f"all {len(trials)} rank-sweep trials failed: {reasons}")
        return False
    record["bestRank"], record["bestMetric"] = best["rank"], best["metric"]
    status.value["rank"] = best["rank"]
    direction = "highest" if stages.higher_is_better(metric) else "lowest"
    message = (f"rank {best['rank']} (alpha {best['alpha']}) has the {direction} holdout {metric} "
               f"({best['metric']:.4g}) of {len(trials)} trials")
    if sweep["tieTolerance"]:
        message += f"; ties within {sweep['tieTolerance']:g} go to the smaller rank"
    status.condition("RankSelected", True, "BestHoldoutMetric", message)
    if had_best != best["rank"]:
        plan.events.append(Event("Normal", "RankChosen", message + "\n" + stages.table(trials, metric, best["rank"])))
    return True


def _stage_phase(status: _Status, suspended: bool, phase: str, suspended_message: str) -> None:
    if suspended:
        status.value["phase"] = "Suspended"
        status.condition("Suspended", True, "SuspendedBySpec", f"spec.runPolicy.suspend is true: {suspended_message}")
    else:
        status.value["phase"] = phase
        status.clear("Suspended", "Resumed", "spec.runPolicy.suspend is false")


def _trial_event(plan: Plan, record: dict, metric: str) -> None:
    if record["state"] == stages.SUCCEEDED:
        seconds = record.get("durationSeconds")
        took = f" in {seconds:.0f}s" if isinstance(seconds, int | float) else ""
        plan.events.append(Event("Normal", "TrialSucceeded",
                                 f"rank {record['rank']}: holdout {metric} {record['metric']:.4g}{took}"))
    elif record["state"] == stages.FAILED:
        plan.events.append(Event("Warning", "TrialFailed", f"rank {record['rank']}: {record.get('message', '')}"))


def _metrics_text(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())) or "no metrics"


def _record_training_baseline(status: _Status, job: dict, metrics: dict | None) -> None:
    """The training job's own first evaluation is the baseline when no separate job ran."""
    spec = job["spec"]
    if not metrics or not stages.baseline_spec(spec).get("enabled", True):
        return
    if (status.value.get("baseline") or {}).get("source") == "BaselineJob":
        return
    metrics = manifest_api.numeric_metrics(metrics)
    target = stages.baseline_spec(spec).get("target")
    record = {"source": "TrainingJob", "job": render.pytorchjob_name(job["metadata"]["name"]),
              "state": stages.SUCCEEDED, "metrics": metrics,
              "summary": stages.baseline_summary(metrics, target, spec["task"])}
    if target:
        met = stages.baseline_met(metrics, target)
        record["target"], record["met"] = dict(target), bool(met)
        if met:
            status.condition("BaselineSufficient", True, "TrainingForced",
                             f"the base model meets the target ({record['summary']}); training anyway "
                             "(spec.baseline.forceTraining)")
        else:
            status.condition("BaselineSufficient", False, "BelowTarget",
                             f"the base model does not meet the target ({record['summary']})")
    status.value["baseline"] = record


def _follow_pytorchjob(observed: Observed, job: dict, settings: Settings, plan: Plan, status: _Status) -> None:
    pytorchjob = observed.pytorchjob
    pj_status = pytorchjob.get("status") or {}
    reported = progress_api.to_status(observed.progress)
    if reported:
        status.value["progress"] = {**(status.value.get("progress") or {}), **reported}
    baseline = (observed.progress or {}).get("baselineMetrics")
    if isinstance(baseline, dict):
        _record_training_baseline(status, job, baseline)
    replicas = _replica_counts(pytorchjob)
    if replicas:
        status.value["replicas"] = replicas
        status.value["attempts"] = max(_attempts(replicas), int(status.value.get("attempts", 0) or 0))
    if pj_status.get("startTime"):
        status.value["startTime"] = pj_status["startTime"]

    failed = _pj_condition(pytorchjob, "Failed")
    succeeded = _pj_condition(pytorchjob, "Succeeded")
    if failed:
        status.value["completionTime"] = pj_status.get("completionTime") or observed.now
        reason, message = failed.get("reason") or "TrainingFailed", failed.get("message") or "the PyTorchJob failed"
        trainer_failure = (observed.progress or {}).get("failure")
        if isinstance(trainer_failure, dict) and trainer_failure.get("reason"):
            # the trainer's own words (bad data lines, NaN at step N) beat "pod exited with code 2"
            reason = str(trainer_failure["reason"])
            message = f"{trainer_failure.get('message', '')} ({message})"
        status.fail(reason, message)
        return
    if succeeded:
        status.condition("Succeeded", True, "TrainingSucceeded", succeeded.get("message") or "training finished")
        status.clear("Running", "TrainingSucceeded", "training finished")
        completed = pj_status.get("completionTime") or succeeded.get("lastTransitionTime") or observed.now
        status.value["completionTime"] = completed
        _publish(observed, job, settings, status, completed)
        return

    desired_suspend = bool(job["spec"].get("runPolicy", {}).get("suspend"))
    actual_suspend = bool(((pytorchjob.get("spec") or {}).get("runPolicy") or {}).get("suspend"))
    if desired_suspend != actual_suspend:
        plan.patch_pytorchjob = {"spec": {"runPolicy": {"suspend": desired_suspend}}}
    if desired_suspend:
        status.value["phase"] = "Suspended"
        status.condition("Suspended", True, "SuspendedBySpec", "spec.runPolicy.suspend is true")
        status.clear("Running", "Suspended", "training is suspended")
        return
    status.clear("Suspended", "Resumed", "spec.runPolicy.suspend is false")
    running = _pj_condition(pytorchjob, "Running")
    restarting = _pj_condition(pytorchjob, "Restarting")
    if running or restarting:
        status.value["phase"] = "Running"
        if restarting:
            status.condition("Running", True, "Restarting", restarting.get("message") or "training is restarting")
        else:
            status.condition("Running", True, "TrainingRunning", running.get("message") or "training is running")
        return
    status.value["phase"] = "Pending"


def _follow_missing_pytorchjob(observed: Observed, job: dict, settings: Settings, status: _Status) -> None:
    previous = observed.job.get("status") or {}
    if observed.manifest is not None and observed.manifest.found:
        # the trainer writes the manifest last: it finished even if we never saw it succeed
        status.condition("Succeeded", True, "TrainingSucceeded", "training finished (seen from its manifest)")
        status.clear("Running", "TrainingSucceeded", "training finished")
        _publish(observed, job, settings, status, previous.get("completionTime") or observed.now)
        return
    if cond.is_true(previous.get("conditions"), "Succeeded"):
        _publish(observed, job, settings, status, previous.get("completionTime") or observed.now)
        return
    name = (previous.get("trainingJob") or {}).get("name", "")
    status.fail("TrainingJobLost", f"PyTorchJob {name} was deleted before it finished and no adapter was published")


def _publish(observed: Observed, job: dict, settings: Settings, status: _Status, completed: str) -> None:
    """`job` is the FineTuneJob with its spec defaulted (when the spec is valid)."""
    check = observed.manifest
    manifest_uri = storage_layout.manifest_uri(job_prefix(job))
    if check is None or not check.found:
        waited = _seconds_between(completed, observed.now)
        if waited >= settings.publish_timeout_seconds:
            message = (f"training succeeded but {manifest_uri} did not appear within "
                       f"{settings.publish_timeout_seconds}s")
            status.condition("AdapterPublished", False, "ManifestMissing", message)
            status.fail("ManifestMissing", message)
            return
        status.value["phase"] = "Publishing"
        status.condition("AdapterPublished", False, "ManifestMissing",
                         f"waiting for {manifest_uri} ({int(waited)}s of {settings.publish_timeout_seconds}s)")
        return
    if check.problems:
        reason = check.problems[0].reason
        message = "; ".join(p.message for p in check.problems)
        status.condition("AdapterPublished", False, reason, f"{manifest_uri}: {message}")
        status.fail(reason, f"the published adapter failed verification: {message}")
        return
    document = check.document or {}
    status.value["adapter"] = {
        "uri": check.adapter_uri,
        "manifestUri": manifest_uri,
        "digest": document["digest"],
        "sizeBytes": manifest_api.total_size(document),
        "metrics": manifest_api.numeric_metrics(document.get("metrics")),
        "baselineMetrics": manifest_api.numeric_metrics(document.get("baselineMetrics")),
        "publishTime": document.get("createdAt") or observed.now,
    }
    _record_training_baseline(status, job, document.get("baselineMetrics"))
    eval_loss = status.value["adapter"]["metrics"].get("eval_loss")
    if eval_loss is not None:
        status.value.setdefault("progress", {})["evalLoss"] = eval_loss
    status.value["phase"] = "Succeeded"
    status.condition("AdapterPublished", True, "Verified",
                     f"adapter {document['digest']} verified ({len(document['files'])} files)")


def _phase_event(phase: str, status: dict) -> Event:
    if phase == "Skipped":
        condition = cond.find(status.get("conditions"), "BaselineSufficient") or {}
        return Event("Normal", "BaselineSufficient", condition.get("message", "the base model meets the target"))
    if phase == "Failed":
        failure = status.get("failure") or {}
        return Event("Warning", failure.get("reason", "Failed"), failure.get("message", "the job failed"))
    if phase == "Succeeded":
        adapter = status.get("adapter") or {}
        return Event("Normal", "AdapterPublished", f"adapter {adapter.get('digest')} published at {adapter.get('uri')}")
    messages = {
        "Pending": "waiting for the training pods",
        "Baseline": "evaluating the base model before training",
        "Sweeping": "sweeping LoRA ranks on a holdout",
        "Running": "training is running",
        "Suspended": "training is suspended",
        "Publishing": "training finished; verifying the published adapter",
    }
    return Event("Normal", phase, messages.get(phase, phase))


def _deep_copy(value):
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def status_patch(old: dict | None, new: dict) -> dict:
    """A JSON merge patch turning `old` into `new` (removed keys become null)."""
    old = old or {}
    patch: dict = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(old.get(key), dict):
            sub = status_patch(old[key], value)
            if sub:
                patch[key] = sub
        elif old.get(key) != value:
            patch[key] = value
    return patch

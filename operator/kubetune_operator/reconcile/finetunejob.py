"""The FineTuneJob state machine (pure): observed state in, a `Plan` (children, status, events) out.

Level-based: the same observation gives the same plan, so reconciling twice is harmless. The phases
(Validating, Baseline, Sweeping, Pending, Running, Publishing; Succeeded, Skipped, Failed; Suspended, Queued) are
drawn in docs/concepts.md; the stage jobs before training (data, baseline, sweep) are reconcile.stage_jobs'.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from kubetune.api import jobconfig, storage_layout
from kubetune.api import manifest as manifest_api
from kubetune.api import progress as progress_api
from kubetune.api.methods import METHODS
from kubetune.api.schema import apply_defaults
from kubetune.api.validation import root_schema, structural_errors, validate
from kubetune_operator.backends import backend_of, kueue, render_children
from kubetune_operator.backends.workload import FAILED, RESTARTING, RUNNING, SUCCEEDED, WorkloadStatus
from kubetune_operator.render import training as render

from . import conditions as cond
from . import queueing, secrets, stages, tenancy
from .finetunejob_plan import Event, Plan, StageReport, Status, deep_copy, seconds_between
from .stage_jobs import data_stage_started, gpu_stages_started, pre_training_stages, record_data_stage, stage_of

TERMINAL = ("Succeeded", "Skipped", "Failed")
# Phases whose progress is followed closely (every progress_seconds). Not Pending: its pods have not
# started, so there is no progress to read, and the workload's own events (watched) say when they do; the
# slower resync covers it. Following Pending jobs too made every queued job cost ~1 API request/s
# (BENCHMARKS.md, Scale).
ACTIVE = ("Validating", "Baseline", "Sweeping", "Running")
CONDITION_TYPES = ("Accepted", "DataValidated", "BaselineSufficient", "RankSelected", "Queued", "Running",
                   "Suspended", "Succeeded", "Failed", "AdapterPublished", secrets.CONDITION)


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
    workload: WorkloadStatus | None = None  # the training job's workload, read by its backend
    manifest: manifest_api.ManifestCheck | None = None  # None: not looked at (see `needs_manifest`)
    progress: dict | None = None  # progress.json as the trainer last wrote it (see `needs_progress`)
    stage_jobs: dict = field(default_factory=dict)  # name -> WorkloadStatus of each stage job
    stage_config_maps: frozenset = frozenset()  # names of the stages' ConfigMaps that exist
    stage_reports: dict = field(default_factory=dict)  # name -> StageReport (see `needs_stage_reports`)
    # Secret name -> its keys (None: no such Secret), for the names `needs_secrets` asked for; None: not
    # looked at (`kubetune local` has no Secrets), nothing is checked.
    secrets: dict | None = None


# --- the decision ------------------------------------------------------------------------------------


def needs_manifest(job: dict, workload: WorkloadStatus | None) -> bool:
    """Whether the shell should read the job's manifest.json before calling `decide`."""
    status = job.get("status") or {}
    if status.get("phase") in TERMINAL:
        return False
    if workload is not None and workload.phase == SUCCEEDED:
        return True
    # Finished while the operator was away and the workload was already removed by its TTL:
    # a verified manifest (written last, after training) proves success.
    return workload is None and bool(status.get("trainingJob"))


def needs_progress(job: dict, workload: WorkloadStatus | None) -> bool:
    """Whether the shell should read the trainer's progress.json: while its workload exists, its pods
    have started (only Created: nothing to read yet) and the job has not finished (a failed trainer leaves
    its reason there too)."""
    if workload is None or (job.get("status") or {}).get("phase") in TERMINAL:
        return False
    return workload.started


def _stage_entries(job: dict) -> dict[str, tuple[jobconfig.Stage, str | None]]:
    """Stage jobs the status knows about: name -> (stage, recorded state)."""
    status = job.get("status") or {}
    name = job["metadata"]["name"]
    out: dict[str, tuple[jobconfig.Stage, str | None]] = {}
    data = status.get("data") or {}
    if data.get("job"):
        out[data["job"]] = (jobconfig.Stage(kind=jobconfig.STAGE_DATA), data.get("state"))
    baseline = status.get("baseline") or {}
    if baseline.get("source") == "BaselineJob":
        stage = jobconfig.Stage(kind=jobconfig.STAGE_BASELINE)
        out[render.stage_job_name(name, stage)] = (stage, baseline.get("state"))
    sweep = status.get("sweep") or {}
    if sweep.get("job") and job["spec"].get("rankSweep"):
        out[sweep["job"]] = (jobconfig.Stage(kind=jobconfig.STAGE_SWEEP), sweep.get("state"))
    return out


def needs_stage_reports(job: dict, stage_jobs: dict) -> dict[str, str]:
    """Stage jobs whose result.json / progress.json the shell should read: name -> the stage's storage
    prefix. Those that finished (or vanished) and whose outcome the status has not recorded yet, and the
    running sweep (its progress.json holds the table so far)."""
    if (job.get("status") or {}).get("phase") in TERMINAL:
        return {}
    root = job_prefix(job)
    entries = _stage_entries(job)
    for name, workload in stage_jobs.items():
        stage = stage_of(job, workload)
        if stage is not None:
            entries.setdefault(name, (stage, None))
    wanted = {}
    for name, (stage, state) in entries.items():
        workload = stage_jobs.get(name)
        if state in stages.FINISHED or (state == stages.QUEUED and workload is None):
            continue
        if state == stages.QUEUED:
            state = None  # created, then the status write was lost: adopted like an unrecorded job
        finished = workload is not None and workload.finished
        live_table = stage.kind == jobconfig.STAGE_SWEEP and workload is not None
        if finished or live_table or (workload is None and state is not None):
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
        plan.status = deep_copy(job.get("status") or {})
        return plan  # children go with the owner (ownerReferences); nothing to decide
    status = Status(job, observed.now)
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
    return data_stage_started(previous) or gpu_stages_started(previous)


def _decide_into(observed: Observed, settings: Settings, plan: Plan, status: Status) -> None:
    job, workload = observed.job, observed.workload
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

    job, valid = _accept(observed, settings, status, started or stages_started, started)
    if job is None:
        return

    underway = started or stages_started or workload is not None or bool(observed.stage_jobs)
    if valid and observed.secrets is not None and _secrets_missing(observed, job, plan, status, underway):
        return

    if workload is None:
        if started:
            _follow_missing_workload(observed, job, settings, status)
            return
        if not pre_training_stages(observed, settings, job, plan, status):
            return
        training_job, training_stage = _training_inputs(job, status.value)
        plan.create += render_children(training_job, settings.render, training_stage)
        if observed.config_map is not None:
            plan.create = [c for c in plan.create if c["metadata"]["name"] != observed.config_map["metadata"]["name"]]
        # a spec fixed after an InvalidSpec failure starts afresh
        status.value.pop("failure", None)
        status.value.pop("completionTime", None)
        status.clear("Failed", "SpecFixed", "the spec is valid now; training is starting")
        meta = job["metadata"]
        status.value["trainingJob"] = {
            "name": render.workload_name(meta["name"]),
            "configMap": render.config_map_name(meta["name"]),
            "generation": status.generation,
        }
        _created_phase(job, status)
        plan.events.append(Event("Normal", "Created", f"created {backend_of(job).kind} "
                                 f"{status.value['trainingJob']['name']} and its job config"))
        return

    if observed.config_map is None and valid and not workload.finished:
        training_job, training_stage = _training_inputs(job, status.value)
        plan.create = [render.render_config_map(training_job, stage=training_stage)]  # pods cannot start without it
    status.value.setdefault("trainingJob", {
        "name": workload.name,
        "configMap": render.config_map_name(job["metadata"]["name"]),
    })
    data = status.value.get("data") or {}
    if data.get("state") in (stages.PENDING, stages.RUNNING) and (observed.stage_reports.get(data.get("job"))
                                                                 or StageReport()).result is not None:
        # the status write that recorded the data stage's success was lost with the one naming this job
        record_data_stage(observed, settings, job, plan, status)
    _follow_workload(observed, job, settings, plan, status)


def _accept(observed: Observed, settings: Settings, status: Status, underway: bool,
            started: bool) -> tuple[dict | None, bool]:
    """Validate the spec (and its storage against --allowed-storage) into the Accepted condition. Returns the
    job to go on with (its spec defaulted), or None when nothing more is decided, and whether it is valid."""
    job, previous = observed.job, observed.job.get("status") or {}
    result = validate(job, local=settings.local)
    # storage outside the namespace's prefixes (--allowed-storage, reconcile.tenancy)
    refused = tenancy.finetunejob_refusals(result.defaulted, settings.allowed_storage) if result.ok else []
    valid = result.ok and not refused
    if not result.ok:
        message = "; ".join(str(error) for error in result.errors)
        if underway:
            status.condition("Accepted", False, "InvalidSpecUpdate",
                             f"the updated spec is invalid and was not applied: {message}")
            if not started:  # stage jobs already running go on; nothing new starts until the spec is fixed
                return None, valid
            if any(error.message != "unknown field" for error in structural_errors("FineTuneJob", job)):
                # a spec of the wrong shape (no API server stores one) cannot even say where the adapter goes
                return None, valid
            job = apply_defaults(root_schema("FineTuneJob"), job)  # as the API server stores it
        else:
            status.condition("Accepted", False, "InvalidSpec", message)
            status.fail("InvalidSpec", message)
            return None, valid
    elif refused:
        message = "; ".join(refused)
        if underway:
            status.condition("Accepted", False, "StorageNotAllowed",
                             f"the spec names storage this namespace may not use; nothing new starts: {message}")
            if not started:
                return None, valid  # as for an invalid update: what runs goes on, nothing new starts
        else:
            status.condition("Accepted", False, "StorageNotAllowed", message)
            status.fail("StorageNotAllowed", message)
            return None, valid
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
    return job, valid


def _secrets_missing(observed: Observed, job: dict, plan: Plan, status: Status, underway: bool) -> bool:
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
    """The spec the full run trains with (the sweep's rank and learning rate) and its stage (the separate baseline's
    metrics, so the base model is not evaluated twice)."""
    sweep = status.get("sweep") or {}
    spec = stages.training_spec(job["spec"], sweep.get("bestRank"), sweep.get("bestLearningRate"))
    baseline = status.get("baseline") or {}
    metrics = None
    if baseline.get("source") == "BaselineJob" and baseline.get("state") == stages.SUCCEEDED:
        metrics = dict(baseline.get("metrics") or {})
    return {**job, "spec": spec}, jobconfig.Stage(kind=jobconfig.STAGE_TRAIN, baseline_metrics=metrics)


def _record_training_baseline(status: Status, job: dict, metrics: dict | None) -> None:
    """The training job's own first evaluation is the baseline when no separate job ran."""
    spec = job["spec"]
    if not metrics or not stages.baseline_spec(spec).get("enabled", True):
        return
    if (status.value.get("baseline") or {}).get("source") == "BaselineJob":
        return
    metrics = manifest_api.numeric_metrics(metrics)
    target = stages.baseline_spec(spec).get("target")
    record = {"source": "TrainingJob", "job": render.workload_name(job["metadata"]["name"]),
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


def _follow_workload(observed: Observed, job: dict, settings: Settings, plan: Plan, status: Status) -> None:
    workload = observed.workload
    reported = progress_api.to_status(observed.progress)
    if reported:
        status.value["progress"] = {**(status.value.get("progress") or {}), **reported}
    baseline = (observed.progress or {}).get("baselineMetrics")
    if isinstance(baseline, dict):
        _record_training_baseline(status, job, baseline)
    if workload.replicas:
        status.value["replicas"] = workload.replicas
        status.value["attempts"] = max(workload.attempts, int(status.value.get("attempts", 0) or 0))
    if workload.start_time:
        status.value["startTime"] = workload.start_time

    if workload.phase == FAILED:
        status.value["completionTime"] = workload.completion_time or observed.now
        reason, message = workload.reason or "TrainingFailed", workload.message or f"the {workload.kind} failed"
        trainer_failure = (observed.progress or {}).get("failure")
        if isinstance(trainer_failure, dict) and trainer_failure.get("reason"):
            # the trainer's own words (bad data lines, NaN at step N) beat "pod exited with code 2"
            reason = str(trainer_failure["reason"])
            message = f"{trainer_failure.get('message', '')} ({message})"
        status.fail(reason, message)
        return
    if workload.phase == SUCCEEDED:
        status.condition("Succeeded", True, "TrainingSucceeded", workload.message or "training finished")
        status.clear("Running", "TrainingSucceeded", "training finished")
        completed = workload.completion_time or workload.since or observed.now
        status.value["completionTime"] = completed
        _publish(observed, job, settings, status, completed)
        return

    queueing.hold(plan, workload, job["spec"], training=True)
    queued = queueing.report(status, job["spec"], [workload])
    if kueue.user_suspended(job["spec"]):
        status.value["phase"] = "Suspended"
        status.condition("Suspended", True, "SuspendedBySpec", "spec.runPolicy.suspend is true")
        status.clear("Running", "Suspended", "training is suspended")
        return
    status.clear("Suspended", "Resumed", "spec.runPolicy.suspend is false")
    if queued:  # not admitted yet, or evicted (preempted) by Kueue: its pods are gone until it is admitted
        status.value["phase"] = queueing.QUEUED
        status.clear("Running", queueing.QUEUED, "training waits for Kueue to admit it")
    elif workload.phase == RESTARTING:
        status.value["phase"] = "Running"
        status.condition("Running", True, "Restarting", workload.message or "training is restarting")
    elif workload.phase == RUNNING:
        status.value["phase"] = "Running"
        status.condition("Running", True, "TrainingRunning", workload.message or "training is running")
    else:
        status.value["phase"] = "Pending"


def _created_phase(job: dict, status: Status) -> None:
    """The phase of a training job just created: Suspended by the user, Queued when Kueue is to admit it."""
    spec = job["spec"]
    if kueue.user_suspended(spec):
        status.value["phase"] = "Suspended"
        status.condition("Suspended", True, "SuspendedBySpec", "spec.runPolicy.suspend is true")
    else:
        status.value["phase"] = queueing.QUEUED if queueing.report(status, spec, []) else "Pending"


def _follow_missing_workload(observed: Observed, job: dict, settings: Settings, status: Status) -> None:
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
    status.fail("TrainingJobLost", f"{backend_of(job).kind} {name} was deleted before it finished and no adapter "
                "was published")


def _publish(observed: Observed, job: dict, settings: Settings, status: Status, completed: str) -> None:
    """`job` is the FineTuneJob with its spec defaulted (when the spec is valid)."""
    check = observed.manifest
    manifest_uri = storage_layout.manifest_uri(job_prefix(job))
    if check is None or not check.found:
        waited = seconds_between(completed, observed.now)
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
    if check.merged is not None:
        status.value["merged"] = dict(check.merged)
    _record_training_baseline(status, job, document.get("baselineMetrics"))
    eval_loss = status.value["adapter"]["metrics"].get("eval_loss")
    if eval_loss is not None:
        status.value.setdefault("progress", {})["evalLoss"] = eval_loss
    status.value["phase"] = "Succeeded"
    status.condition("AdapterPublished", True, "Verified",
                     f"adapter {document['digest']} verified ({len(document['files'])} files)"
                     + (f"; merged model {check.merged['digest']} verified" if check.merged else ""))


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
        "Validating": "checking the dataset on CPU before any GPU is requested",
        "Baseline": "evaluating the base model before training",
        "Sweeping": "sweeping LoRA ranks on a holdout",
        "Running": "training is running",
        "Suspended": "training is suspended",
        "Queued": "waiting for Kueue to admit its workloads",
        "Publishing": "training finished; verifying the published adapter",
    }
    return Event("Normal", phase, messages.get(phase, phase))


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

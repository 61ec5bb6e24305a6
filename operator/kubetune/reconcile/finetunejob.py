"""The FineTuneJob state machine: observed state in, desired children + status + events out.

Pure: no I/O, no clock, no kopf. The operator's handlers and the local runner call `decide` with
what they observed and carry out the returned `Plan`. Level-based: the same observation always
gives the same plan, so reconciling twice, after a crash or from two triggers, is harmless.

Phases (informational; conditions carry the decisions):

    Pending ──▶ Running ──▶ Publishing ──▶ Succeeded
       │  ▲        │  ▲          │
       ▼  │        ▼  │          ▼
     Suspended ◀───┘  │        Failed   (also from Pending/Running: invalid spec, training failed,
                                          training job lost, manifest missing for too long)
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from kubetune.api import manifest as manifest_api
from kubetune.api import progress as progress_api
from kubetune.api import storage_layout
from kubetune.api.validation import validate
from kubetune.render import training as render

from . import conditions as cond

TERMINAL = ("Succeeded", "Failed")
CONDITION_TYPES = ("Accepted", "Running", "Suspended", "Succeeded", "Failed", "AdapterPublished")


@dataclass(frozen=True)
class Settings:
    render: render.RenderSettings = field(default_factory=render.RenderSettings)
    publish_timeout_seconds: int = 600  # how long a missing manifest may take to appear after success
    resync_seconds: float = 30.0
    progress_seconds: float = progress_api.WRITE_INTERVAL_SECONDS  # how often a running job's progress is read
    local: bool = False  # `kubetune local`: file:// outputs are allowed


@dataclass(frozen=True)
class Observed:
    job: dict  # the FineTuneJob as read from the API (with apiVersion/kind/metadata/spec/status)
    now: str  # RFC 3339, injected so decisions are reproducible
    config_map: dict | None = None
    pytorchjob: dict | None = None
    manifest: manifest_api.ManifestCheck | None = None  # None: not looked at (see `needs_manifest`)
    progress: dict | None = None  # progress.json as the trainer last wrote it (see `needs_progress`)


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Plan:
    create: list[dict] = field(default_factory=list)
    patch_pytorchjob: dict | None = None  # merge patch for the existing PyTorchJob
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


def needs_progress(job: dict, pytorchjob: dict | None) -> bool:
    """Whether the shell should read the trainer's progress.json: while its PyTorchJob exists and the job
    has not finished (a failed trainer leaves its reason there too)."""
    return pytorchjob is not None and (job.get("status") or {}).get("phase") not in TERMINAL


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


def decide(observed: Observed, settings: Settings) -> Plan:
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
        running = after in ("Pending", "Running")
        plan.requeue_after = settings.progress_seconds if running else settings.resync_seconds
    return plan


def _decide_into(observed: Observed, settings: Settings, plan: Plan, status: _Status) -> None:
    job, pytorchjob = observed.job, observed.pytorchjob
    previous = job.get("status") or {}
    started = bool(previous.get("trainingJob"))

    if previous.get("phase") in TERMINAL and (started or previous.get("phase") == "Succeeded"):
        # The record of a finished run is final; children may be gone (TTL) and must not come back.
        if previous.get("observedGeneration") != status.generation:
            status.condition("Accepted", True, "Finished",
                             "the job has finished; spec changes take effect only in a new FineTuneJob")
        return

    result = validate(job, local=settings.local)
    if not result.ok:
        message = "; ".join(str(error) for error in result.errors)
        if started:
            status.condition("Accepted", False, "InvalidSpecUpdate",
                             f"the updated spec is invalid and was not applied: {message}")
        else:
            status.condition("Accepted", False, "InvalidSpec", message)
            status.fail("InvalidSpec", message)
            return
    else:
        job = {**job, "spec": result.defaulted["spec"]}
        spec = job["spec"]
        status.value["method"] = spec["method"]["type"]
        if spec["method"]["type"] in ("LoRA", "QLoRA"):
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

    if pytorchjob is None:
        if started:
            _follow_missing_pytorchjob(observed, settings, status)
            return
        plan.create = render.render_children(job, settings.render)
        if observed.config_map is not None:
            plan.create = plan.create[1:]
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
    if observed.config_map is None and result.ok and not finished:
        plan.create = [render.render_config_map(job)]  # pods cannot start without it
    status.value.setdefault("trainingJob", {
        "name": pytorchjob["metadata"]["name"],
        "configMap": render.config_map_name(job["metadata"]["name"]),
    })
    _follow_pytorchjob(observed, job, settings, plan, status)


def _follow_pytorchjob(observed: Observed, job: dict, settings: Settings, plan: Plan, status: _Status) -> None:
    pytorchjob = observed.pytorchjob
    pj_status = pytorchjob.get("status") or {}
    reported = progress_api.to_status(observed.progress)
    if reported:
        status.value["progress"] = {**(status.value.get("progress") or {}), **reported}
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
        _publish(observed, settings, status, completed)
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


def _follow_missing_pytorchjob(observed: Observed, settings: Settings, status: _Status) -> None:
    previous = observed.job.get("status") or {}
    if observed.manifest is not None and observed.manifest.found:
        # the trainer writes the manifest last: it finished even if we never saw it succeed
        status.condition("Succeeded", True, "TrainingSucceeded", "training finished (seen from its manifest)")
        status.clear("Running", "TrainingSucceeded", "training finished")
        _publish(observed, settings, status, previous.get("completionTime") or observed.now)
        return
    if cond.is_true(previous.get("conditions"), "Succeeded"):
        _publish(observed, settings, status, previous.get("completionTime") or observed.now)
        return
    name = (previous.get("trainingJob") or {}).get("name", "")
    status.fail("TrainingJobLost", f"PyTorchJob {name} was deleted before it finished and no adapter was published")


def _publish(observed: Observed, settings: Settings, status: _Status, completed: str) -> None:
    check = observed.manifest
    job = observed.job
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
    eval_loss = status.value["adapter"]["metrics"].get("eval_loss")
    if eval_loss is not None:
        status.value.setdefault("progress", {})["evalLoss"] = eval_loss
    status.value["phase"] = "Succeeded"
    status.condition("AdapterPublished", True, "Verified",
                     f"adapter {document['digest']} verified ({len(document['files'])} files)")


def _phase_event(phase: str, status: dict) -> Event:
    if phase == "Failed":
        failure = status.get("failure") or {}
        return Event("Warning", failure.get("reason", "Failed"), failure.get("message", "the job failed"))
    if phase == "Succeeded":
        adapter = status.get("adapter") or {}
        return Event("Normal", "AdapterPublished", f"adapter {adapter.get('digest')} published at {adapter.get('uri')}")
    messages = {
        "Pending": "waiting for the training pods",
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

"""Kueue (pure): how every workload of a queued FineTuneJob is created, whether one waits for admission,
and Kueue's own words for why (its Workload's QuotaReserved condition). Every backend uses it; the
semantics are Kueue's pkg/controller/jobframework (reconciler.go, defaults.go). docs/operations.md, Kueue.
"""

from __future__ import annotations

from dataclasses import dataclass

LABEL_QUEUE = "kueue.x-k8s.io/queue-name"  # Kueue's constants.QueueLabel
LABEL_JOB_UID = "kueue.x-k8s.io/job-uid"  # on each Kueue Workload: the uid of the job it stands for
WORKLOADS = ("kueue.x-k8s.io", "v1beta1", "workloads")  # group, version, plural of Kueue's Workload
# A workload Kueue has not seen yet (its webhook suspended it, no Workload exists so far).
WAITING_REASON, WAITING_MESSAGE = "WaitingForAdmission", "waiting for Kueue to admit it"


@dataclass(frozen=True)
class Queueing:
    """What a stage's workload is created with: the queue label, and suspended or not."""

    labels: dict
    suspend: bool


def queue_name(spec: dict) -> str:
    return (spec.get("scheduling") or {}).get("queueName") or ""


def user_suspended(spec: dict) -> bool:
    """The user's suspend: the FineTuneJob's spec.runPolicy.suspend."""
    return bool((spec.get("runPolicy") or {}).get("suspend"))


def queueing(spec: dict) -> Queueing:
    """With a queue every workload is created suspended and labelled, so no pod starts before Kueue admits it
    (its webhook would suspend it anyway; created suspended, nothing races it). Only the queue label:
    Kueue's `kueue.x-k8s.io/priority-class` names a WorkloadPriorityClass, not the pods' PriorityClass,
    which Kueue already reads from the pod templates."""
    queue = queue_name(spec)
    return Queueing(labels={LABEL_QUEUE: queue} if queue else {}, suspend=bool(queue) or user_suspended(spec))


def managed(labels: dict) -> bool:
    """Whether Kueue holds the workload's suspend (it carries a queue label): the operator never writes it."""
    return bool((labels or {}).get(LABEL_QUEUE))


def suspend_change(labels: dict, suspended: bool, finished: bool, spec: dict) -> bool | None:
    """The suspend to write to a workload now, or None. A Kueue-managed one is never written (Kueue admits
    and evicts it; a user's suspend goes to its Kueue Workload instead, `activation_change`)."""
    if finished or managed(labels):
        return None
    desired = user_suspended(spec)
    return desired if desired != suspended else None


@dataclass(frozen=True)
class Admission:
    """A Kueue-managed workload's standing with Kueue, read from its Kueue Workload."""

    reason: str = WAITING_REASON  # why it waits, in Kueue's words (see `admission`)
    message: str = WAITING_MESSAGE
    workload: str | None = None  # its Kueue Workload's name; None: Kueue has made none (yet)
    active: bool = True  # the Workload's spec.active


def needs_admission(labels: dict, suspended: bool, finished: bool, spec: dict) -> bool:
    """Whether the shell should read the workload's Kueue Workload: while Kueue holds it suspended (to say
    why), or while the user's suspend must reach it (`activation_change`)."""
    return managed(labels) and not finished and (suspended or user_suspended(spec))


def activation_change(admission: Admission | None, spec: dict) -> bool | None:
    """Kueue's way to stop a job it manages (setting the job's suspend would be undone: Kueue unsuspends a
    job whose Workload is admitted): its Workload's spec.active. False: evicted, its quota freed; true
    again: queued again. The value to write, or None."""
    if admission is None or admission.workload is None:
        return None
    desired = not user_suspended(spec)
    return desired if desired != admission.active else None


def _condition(kueue_workload: dict, kind: str) -> dict:
    return next((c for c in (kueue_workload.get("status") or {}).get("conditions") or [] if c.get("type") == kind),
                {})


def admission(kueue_workload: dict | None) -> Admission:
    """Why a suspended workload waits, in Kueue's words: the QuotaReserved condition's reason and message
    ("Pending: couldn't assign flavors to pod set master: insufficient unused quota ...", "Inadmissible:
    LocalQueue q doesn't exist"); quota reserved but admission checks pending; deactivated; no Workload yet."""
    if kueue_workload is None:
        return Admission()
    name = (kueue_workload.get("metadata") or {}).get("name")
    if (kueue_workload.get("spec") or {}).get("active") is False:
        return Admission("Deactivated", "its Kueue Workload is deactivated (spec.active: false)", name, False)
    reserved = _condition(kueue_workload, "QuotaReserved")
    if reserved.get("status") == "True":
        admitted = _condition(kueue_workload, "Admitted")
        return Admission(admitted.get("reason") or "QuotaReserved",
                         admitted.get("message") or "quota reserved; waiting for its admission checks", name)
    return Admission(reserved.get("reason") or WAITING_REASON, reserved.get("message") or WAITING_MESSAGE, name)

"""Suspend and queueing of a FineTuneJob's workloads (pure): the user's suspend applied to each one, and
the phase while Kueue holds them (`Queued`, with Kueue's reason). A Kueue-managed workload's suspend is
never written: Kueue admits and evicts it; the user's suspend goes to its Kueue Workload (backends.kueue).
"""

from __future__ import annotations

from kubetune_operator.backends import kueue
from kubetune_operator.backends.workload import WorkloadStatus

from .finetunejob_plan import Plan, Status

QUEUED = "Queued"  # the phase and the condition while Kueue holds every unfinished workload of a stage


def hold(plan: Plan, workload: WorkloadStatus, spec: dict, training: bool = False) -> None:
    """Bring one workload to the user's suspend (spec.runPolicy.suspend): its own suspend field, or, when
    Kueue manages it, its Kueue Workload's spec.active."""
    change = kueue.suspend_change(workload.labels, workload.suspended, workload.finished, spec)
    if change is not None:
        if training:
            plan.suspend_workload = change
        else:
            plan.suspend_stage_jobs[workload.name] = change
    if kueue.managed(workload.labels) and not workload.finished:
        active = kueue.activation_change(workload.admission, spec)
        if active is not None:
            plan.activate_kueue_workloads[workload.admission.workload] = active


def report(status: Status, spec: dict, workloads: list[WorkloadStatus]) -> bool:
    """The Queued condition from the stage's workloads: True with Kueue's reason and message while one
    waits for admission, False once none does. True when every unfinished one waits (the phase is
    Queued), or, with a queue, when the stage has none yet (being created, suspended, in this pass)."""
    queue = kueue.queue_name(spec)
    if not workloads and queue:
        status.condition(QUEUED, True, kueue.WAITING_REASON, f"created suspended in LocalQueue {queue}: "
                         f"{kueue.WAITING_MESSAGE}")
        return True
    waiting = [w for w in workloads if w.queued]
    if not waiting:
        status.clear(QUEUED, "Admitted", "Kueue admitted the workloads")
        return False
    first = waiting[0]
    admission = first.admission or kueue.Admission()
    message = f"{first.kind} {first.name} waits in LocalQueue {first.labels.get(kueue.LABEL_QUEUE, '')}: " \
              f"{admission.message}"
    if len(waiting) > 1:
        message += f" (and {len(waiting) - 1} more of this stage)"
    status.condition(QUEUED, True, admission.reason, message)
    return all(w.queued for w in workloads if not w.finished)


def stage_phase(status: Status, spec: dict, phase: str, suspended_message: str,
                workloads: list[WorkloadStatus]) -> None:
    """The phase of a stage that is under way: Suspended by the user, Queued while Kueue holds all its
    workloads, else the stage's own phase (Queued time counts against no timeout: none runs then)."""
    if kueue.user_suspended(spec):
        status.value["phase"] = "Suspended"
        status.condition("Suspended", True, "SuspendedBySpec", f"spec.runPolicy.suspend is true: {suspended_message}")
        return
    status.clear("Suspended", "Resumed", "spec.runPolicy.suspend is false")
    status.value["phase"] = QUEUED if report(status, spec, workloads) else phase

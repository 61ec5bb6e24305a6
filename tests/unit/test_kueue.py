"""Kueue: workloads created suspended and labelled, never unsuspended by the operator, Queued with Kueue's
reason, the user's suspend told apart from Kueue's (backends.kueue, reconcile.queueing, the shell)."""

from __future__ import annotations

import asyncio
import copy
import dataclasses

from kubetune.api import jobconfig
from kubetune.api.v1alpha1.finetunejob_status import FINETUNEJOB_PHASES
from kubetune.api.validation import validate
from kubetune_operator.backends import kueue, pytorchjob, render_children
from kubetune_operator.reconcile import conditions as cond
from kubetune_operator.reconcile import finetunejob as ftj
from kubetune_operator.render import training as render
from kubetune_operator.shell import finetunejob as shell
from kubetune_testing.factories import data_validated, finetunejob
from tests.unit.test_shell_finetunejob import MemoryPort

NOW = "2026-11-28T12:00:00Z"
A_WEEK_LATER = "2026-12-05T12:00:00Z"
QUEUE = "team-a-gpus"
SWEEP = {"ranks": [8, 16], "holdoutFraction": 0.1, "epochs": 1, "metric": "eval_loss", "parallelism": 2,
         "alpha": "Proportional", "tieTolerance": 0}
NO_QUOTA = ("couldn't assign flavors to pod set master: insufficient unused quota for nvidia.com/gpu in flavor "
            "h100, 1 more needed")


def kueue_workload(reason: str = "Pending", message: str = NO_QUOTA, active: bool = True, reserved: bool = False,
                   admitted: dict | None = None) -> dict:
    conditions = [{"type": "QuotaReserved", "status": "True" if reserved else "False", "reason": reason,
                   "message": message}]
    if admitted:
        conditions.append({"type": "Admitted", "status": "False", **admitted})
    return {"metadata": {"name": "pytorchjob-llama-lora-1a2b3", "labels": {kueue.LABEL_JOB_UID: "pj-uid"}},
            "spec": {"active": active}, "status": {"conditions": conditions}}


def queued_job(**spec) -> dict:
    """A FineTuneJob with a queue whose data stage passed and whose training job was created."""
    job = data_validated(finetunejob(scheduling={"queueName": QUEUE}, **spec))
    job["status"]["trainingJob"] = {"name": "llama-lora", "configMap": "llama-lora-config", "generation": 1}
    return job


def defaulted(job: dict) -> dict:
    return {**job, "spec": validate(job).defaulted["spec"]}


def rendered(job: dict, stage: jobconfig.Stage | None = None) -> dict:
    return render_children(defaulted(job), render.RenderSettings(), stage or jobconfig.Stage())[1]


def training_workload(job: dict, suspend: bool, *conditions: str) -> dict:
    workload = copy.deepcopy(rendered(job))
    workload["metadata"]["uid"] = "pj-uid"
    workload["spec"]["runPolicy"]["suspend"] = suspend
    workload["status"] = {"conditions": [{"type": c, "status": "True", "reason": f"PyTorchJob{c}", "message": ""}
                                         for c in conditions]}
    return workload


def decide(job: dict, workload: dict, seen: dict | None = None, now: str = NOW):
    """One decision as the shell makes it: Kueue's Workload read only when `needs_admission` says so."""
    status = pytorchjob.read_status(workload)
    if kueue.needs_admission(status.labels, status.suspended, status.finished, job["spec"]):
        status = dataclasses.replace(status, admission=kueue.admission(seen))
    observed = ftj.Observed(job=job, now=now, config_map={"metadata": {"name": "llama-lora-config"}},
                            workload=status)
    return ftj.decide(observed, ftj.Settings())


def condition(plan, kind: str) -> dict:
    return cond.find(plan.status.get("conditions"), kind) or {}


# --- what a workload is created with ------------------------------------------------------------------


def test_with_a_queue_every_stage_is_created_suspended_and_labelled_without_volcano_fields():
    job = finetunejob(scheduling={"queueName": QUEUE, "priorityClassName": "batch"})
    for stage in (jobconfig.Stage(kind=jobconfig.STAGE_DATA), jobconfig.Stage(kind=jobconfig.STAGE_BASELINE),
                  jobconfig.Stage(kind=jobconfig.STAGE_SWEEP), jobconfig.Stage()):
        workload = rendered(job, stage)
        assert workload["metadata"]["labels"][kueue.LABEL_QUEUE] == QUEUE
        assert workload["spec"]["runPolicy"]["suspend"] is True
        assert workload["spec"]["runPolicy"]["schedulingPolicy"] == {"priorityClass": "batch"}
        # the pods' PriorityClass is Kueue's priority; its priority-class label would name a WorkloadPriorityClass
        assert "kueue.x-k8s.io/priority-class" not in workload["metadata"]["labels"]


def test_without_a_queue_nothing_changes():
    workload = rendered(finetunejob())
    assert kueue.LABEL_QUEUE not in workload["metadata"]["labels"]
    assert workload["spec"]["runPolicy"]["suspend"] is False
    assert kueue.queueing(finetunejob(runPolicy={"suspend": True})["spec"]) == kueue.Queueing({}, True)


def test_queued_is_a_phase_of_the_crd():
    assert "Queued" in FINETUNEJOB_PHASES and "Queued" in ftj.CONDITION_TYPES


# --- Kueue's words -------------------------------------------------------------------------------------


def test_admission_reads_kueues_reason_from_its_workload():
    assert kueue.admission(None) == kueue.Admission(kueue.WAITING_REASON, kueue.WAITING_MESSAGE, None, True)
    pending = kueue.admission(kueue_workload())
    assert (pending.reason, pending.message, pending.workload) == ("Pending", NO_QUOTA, "pytorchjob-llama-lora-1a2b3")
    missing = kueue.admission(kueue_workload("Inadmissible", f"LocalQueue {QUEUE} doesn't exist"))
    assert missing.reason == "Inadmissible" and QUEUE in missing.message
    checks = kueue.admission(kueue_workload("QuotaReserved", "", reserved=True,
                                            admitted={"reason": "AdmissionChecksPending", "message": "prov-req"}))
    assert (checks.reason, checks.message) == ("AdmissionChecksPending", "prov-req")
    off = kueue.admission(kueue_workload(active=False))
    assert off.reason == "Deactivated" and off.active is False


def test_the_workload_is_read_only_while_kueue_holds_it_or_the_user_suspends():
    labels, spec = {kueue.LABEL_QUEUE: QUEUE}, {"scheduling": {"queueName": QUEUE}}
    assert kueue.needs_admission(labels, True, False, spec)
    assert not kueue.needs_admission(labels, False, False, spec)  # admitted and running
    assert not kueue.needs_admission(labels, True, True, spec)  # finished
    assert not kueue.needs_admission({}, True, False, spec)  # not Kueue's
    assert kueue.needs_admission(labels, False, False, {**spec, "runPolicy": {"suspend": True}})


# --- the decision --------------------------------------------------------------------------------------


def test_a_job_held_by_kueue_is_queued_with_kueues_reason_and_never_unsuspended():
    job = queued_job()
    plan = decide(job, training_workload(job, True), kueue_workload())
    assert plan.status["phase"] == "Queued"
    queued = condition(plan, "Queued")
    assert queued["status"] == "True" and queued["reason"] == "Pending"
    assert NO_QUOTA in queued["message"] and QUEUE in queued["message"]
    assert plan.suspend_workload is None and not plan.activate_kueue_workloads
    assert plan.requeue_after == ftj.Settings().resync_seconds  # no progress to follow while queued


def test_time_in_the_queue_counts_against_nothing():
    job = queued_job(runPolicy={"activeDeadlineSeconds": 60, "backoffLimit": 0})
    plan = decide(job, training_workload(job, True), kueue_workload(), now=A_WEEK_LATER)
    assert plan.status["phase"] == "Queued" and "failure" not in plan.status


def test_before_kueue_has_a_workload_the_job_waits_for_admission():
    job = queued_job()
    plan = decide(job, training_workload(job, True), None)
    assert plan.status["phase"] == "Queued" and condition(plan, "Queued")["reason"] == kueue.WAITING_REASON


def test_once_admitted_the_flow_goes_on_and_the_condition_says_so():
    job = queued_job()
    job["status"]["conditions"] = decide(job, training_workload(job, True)).status["conditions"]
    plan = decide(job, training_workload(job, False, "Running"))
    assert plan.status["phase"] == "Running"
    assert condition(plan, "Queued")["status"] == "False" and condition(plan, "Queued")["reason"] == "Admitted"
    assert plan.suspend_workload is None


def test_evicted_by_kueue_the_job_is_queued_again_not_resumed():
    job = queued_job()
    plan = decide(job, training_workload(job, True, "Running"), kueue_workload("Preempted", "preempted by team-b"))
    assert plan.status["phase"] == "Queued" and condition(plan, "Queued")["reason"] == "Preempted"
    assert plan.suspend_workload is None


def test_a_users_suspend_of_a_kueue_job_deactivates_its_workload_and_resuming_reactivates_it():
    job = queued_job(runPolicy={"suspend": True})
    plan = decide(job, training_workload(job, False, "Running"), kueue_workload(reserved=True, reason="Admitted"))
    assert plan.status["phase"] == "Suspended" and condition(plan, "Suspended")["reason"] == "SuspendedBySpec"
    assert plan.suspend_workload is None  # Kueue would unsuspend an admitted job: its Workload is what stops it
    assert plan.activate_kueue_workloads == {"pytorchjob-llama-lora-1a2b3": False}
    job["spec"]["runPolicy"] = {"suspend": False}
    plan = decide(job, training_workload(job, True), kueue_workload(active=False))
    assert plan.activate_kueue_workloads == {"pytorchjob-llama-lora-1a2b3": True}
    assert plan.status["phase"] == "Queued" and plan.suspend_workload is None


def test_a_created_job_with_a_queue_starts_queued_and_without_one_pending():
    job = data_validated(finetunejob(scheduling={"queueName": QUEUE}))
    plan = ftj.decide(ftj.Observed(job=job, now=NOW, secrets=None), ftj.Settings())
    assert plan.status["phase"] == "Queued" and condition(plan, "Queued")["reason"] == kueue.WAITING_REASON
    created = next(c for c in plan.create if c["kind"] == "PyTorchJob")
    assert created["spec"]["runPolicy"]["suspend"] is True
    plain = ftj.decide(ftj.Observed(job=data_validated(finetunejob()), now=NOW), ftj.Settings())
    assert plain.status["phase"] == "Pending" and not condition(plain, "Queued")


def test_without_a_queue_the_operator_still_resumes_what_it_suspended():
    job = queued_job()
    job["spec"]["scheduling"] = {}
    plan = decide(job, training_workload(job, True))
    assert plan.suspend_workload is False and plan.status["phase"] == "Pending"


def test_a_queued_data_stage_shows_queued_and_is_never_resumed():
    job = finetunejob(scheduling={"queueName": QUEUE})
    job["status"] = {"data": {"job": "llama-lora-data", "state": "Pending"}}
    data = copy.deepcopy(rendered(job, jobconfig.Stage(kind=jobconfig.STAGE_DATA)))
    status = dataclasses.replace(pytorchjob.read_status(data), admission=kueue.admission(kueue_workload()))
    plan = ftj.decide(ftj.Observed(job=job, now=NOW, stage_jobs={"llama-lora-data": status},
                                   stage_config_maps=frozenset({"llama-lora-data-config"})), ftj.Settings())
    assert plan.status["phase"] == "Queued" and condition(plan, "Queued")["reason"] == "Pending"
    assert not plan.suspend_stage_jobs


def test_a_sweep_waiting_for_admission_is_queued_and_names_its_workload():
    job = data_validated(finetunejob(scheduling={"queueName": QUEUE}, rankSweep=SWEEP))
    job["status"]["sweep"] = {"job": "llama-lora-rank-sweep", "state": "Pending"}
    workload = rendered(job, jobconfig.Stage(kind=jobconfig.STAGE_SWEEP))  # created suspended: not admitted
    name = workload["metadata"]["name"]
    plan = ftj.decide(ftj.Observed(job=job, now=NOW, stage_jobs={name: pytorchjob.read_status(workload)},
                                   stage_config_maps=frozenset({f"{name}-config"})), ftj.Settings())
    assert name == "llama-lora-rank-sweep"
    assert condition(plan, "Queued")["status"] == "True" and name in condition(plan, "Queued")["message"]
    assert not plan.suspend_stage_jobs


# --- the shell -----------------------------------------------------------------------------------------


class KueuePort(MemoryPort):
    """The in-memory port with Kueue's Workloads (by the uid of the job they stand for)."""

    def __init__(self, job: dict):
        super().__init__(job)
        self.kueue_workloads: dict[str, dict] = {}

    async def read_kueue_workload(self, job, workload_uid):
        self.calls.append(("kueue", workload_uid))
        return self.kueue_workloads.get(workload_uid)

    async def activate_kueue_workload(self, job, name, active):
        self.calls.append(("activate", name, active))


def test_the_shell_reads_kueues_workload_only_when_needed_and_writes_its_activation():
    job = queued_job()
    job["status"].pop("trainingJob")
    port = KueuePort(job)
    asyncio.run(shell.run_pass(port, ftj.Settings(), NOW))  # creates the training job, suspended
    port.workloads[-1]["metadata"]["uid"] = "pj-uid"
    port.kueue_workloads["pj-uid"] = kueue_workload()
    port.calls.clear()
    plan = asyncio.run(shell.run_pass(port, ftj.Settings(), NOW))
    assert ("kueue", "pj-uid") in port.calls and plan.status["phase"] == "Queued"
    assert not [c for c in port.calls if c[0] == "patch"]
    port.workloads[-1]["spec"]["runPolicy"]["suspend"] = False  # Kueue admits it
    port.workloads[-1]["status"] = {"conditions": [{"type": "Running", "status": "True"}]}
    port.calls.clear()
    plan = asyncio.run(shell.run_pass(port, ftj.Settings(), NOW))
    assert "kueue" not in [c[0] for c in port.calls] and plan.status["phase"] == "Running"
    port.job["spec"]["runPolicy"] = {"suspend": True}
    port.kueue_workloads["pj-uid"] = kueue_workload(reserved=True, reason="Admitted")
    port.calls.clear()
    asyncio.run(shell.run_pass(port, ftj.Settings(), NOW))
    assert ("activate", "pytorchjob-llama-lora-1a2b3", False) in port.calls
    assert not [c for c in port.calls if c[0] == "patch"]


def test_a_stage_created_in_this_pass_is_queued_at_once():
    job = finetunejob(scheduling={"queueName": QUEUE})
    plan = ftj.decide(ftj.Observed(job=job, now=NOW), ftj.Settings())
    created = next(c for c in plan.create if c["kind"] == "PyTorchJob")
    assert created["metadata"]["name"] == "llama-lora-data" and created["spec"]["runPolicy"]["suspend"] is True
    assert plan.status["phase"] == "Queued" and condition(plan, "Queued")["reason"] == kueue.WAITING_REASON
    suspended = finetunejob(scheduling={"queueName": QUEUE}, runPolicy={"suspend": True})
    plan = ftj.decide(ftj.Observed(job=suspended, now=NOW), ftj.Settings())
    assert not plan.create and plan.status["phase"] == "Suspended" and not condition(plan, "Queued")


def test_kubetune_local_has_no_kueue_so_its_workloads_run_at_once():
    from kubetune_operator.local.finetunejob import prepare_job

    job = prepare_job(finetunejob(scheduling={"queueName": QUEUE, "priorityClassName": "batch"}),
                      namespace="default", output=None)
    assert job["spec"]["scheduling"] == {"priorityClassName": "batch"}
    assert rendered(job)["spec"]["runPolicy"]["suspend"] is False

"""The FineTuneJob state machine, one observation at a time."""

from __future__ import annotations

import copy

from kubetune.api.manifest import ManifestCheck, ManifestProblem
from kubetune_operator.backends import pytorchjob as pytorchjob_backend
from kubetune_operator.reconcile import conditions as cond
from kubetune_operator.reconcile import finetunejob as ftj
from kubetune_testing.factories import data_validated, finetunejob

NOW = "2026-11-28T12:00:00Z"
SETTINGS = ftj.Settings(publish_timeout_seconds=600)
MANIFEST = {
    "api": "kubetune.io/manifest/v1",
    "digest": "sha256:" + "d" * 64,
    "adapterPath": "adapter/sha256-" + "d" * 64 + "/",
    "files": [{"path": "adapter_model.safetensors", "sha256": "e" * 64, "size": 1000},
              {"path": "adapter_config.json", "sha256": "f" * 64, "size": 24}],
    "metrics": {"eval_loss": 1.25, "accuracy": 0.9, "note": "text is dropped"},
    "baselineMetrics": {"eval_loss": 2.5},
    "createdAt": "2026-11-28T11:59:00Z",
}


def step(job, pytorchjob=None, config_map=True, manifest=None, now=NOW):
    cm = {"metadata": {"name": "llama-lora-config"}} if config_map else None
    workload = pytorchjob_backend.read_status(pytorchjob) if pytorchjob is not None else None
    plan = ftj.decide(ftj.Observed(job=job, now=now, config_map=cm, workload=workload, manifest=manifest),
                      SETTINGS)
    after = copy.deepcopy(job)
    after["status"] = plan.status
    return plan, after


def pj(*conditions, suspend=False, replicas=None, start="2026-11-28T11:00:00Z", completion=None):
    status = {"conditions": [{"type": t, "status": "True", "reason": r, "message": m,
                              "lastTransitionTime": "2026-11-28T11:30:00Z"} for t, r, m in conditions]}
    if replicas:
        status["replicaStatuses"] = replicas
    if start:
        status["startTime"] = start
    if completion:
        status["completionTime"] = completion
    return {"metadata": {"name": "llama-lora"}, "spec": {"runPolicy": {"suspend": suspend}}, "status": status}


def view(pytorchjob):
    return pytorchjob_backend.read_status(pytorchjob)


def condition(job, kind):
    return cond.find(job["status"].get("conditions"), kind)


def created_job():
    _, job = step(data_validated(finetunejob()), config_map=False)
    return job


def test_new_job_creates_config_map_then_pytorchjob():
    plan, job = step(data_validated(finetunejob()), config_map=False)
    assert [c["kind"] for c in plan.create] == ["ConfigMap", "PyTorchJob"]
    assert job["status"]["phase"] == "Pending"
    assert condition(job, "Accepted")["status"] == "True"
    assert condition(job, "Accepted")["observedGeneration"] == 1
    assert job["status"]["trainingJob"] == {"name": "llama-lora", "configMap": "llama-lora-config", "generation": 1}
    assert job["status"]["rank"] == 16 and job["status"]["method"] == "LoRA"
    assert [e.reason for e in plan.events] == ["Created", "Pending"]


def test_existing_pytorchjob_is_never_created_again():
    job = created_job()
    for _ in range(3):
        plan, job = step(job, pytorchjob=pj())
        assert plan.create == []
    plan, _ = step(job, pytorchjob=pj(), config_map=False)
    assert [c["kind"] for c in plan.create] == ["ConfigMap"]  # pods need it; recreated alone


def test_invalid_spec_fails_without_children():
    doc = finetunejob(training={"epochs": 1, "maxSteps": 5})
    plan, job = step(doc, config_map=False)
    assert plan.create == []
    assert job["status"]["phase"] == "Failed"
    accepted = condition(job, "Accepted")
    assert accepted["status"] == "False" and accepted["reason"] == "InvalidSpec"
    assert "training.epochs or training.maxSteps" in accepted["message"]
    assert plan.events[-1].type == "Warning"


def test_fixed_spec_after_invalid_one_proceeds():
    _, job = step(finetunejob(training={"epochs": 1, "maxSteps": 5}), config_map=False)
    assert job["status"]["phase"] == "Failed"
    job["spec"]["training"] = {"epochs": 1}
    job["metadata"]["generation"] = 2
    plan, job = step(job, config_map=False)
    assert [c["metadata"]["name"] for c in plan.create] == ["llama-lora-data-config", "llama-lora-data"]
    assert condition(job, "Accepted")["observedGeneration"] == 2
    assert job["status"]["phase"] == "Validating"
    plan, job = step(data_validated(job), config_map=False)
    assert [c["kind"] for c in plan.create] == ["ConfigMap", "PyTorchJob"]
    assert job["status"]["phase"] == "Pending"
    assert condition(job, "Failed")["status"] == "False"
    assert "failure" not in job["status"] and "completionTime" not in job["status"]


def test_invalid_spec_update_while_running_keeps_following_the_job():
    job = created_job()
    _, job = step(job, pytorchjob=pj(("Running", "Running", "")))
    job["spec"]["training"] = {"epochs": 1, "maxSteps": 3}  # an API server without our CRD rules let it in
    job["metadata"]["generation"] = 2
    plan, job = step(job, pytorchjob=pj(("Running", "Running", "")), config_map=False)
    assert plan.create == []  # nothing is rendered from an invalid spec
    assert job["status"]["phase"] == "Running"
    accepted = condition(job, "Accepted")
    assert accepted["status"] == "False" and accepted["reason"] == "InvalidSpecUpdate"


def test_accepted_reason_stays_validated_while_the_spec_is_unchanged():
    job = created_job()
    _, job = step(job, pytorchjob=pj(("Running", "Running", "")))
    assert condition(job, "Accepted")["reason"] == "Validated"


def test_running_restarting_and_attempts_follow_the_pytorchjob():
    job = created_job()
    replicas = {"Master": {"active": 1}, "Worker": {"active": 1}}
    plan, job = step(job, pytorchjob=pj(("Created", "Created", ""), ("Running", "Running", "up"), replicas=replicas))
    assert job["status"]["phase"] == "Running"
    assert condition(job, "Running")["status"] == "True"
    assert job["status"]["startTime"] == "2026-11-28T11:00:00Z"
    assert job["status"]["replicas"]["Worker"] == {"active": 1, "succeeded": 0, "failed": 0}
    assert job["status"]["attempts"] == 1
    assert [e.reason for e in plan.events] == ["Running"]
    replicas = {"Master": {"active": 1, "failed": 1}}
    plan, job = step(job, pytorchjob=pj(("Restarting", "Restarting", "pod failed"), replicas=replicas))
    assert condition(job, "Running")["reason"] == "Restarting"
    assert job["status"]["attempts"] == 2
    assert plan.events == []  # phase unchanged: no event storm


def test_condition_transition_time_moves_only_on_status_change():
    job = created_job()
    _, job = step(job, pytorchjob=pj(("Running", "Running", "")), now="2026-11-28T12:00:00Z")
    _, job = step(job, pytorchjob=pj(("Running", "Running", "")), now="2026-11-28T12:05:00Z")
    assert condition(job, "Running")["lastTransitionTime"] == "2026-11-28T12:00:00Z"


def test_suspend_and_resume_patch_the_pytorchjob():
    job = created_job()
    _, job = step(job, pytorchjob=pj(("Running", "Running", "")))
    job["spec"]["runPolicy"] = {"suspend": True}
    job["metadata"]["generation"] = 2
    plan, job = step(job, pytorchjob=pj(("Running", "Running", "")))
    assert plan.suspend_workload is True
    assert job["status"]["phase"] == "Suspended"
    assert condition(job, "Suspended")["status"] == "True"
    assert condition(job, "Running")["status"] == "False"
    assert condition(job, "Accepted")["reason"] == "TrainingSpecLocked"
    plan, job = step(job, pytorchjob=pj(("Suspended", "Suspended", ""), suspend=True))
    assert plan.suspend_workload is None
    job["spec"]["runPolicy"] = {"suspend": False}
    job["metadata"]["generation"] = 3
    plan, job = step(job, pytorchjob=pj(("Suspended", "Suspended", ""), suspend=True))
    assert plan.suspend_workload is False
    assert condition(job, "Suspended")["status"] == "False"
    plan, job = step(job, pytorchjob=pj(("Running", "Running", "")))
    assert job["status"]["phase"] == "Running"


def test_created_suspended():
    plan, job = step(data_validated(finetunejob(runPolicy={"suspend": True})), config_map=False)
    assert plan.create[1]["spec"]["runPolicy"]["suspend"] is True
    assert job["status"]["phase"] == "Suspended"


def test_failure_carries_the_reason():
    job = created_job()
    failed = pj(("Failed", "PyTorchJobFailed", "1 Master replica(s) failed"), completion="2026-11-28T11:40:00Z")
    plan, job = step(job, pytorchjob=failed)
    assert job["status"]["phase"] == "Failed"
    assert job["status"]["failure"] == {"reason": "PyTorchJobFailed", "message": "1 Master replica(s) failed"}
    assert condition(job, "Failed")["status"] == "True"
    assert job["status"]["completionTime"] == "2026-11-28T11:40:00Z"
    assert plan.events[-1].type == "Warning" and plan.events[-1].reason == "PyTorchJobFailed"


def test_success_waits_for_the_manifest_then_publishes():
    job = created_job()
    succeeded = pj(("Succeeded", "PyTorchJobSucceeded", "done"), completion="2026-11-28T11:55:00Z")
    assert ftj.needs_manifest(job, view(succeeded))
    plan, job = step(job, pytorchjob=succeeded, manifest=ManifestCheck(found=False))
    assert job["status"]["phase"] == "Publishing"
    published = condition(job, "AdapterPublished")
    assert published["status"] == "False" and published["reason"] == "ManifestMissing"
    assert "manifest.json" in published["message"]
    assert plan.requeue_after
    check = ManifestCheck(found=True, document=MANIFEST, adapter_uri="s3://adapters/x/adapter/sha256-d/")
    plan, job = step(job, pytorchjob=succeeded, manifest=check)
    assert job["status"]["phase"] == "Succeeded"
    assert condition(job, "AdapterPublished")["status"] == "True"
    adapter = job["status"]["adapter"]
    assert adapter["digest"] == MANIFEST["digest"]
    assert adapter["sizeBytes"] == 1024
    assert adapter["metrics"] == {"eval_loss": 1.25, "accuracy": 0.9}
    assert adapter["baselineMetrics"] == {"eval_loss": 2.5}
    assert adapter["manifestUri"] == "s3://adapters/team-a/team-a/llama-lora/0b7f-uid/manifest.json"
    assert job["status"]["progress"]["evalLoss"] == 1.25
    assert plan.events[-1].reason == "AdapterPublished"
    assert not ftj.needs_manifest(job, view(succeeded))


def test_a_verified_merged_model_is_recorded_beside_the_adapter():
    job = created_job()
    succeeded = pj(("Succeeded", "PyTorchJobSucceeded", "done"), completion="2026-11-28T11:55:00Z")
    merged = {"uri": "s3://adapters/x/merged/sha256-m/", "manifestUri": "s3://adapters/x/merged/manifest.json",
              "digest": "sha256:" + "m" * 64, "sizeBytes": 5_000_000}
    check = ManifestCheck(found=True, document=MANIFEST, adapter_uri="s3://adapters/x/adapter/sha256-d/",
                          merged=merged)
    _, job = step(job, pytorchjob=succeeded, manifest=check)
    assert job["status"]["phase"] == "Succeeded"
    assert job["status"]["merged"] == merged
    assert job["status"]["adapter"]["sizeBytes"] == 1024  # the adapter's own files only
    assert f"merged model {merged['digest']} verified" in condition(job, "AdapterPublished")["message"]


def test_missing_manifest_fails_after_the_timeout():
    job = created_job()
    succeeded = pj(("Succeeded", "PyTorchJobSucceeded", "done"), completion="2026-11-28T11:50:00Z")
    _, job = step(job, pytorchjob=succeeded, manifest=ManifestCheck(found=False), now="2026-11-28T11:59:59Z")
    assert job["status"]["phase"] == "Publishing"
    _, job = step(job, pytorchjob=succeeded, manifest=ManifestCheck(found=False), now="2026-11-28T12:00:00Z")
    assert job["status"]["phase"] == "Failed"
    assert job["status"]["failure"]["reason"] == "ManifestMissing"


def test_digest_mismatch_is_never_published():
    job = created_job()
    succeeded = pj(("Succeeded", "PyTorchJobSucceeded", "done"))
    check = ManifestCheck(True, [ManifestProblem("DigestMismatch", "adapter_model.safetensors does not match")],
                          MANIFEST)
    _, job = step(job, pytorchjob=succeeded, manifest=check)
    assert job["status"]["phase"] == "Failed"
    assert condition(job, "AdapterPublished")["status"] == "False"
    assert condition(job, "AdapterPublished")["reason"] == "DigestMismatch"
    assert "adapter" not in job["status"]


def test_finished_job_survives_ttl_removal_of_the_pytorchjob():
    job = created_job()
    check = ManifestCheck(found=True, document=MANIFEST, adapter_uri="s3://a/")
    _, job = step(job, pytorchjob=pj(("Succeeded", "S", "")), manifest=check)
    final = copy.deepcopy(job["status"])
    plan, job = step(job, pytorchjob=None, config_map=False)
    assert plan.create == [] and plan.suspend_workload is None
    assert job["status"] == final


def test_pytorchjob_removed_before_we_saw_success_is_recovered_from_the_manifest():
    job = created_job()
    _, job = step(job, pytorchjob=pj(("Running", "Running", "")))
    assert ftj.needs_manifest(job, None)
    check = ManifestCheck(found=True, document=MANIFEST, adapter_uri="s3://a/")
    plan, job = step(job, pytorchjob=None, manifest=check)
    assert plan.create == []
    assert job["status"]["phase"] == "Succeeded"


def test_pytorchjob_deleted_mid_run_fails_instead_of_restarting():
    job = created_job()
    _, job = step(job, pytorchjob=pj(("Running", "Running", "")))
    plan, job = step(job, pytorchjob=None, manifest=ManifestCheck(found=False))
    assert plan.create == []
    assert job["status"]["failure"]["reason"] == "TrainingJobLost"


def test_deleting_job_decides_nothing():
    job = created_job()
    job["metadata"]["deletionTimestamp"] = NOW
    plan, after = step(job, pytorchjob=None, config_map=False)
    assert plan.create == [] and plan.events == [] and after["status"] == job["status"]


def test_status_patch_is_minimal_and_removes_keys():
    old = {"phase": "Running", "progress": {"step": 1, "evalLoss": 2.0}, "failure": {"reason": "x"}}
    new = {"phase": "Running", "progress": {"step": 2, "evalLoss": 2.0}}
    assert ftj.status_patch(old, new) == {"progress": {"step": 2}, "failure": None}
    assert ftj.status_patch(new, new) == {}


# --- trainer progress (progress.json) ---------------------------------------------------------------

PROGRESS = {"api": "kubetune.io/progress/v1", "stage": "training", "step": 30, "totalSteps": 120, "epoch": 0.75,
            "trainLoss": 1.5, "evalLoss": 1.7, "tokensPerSecond": 900.0, "etaSeconds": 42,
            "updateTime": "2026-11-28T11:59:55Z", "evalMetrics": {"accuracy": 0.61, "macro_f1": 0.5}}


def progress_step(job, pytorchjob, progress):
    plan = ftj.decide(ftj.Observed(job=job, now=NOW, config_map={"metadata": {}},
                                   workload=pytorchjob_backend.read_status(pytorchjob), progress=progress), SETTINGS)
    return plan, {**job, "status": plan.status}


def test_trainer_progress_reaches_status_with_percent():
    running = pj(("Running", "PyTorchJobRunning", "running"))
    job = created_job()
    assert ftj.needs_progress(job, view(running)) and not ftj.needs_progress(job, None)
    plan, job = progress_step(job, running, PROGRESS)
    progress = job["status"]["progress"]
    assert progress["step"] == 30 and progress["percent"] == 25 and progress["stage"] == "training"
    assert progress["accuracy"] == 0.61 and progress["macroF1"] == 0.5
    assert plan.requeue_after == SETTINGS.progress_seconds  # running: re-read as often as the trainer writes


def test_malformed_progress_is_ignored_field_by_field():
    running = pj(("Running", "PyTorchJobRunning", "running"))
    _, job = progress_step(created_job(), running, {**PROGRESS, "step": -1, "trainLoss": float("nan"),
                                                    "etaSeconds": "soon"})
    progress = job["status"]["progress"]
    assert "step" not in progress and "trainLoss" not in progress and "etaSeconds" not in progress
    _, job = progress_step(created_job(), running, {"api": "something/else", "step": 3})
    assert "progress" not in job["status"]


def test_failure_reason_comes_from_the_trainer_when_it_left_one():
    failed = pj(("Failed", "PyTorchJobFailed", "Master exited with code 2"))
    report = {**PROGRESS, "stage": "failed",
              "failure": {"reason": "BadInput", "message": "train.jsonl line 7: invalid_json"}}
    _, job = progress_step(created_job(), failed, report)
    assert job["status"]["failure"]["reason"] == "BadInput"
    assert "line 7: invalid_json" in job["status"]["failure"]["message"]
    assert "Master exited with code 2" in job["status"]["failure"]["message"]



def test_a_halted_training_fails_with_the_trainers_reason_and_step():
    """The guard's failure (exit 1, not retried) reaches status.failure in the trainer's words."""
    failed = pj(("Failed", "PyTorchJobFailed", "Master exited with code 1"))
    report = {**PROGRESS, "stage": "failed", "failure": {
        "reason": "NonFiniteLoss", "message": "loss became nan at step 3; lower the learning rate or use FP32/BF16"}}
    _, job = progress_step(created_job(), failed, report)
    assert job["status"]["phase"] == "Failed"
    assert job["status"]["failure"]["reason"] == "NonFiniteLoss"
    assert "at step 3" in job["status"]["failure"]["message"]

def test_local_runs_accept_file_outputs_and_clusters_do_not():
    job = finetunejob(output={"uri": "file:///tmp/out"})
    plan, after = step(job, config_map=False)
    assert after["status"]["phase"] == "Failed" and "kubetune local" in after["status"]["failure"]["message"]
    plan = ftj.decide(ftj.Observed(job=job, now=NOW), ftj.Settings(local=True))
    assert [c["kind"] for c in plan.create] == ["ConfigMap", "PyTorchJob"]


def test_a_pending_job_is_not_polled_for_progress_until_its_pods_start():
    """Pending jobs cost nothing between resyncs (BENCHMARKS.md, Scale): no progress.json before a pod ran,
    and the PyTorchJob's own events (watched) say when one does."""
    job = created_job()
    created = pj(("Created", "PyTorchJobCreated", "created"))
    assert not ftj.needs_progress(job, view(created)) and not ftj.needs_progress(job, view(pj()))
    for started in (pj(("Running", "PyTorchJobRunning", "")), pj(("Failed", "PyTorchJobFailed", "")),
                    pj(("Restarting", "PyTorchJobRestarting", ""))):
        assert ftj.needs_progress(job, view(started))  # a trainer that failed at once still left its reason
    plan, job = step(job, pytorchjob=created)
    assert job["status"]["phase"] == "Pending"
    assert plan.requeue_after == SETTINGS.resync_seconds
    assert "Pending" not in ftj.ACTIVE and "Running" in ftj.ACTIVE

"""The baseline gate: its own job, or the training job's first evaluation; the status it writes."""

from __future__ import annotations

import copy

import jsonschema

from kubetune.api.schema import strict_json_schema
from kubetune.api.validation import root_schema
from kubetune_operator.reconcile import finetunejob as ftj
from kubetune_operator.render import training as render
from kubetune_testing.factories import finetunejob
from tests.unit.stage_cluster import (
    BASELINE_JOB,
    DONE,
    NOW,
    ROOT,
    SETTINGS,
    START,
    SWEEP_JOB,
    TARGET,
    Cluster,
    baseline_cluster,
    config_json,
    created_pytorchjobs,
    reasons,
    row,
    sweep_cluster,
    sweep_result,
)

# --- baseline ----------------------------------------------------------------------------------------


def test_baseline_job_is_launched_first_and_alone():
    c = baseline_cluster()
    plan = c.reconcile()
    assert [(ch["kind"], ch["metadata"]["name"]) for ch in plan.create] == [
        ("ConfigMap", "llama-lora-baseline-config"), ("PyTorchJob", BASELINE_JOB)]
    pytorchjob = plan.create[1]
    assert pytorchjob["metadata"]["labels"][render.LABEL_STAGE] == "baseline"
    config = config_json(plan, "llama-lora-baseline-config")
    assert config["stage"]["kind"] == "baseline"
    assert config["storage"]["result_uri"] == ROOT + "baseline/result.json"
    assert config["storage"]["manifest_uri"] == ROOT + "manifest.json"
    assert c.status["phase"] == "Baseline"
    assert c.status["baseline"] == {"source": "BaselineJob", "job": BASELINE_JOB, "target": TARGET,
                                    "state": "Pending"}
    assert "trainingJob" not in c.status and "sweep" not in c.status
    assert reasons(plan) == ["BaselineStarted", "Baseline"]
    assert plan.requeue_after == SETTINGS.progress_seconds


def test_baseline_running_then_meeting_the_target_skips_training():
    c = baseline_cluster()
    c.reconcile()
    c.set(BASELINE_JOB, "Created", "Running")
    plan = c.reconcile()
    assert plan.create == [] and plan.events == []
    assert c.status["phase"] == "Baseline" and c.status["baseline"]["state"] == "Running"
    assert c.status["baseline"]["startTime"] == START
    assert ftj.needs_stage_reports(c.job, c.observe().stage_jobs) == {}  # running: nothing to read yet

    c.succeed(BASELINE_JOB, {"eval_loss": 0.8, "perplexity": 2.2})
    plan = c.reconcile()
    assert c.reports_read == {BASELINE_JOB: ROOT + "baseline/"}
    assert plan.create == []  # no training children
    assert c.status["phase"] == "Skipped"
    baseline = c.status["baseline"]
    assert baseline["state"] == "Succeeded" and baseline["met"] is True
    assert baseline["metrics"] == {"eval_loss": 0.8, "perplexity": 2.2}
    assert baseline["summary"] == "eval_loss 0.8 <= 1"
    assert baseline["durationSeconds"] == 3000.0
    sufficient = c.condition("BaselineSufficient")
    assert sufficient["status"] == "True" and sufficient["reason"] == "TargetMet"
    assert "forceTraining" in sufficient["message"]
    assert c.status["completionTime"] == NOW
    assert "trainingJob" not in c.status
    assert reasons(plan) == ["BaselineEvaluated", "BaselineSufficient"]
    assert plan.events[-1].type == "Normal" and plan.events[-1].message == sufficient["message"]
    assert plan.requeue_after is None

    final = copy.deepcopy(c.status)
    plan = c.reconcile(now="2026-11-28T13:00:00Z")  # Skipped is final
    assert plan.create == [] and plan.events == [] and c.status == final
    assert ftj.needs_stage_reports(c.job, c.observe().stage_jobs) == {}
    c.delete(BASELINE_JOB)  # removed by its TTL: nothing comes back
    plan = c.reconcile()
    assert plan.create == [] and c.status == final


def test_baseline_below_target_starts_training_with_the_baseline_metrics():
    c = baseline_cluster()
    c.reconcile()
    c.succeed(BASELINE_JOB, {"eval_loss": 1.7, "perplexity": 5.5})
    plan = c.reconcile()
    assert [(ch["kind"], ch["metadata"]["name"]) for ch in plan.create] == [
        ("ConfigMap", "llama-lora-config"), ("PyTorchJob", "llama-lora")]
    config = config_json(plan, "llama-lora-config")
    assert config["stage"]["kind"] == "train"
    assert config["stage"]["baseline_metrics"] == {"eval_loss": 1.7, "perplexity": 5.5}
    assert config["storage"]["job_prefix"] == ROOT and config["storage"]["result_uri"] == ""
    assert c.status["phase"] == "Pending"
    assert c.status["trainingJob"] == {"name": "llama-lora", "configMap": "llama-lora-config", "generation": 1}
    assert c.status["rank"] == 16
    baseline = c.status["baseline"]
    assert baseline["met"] is False and baseline["summary"] == "eval_loss 1.7 > 1"
    sufficient = c.condition("BaselineSufficient")
    assert sufficient["status"] == "False" and sufficient["reason"] == "BelowTarget"
    assert reasons(plan) == ["BaselineEvaluated", "Created", "Pending"]

    c.set("llama-lora", "Created", "Running")
    plan = c.reconcile()
    assert plan.create == [] and c.status["phase"] == "Running"
    assert c.status["baseline"]["source"] == "BaselineJob"  # training's own first evaluation does not replace it


def test_baseline_without_the_target_metric_trains():
    c = baseline_cluster()
    c.reconcile()
    c.succeed(BASELINE_JOB, {"perplexity": 5.5})
    plan = c.reconcile()
    assert created_pytorchjobs(plan) == ["llama-lora"]
    assert c.status["baseline"]["met"] is False
    assert c.status["baseline"]["summary"] == "eval_loss not reported"
    assert c.condition("BaselineSufficient")["reason"] == "MetricMissing"


def test_baseline_failure_carries_the_trainers_reason():
    c = baseline_cluster()
    c.reconcile()
    c.set(BASELINE_JOB, "Created", "Running")
    c.reconcile()
    c.fail(BASELINE_JOB, "Master exited with code 2")
    c.progress[BASELINE_JOB] = {"stage": "failed",
                                "failure": {"reason": "BadInput", "message": "validation.jsonl line 3: bad json"}}
    plan = c.reconcile()
    assert c.reports_read == {BASELINE_JOB: ROOT + "baseline/"}
    assert plan.create == []
    assert c.status["phase"] == "Failed"
    baseline = c.status["baseline"]
    assert baseline["state"] == "Failed"
    assert baseline["message"] == "BadInput: validation.jsonl line 3: bad json (Master exited with code 2)"
    assert baseline["completionTime"] == DONE
    assert c.status["failure"]["reason"] == "BaselineFailed"
    assert "BadInput: validation.jsonl line 3" in c.status["failure"]["message"]
    assert c.condition("Failed")["status"] == "True"
    assert plan.events[-1].type == "Warning" and plan.events[-1].reason == "BaselineFailed"
    assert "trainingJob" not in c.status

    final = copy.deepcopy(c.status)
    plan = c.reconcile()  # a failed baseline is final: no training, no retry
    assert plan.create == [] and c.status == final


def test_baseline_failure_without_a_trainer_report():
    c = baseline_cluster()
    c.reconcile()
    c.fail(BASELINE_JOB, "1 Master replica(s) failed")
    c.reconcile()
    assert c.status["baseline"]["message"] == "TrainingFailed: 1 Master replica(s) failed"
    assert c.status["failure"]["reason"] == "BaselineFailed"


def test_baseline_job_vanished_without_a_result_is_lost():
    c = baseline_cluster()
    c.reconcile()
    c.set(BASELINE_JOB, "Created", "Running")
    c.reconcile()
    c.delete(BASELINE_JOB)
    plan = c.reconcile()
    assert c.reports_read == {BASELINE_JOB: ROOT + "baseline/"}
    assert plan.create == []  # never re-created
    assert c.status["phase"] == "Failed"
    assert c.status["baseline"]["state"] == "Failed"
    assert c.status["baseline"]["message"].startswith(f"JobLost: PyTorchJob {BASELINE_JOB} was deleted")
    assert c.status["failure"]["reason"] == "BaselineFailed"
    assert "JobLost" in c.status["failure"]["message"]


def test_baseline_job_vanished_after_writing_its_result_succeeded():
    c = baseline_cluster()
    c.reconcile()
    c.set(BASELINE_JOB, "Created", "Running")
    c.reconcile()
    c.results[BASELINE_JOB] = {"metrics": {"eval_loss": 0.5}, "seconds": 42}
    c.delete(BASELINE_JOB)  # finished and removed by its TTL before the operator looked
    plan = c.reconcile()
    assert c.status["baseline"]["state"] == "Succeeded"
    assert c.status["baseline"]["metrics"] == {"eval_loss": 0.5}
    assert c.status["phase"] == "Skipped"
    assert plan.create == []


def test_suspended_baseline_is_not_launched_and_a_running_one_is_suspended():
    c = baseline_cluster(runPolicy={"suspend": True})
    plan = c.reconcile()
    assert plan.create == [] and c.status["phase"] == "Suspended"
    assert c.condition("Suspended")["status"] == "True"
    c.job["spec"]["runPolicy"] = {"suspend": False}
    plan = c.reconcile()
    assert created_pytorchjobs(plan) == [BASELINE_JOB] and c.status["phase"] == "Baseline"
    assert c.condition("Suspended")["status"] == "False"
    c.set(BASELINE_JOB, "Created", "Running")
    c.job["spec"]["runPolicy"] = {"suspend": True}
    plan = c.reconcile()
    assert plan.suspend_stage_jobs == {BASELINE_JOB: True}
    assert c.status["phase"] == "Suspended"
    plan = c.reconcile()
    assert plan.suspend_stage_jobs == {}  # already suspended



# --- the training job's own baseline -----------------------------------------------------------------


def test_baseline_from_the_training_jobs_progress_without_a_target():
    c = Cluster(finetunejob())
    plan = c.reconcile()
    assert created_pytorchjobs(plan) == ["llama-lora"]  # no separate baseline job without a target
    assert "baseline" not in c.status
    c.set("llama-lora", "Created", "Running")
    progress = {"api": "kubetune.io/progress/v1", "stage": "training", "step": 3, "totalSteps": 30,
                "baselineMetrics": {"eval_loss": 2.5, "perplexity": 12.2, "note": "dropped"}}
    c.reconcile(progress=progress)
    assert c.status["baseline"] == {"source": "TrainingJob", "job": "llama-lora", "state": "Succeeded",
                                    "metrics": {"eval_loss": 2.5, "perplexity": 12.2},
                                    "summary": "eval_loss 2.5"}
    assert c.condition("BaselineSufficient") is None
    assert c.status["phase"] == "Running"


def test_baseline_from_the_training_job_with_forced_training_records_the_target():
    c = Cluster(finetunejob(baseline={"target": dict(TARGET), "forceTraining": True}))
    plan = c.reconcile()
    assert created_pytorchjobs(plan) == ["llama-lora"]  # forced: no gate
    c.set("llama-lora", "Created", "Running")
    c.reconcile(progress={"baselineMetrics": {"eval_loss": 0.7}})
    baseline = c.status["baseline"]
    assert baseline["source"] == "TrainingJob" and baseline["met"] is True and baseline["target"] == TARGET
    assert baseline["summary"] == "eval_loss 0.7 <= 1"
    sufficient = c.condition("BaselineSufficient")
    assert sufficient["status"] == "True" and sufficient["reason"] == "TrainingForced"
    assert c.status["phase"] == "Running"


def test_disabled_baseline_is_not_recorded_from_training():
    c = Cluster(finetunejob(baseline={"enabled": False}))
    c.reconcile()
    c.set("llama-lora", "Created", "Running")
    c.reconcile(progress={"baselineMetrics": {"eval_loss": 2.5}})
    assert "baseline" not in c.status


# --- the status written is one the API server accepts ------------------------------------------------


STATUS_SCHEMA = jsonschema.Draft4Validator(strict_json_schema(root_schema("FineTuneJob")["properties"]["status"]))


def status_errors(status: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in STATUS_SCHEMA.iter_errors(status)]


def test_status_of_a_finished_sweep_and_a_training_baseline_conforms_to_the_crd_schema():
    c = sweep_cluster(ranks=(4, 8))
    c.reconcile()
    rows = [row(4, "Succeeded", 1.1, rung=0), row(8, "Diverged", None, rung=0, message="holdout loss is nan"),
            row(8, "Stopped", 1.2, rung=0, lr=5e-5, retryOf="r8-lr0.0002")]
    c.results[SWEEP_JOB] = sweep_result(rows)
    c.set(SWEEP_JOB, "Created", "Running", "Succeeded", completion=DONE)
    c.reconcile()
    c.set("llama-lora", "Created", "Running")
    c.reconcile(progress={"baselineMetrics": {"eval_loss": 2.0}})
    assert c.status["phase"] == "Running" and c.status["baseline"]["source"] == "TrainingJob"
    assert status_errors(c.status) == []


def test_running_sweep_status_conforms_to_the_crd_schema():
    c = sweep_cluster(ranks=(4, 8))
    c.reconcile()
    c.set(SWEEP_JOB, "Created", "Running")
    c.progress[SWEEP_JOB] = {"sweep": {"trials": [row(4, "Running", 1.3, rung=0)], "usedSteps": 10}}
    c.reconcile()
    assert c.status["sweep"]["trials"][0]["state"] == "Running"
    assert status_errors(c.status) == []


def test_baseline_job_status_conforms_to_the_crd_schema():
    c = baseline_cluster()
    c.reconcile()
    assert status_errors(c.status) == []
    c.set(BASELINE_JOB, "Created", "Running")
    c.reconcile()
    assert status_errors(c.status) == []
    c.succeed(BASELINE_JOB, {"eval_loss": 1.5})
    c.reconcile()
    assert status_errors(c.status) == []

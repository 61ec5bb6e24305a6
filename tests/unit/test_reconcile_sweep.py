"""The LoRA rank sweep as the operator sees it: one sweep workload launched, followed (its live table
from progress.json), adopted, and its table and choice recorded in status.sweep."""

from __future__ import annotations

import copy

from kubetune.api import jobconfig
from kubetune.api.validation import validate
from kubetune_operator.backends import pytorchjob as pytorchjob_backend
from kubetune_operator.backends import render_children
from kubetune_operator.reconcile import finetunejob as ftj
from kubetune_operator.reconcile import stage_jobs
from kubetune_operator.render import training as render
from kubetune_testing.factories import finetunejob
from tests.unit.stage_cluster import (
    BASELINE_JOB,
    DONE,
    ROOT,
    SETTINGS,
    SWEEP_JOB,
    TARGET,
    Cluster,
    config_json,
    created_pytorchjobs,
    reasons,
    row,
    sweep_cluster,
    sweep_result,
    with_conditions,
)

HALVED = [row(4, "Stopped", 1.30, rung=0, message="halved out after rung 0 (10 steps)"),
          row(8, "Stopped", 1.12, rung=1, message="halved out after rung 1 (20 steps)"),
          row(16, "Succeeded", 1.10, rung=1)]


def finish_sweep(c: Cluster, rows: list[dict]) -> None:
    c.results[SWEEP_JOB] = sweep_result(rows)
    c.set(SWEEP_JOB, "Created", "Running", "Succeeded", completion=DONE)


def test_one_sweep_workload_then_training_with_the_chosen_rank():
    c = sweep_cluster(ranks=(16, 4, 8))
    plan = c.reconcile()
    assert [(ch["kind"], ch["metadata"]["name"]) for ch in plan.create] == [
        ("ConfigMap", "llama-lora-rank-sweep-config"), ("PyTorchJob", SWEEP_JOB)]
    assert c.status["phase"] == "Sweeping" and "rank" not in c.status
    assert c.status["sweep"]["state"] == "Pending" and c.status["sweep"]["job"] == SWEEP_JOB
    assert reasons(plan) == ["SweepStarted", "Sweeping"]
    assert "ranks 4, 8, 16 within 0.3" in plan.events[0].message
    config = config_json(plan, "llama-lora-rank-sweep-config")
    assert config["stage"] == {"kind": "sweep", "holdout_fraction": 0.1, "baseline_metrics": None}
    # the job's own training settings (they size the budget) and the sweep's own settings travel
    assert config["spec"]["training"]["epochs"] == 3 and config["spec"]["rankSweep"]["budget"] == 0.3
    assert config["spec"]["baseline"]["enabled"] is False and config["spec"]["output"]["mergeAdapter"] is False

    finish_sweep(c, HALVED)
    plan = c.reconcile()
    sweep = c.status["sweep"]
    assert sweep["state"] == "Succeeded" and sweep["bestRank"] == 16 and sweep["bestMetric"] == 1.10
    assert sweep["bestLearningRate"] == 2e-4
    assert (sweep["fullRunSteps"], sweep["budgetSteps"], sweep["usedSteps"]) == (200, 60, 60)
    assert [t["state"] for t in sweep["trials"]] == ["Stopped", "Stopped", "Succeeded"]
    assert sweep["summary"] == "3 configs, 2 halved, best r16 lr0.0002"
    assert c.status["rank"] == 16
    selected = c.condition("RankSelected")
    assert selected["status"] == "True" and selected["reason"] == "BestHoldoutMetric"
    assert selected["message"].startswith("rank 16 (alpha 32) at learning rate 0.0002 has the lowest holdout "
                                          "eval_loss (1.1) after 20 steps, of 3 configs")
    assert "RankChosen" in reasons(plan)
    config = config_json(c, "llama-lora-config")
    assert config["stage"]["kind"] == "train"
    assert config["spec"]["method"]["lora"]["rank"] == 16 and config["spec"]["method"]["lora"]["alpha"] == 32
    assert "learningRate" not in config["spec"]["training"]  # not swept: left to the trainer's default
    assert c.status["trainingJob"]["name"] == "llama-lora"
    c.set("llama-lora", "Created", "Running")
    plan = c.reconcile()
    assert plan.create == [] and c.status["phase"] == "Running" and c.status["rank"] == 16
    assert "RankChosen" not in reasons(plan)


def test_swept_learning_rate_is_applied_to_the_full_run():
    c = sweep_cluster(ranks=(4, 8), learningRates=[1e-3, 4e-3])
    c.reconcile()
    finish_sweep(c, [row(4, "Stopped", 0.9, rung=0, lr=1e-3), row(4, "Succeeded", 0.7, rung=1, lr=4e-3),
                     row(8, "Stopped", 0.8, rung=1, lr=1e-3), row(8, "AtChance", 2.3, rung=0, lr=4e-3,
                                                                   message="holdout loss 2.3 >= ...")])
    c.reconcile()
    assert c.status["sweep"]["bestRank"] == 4 and c.status["sweep"]["bestLearningRate"] == 4e-3
    assert c.status["sweep"]["summary"] == "4 configs, 2 halved, 1 at chance, best r4 lr0.004"
    spec = config_json(c, "llama-lora-config")["spec"]
    assert spec["method"]["lora"]["rank"] == 4 and spec["training"]["learningRate"] == 4e-3


def test_rank_chosen_event_carries_the_table_with_states():
    c = sweep_cluster(ranks=(4, 8, 16))
    c.reconcile()
    retry = row(16, "Stopped", 1.2, rung=0, lr=5e-5, retryOf="r16-lr0.0002", message="halved out after rung 0")
    finish_sweep(c, [*HALVED[:2], row(16, "Diverged", None, rung=0, message="holdout loss is nan"), retry])
    plan = c.reconcile()
    event = next(e for e in plan.events if e.reason == "RankChosen")
    table = event.message.splitlines()
    assert table[0].startswith("rank 8 (alpha 16) at learning rate 0.0002 has the lowest")
    assert table[1].split()[:7] == ["rank", "alpha", "lr", "state", "rung", "steps", "eval_loss"]
    assert table[3].split()[:7] == ["8", "16", "0.0002", "Stopped", "1", "20", "1.1200"]  # halved at rung 1, wins
    assert table[4].split()[:6] == ["16", "32", "0.0002", "Diverged", "0", "10"] and "nan" in table[4]
    assert "retry of r16-lr0.0002" in table[5]


def test_ties_at_the_last_rung_go_to_the_smaller_rank():
    c = sweep_cluster(ranks=(4, 8), tieTolerance=0.05)
    c.reconcile()
    finish_sweep(c, [row(4, "Stopped", 1.13, rung=0), row(8, "Succeeded", 1.10, rung=0)])
    c.reconcile()
    assert c.status["sweep"]["bestRank"] == 4
    assert "ties within 0.05 go to the smaller rank" in c.condition("RankSelected")["message"]


def test_live_table_comes_from_progress_while_the_sweep_runs():
    c = sweep_cluster(ranks=(4, 8))
    c.reconcile()
    c.set(SWEEP_JOB, "Created", "Running")
    c.progress[SWEEP_JOB] = {"stage": "sweeping", "sweep": {"trials": [row(4, "Running", 1.4, rung=0),
                                                                       {"rank": "x", "state": "Nonsense"}],
                                                            "usedSteps": 10, "budgetSteps": 60}}
    c.reconcile()
    assert SWEEP_JOB in c.reports_read  # a running sweep's progress is read for its table
    sweep = c.status["sweep"]
    assert sweep["state"] == "Running" and sweep["usedSteps"] == 10
    assert sweep["trials"] == [row(4, "Running", 1.4, rung=0)]  # the malformed row is left out
    assert sweep["summary"] == "1 configs, 1 running" and "bestRank" not in sweep
    assert c.status["phase"] == "Sweeping"


def test_no_config_that_learned_fails_the_job_with_the_table():
    c = sweep_cluster(ranks=(4, 8))
    c.reconcile()
    finish_sweep(c, [row(4, "AtChance", 4.3, rung=0, message="holdout loss 4.3 >= 0.97 ln(77)"),
                     row(8, "Diverged", None, rung=0, message="holdout loss is nan")])
    c.reconcile()
    assert c.status["phase"] == "Failed" and c.status["failure"]["reason"] == "SweepFailed"
    assert "no config of the rank sweep learned anything" in c.status["failure"]["message"]
    assert "AtChance" in c.status["failure"]["message"]
    assert created_pytorchjobs(c.reconcile()) == []


def test_sweep_workload_failing_fails_the_job_with_the_trainer_reason():
    c = sweep_cluster(ranks=(4, 8))
    c.reconcile()
    c.progress[SWEEP_JOB] = {"failure": {"reason": "BadInput", "message": "rankSweep cannot run under deepspeed"}}
    c.fail(SWEEP_JOB)
    c.reconcile()
    assert c.status["sweep"]["state"] == "Failed"
    assert c.status["failure"]["reason"] == "SweepFailed"
    assert "BadInput: rankSweep cannot run under deepspeed" in c.status["failure"]["message"]


def test_sweep_result_missing_beyond_the_publish_timeout_fails():
    c = sweep_cluster(ranks=(4, 8))
    c.reconcile()
    c.set(SWEEP_JOB, "Created", "Running", "Succeeded", completion=DONE)
    c.reconcile(now="2026-11-28T11:51:00Z")
    assert c.status["sweep"]["state"] == "Running" or c.status["sweep"]["state"] == "Pending"
    c.reconcile(now="2026-11-28T12:30:00Z")
    assert c.status["failure"]["reason"] == "SweepFailed" and "ResultMissing" in c.status["failure"]["message"]


def test_sweep_created_but_not_recorded_is_adopted_not_created_again():
    c = sweep_cluster(ranks=(4, 8))
    c.reconcile()
    c.job.pop("status")  # the operator crashed after creating the sweep, before writing the status
    c.job = {**c.job, "status": {"data": {"state": "Succeeded", "job": "llama-lora-data"}}}
    plan = c.reconcile()
    assert created_pytorchjobs(plan) == [] and "SweepStarted" not in reasons(plan)
    assert c.status["sweep"]["state"] == "Pending"


def test_finished_sweep_is_never_relaunched_when_its_workload_is_gone():
    c = sweep_cluster(ranks=(4, 8))
    c.reconcile()
    finish_sweep(c, HALVED[1:])
    c.reconcile()
    c.delete(SWEEP_JOB)
    plan = c.reconcile()
    assert SWEEP_JOB not in created_pytorchjobs(plan) and c.status["sweep"]["bestRank"] == 16


def test_sweep_workload_vanished_with_its_result_counts():
    c = sweep_cluster(ranks=(4, 8))
    c.reconcile()
    c.set(SWEEP_JOB, "Created", "Running")
    c.reconcile()
    c.delete(SWEEP_JOB)
    c.results[SWEEP_JOB] = sweep_result(HALVED[1:])
    c.reconcile()
    assert c.status["sweep"]["state"] == "Succeeded" and c.status["rank"] == 16


def test_suspend_during_the_sweep_suspends_it_and_resumes():
    c = sweep_cluster(ranks=(4, 8))
    c.reconcile()
    c.set(SWEEP_JOB, "Created", "Running")
    c.job["spec"]["runPolicy"] = {"suspend": True}
    c.job["metadata"]["generation"] = 2
    plan = c.reconcile()
    assert plan.create == [] and plan.suspend_stage_jobs == {SWEEP_JOB: True}
    assert c.status["phase"] == "Suspended" and "rank sweep is suspended" in c.condition("Suspended")["message"]
    c.job["spec"]["runPolicy"] = {"suspend": False}
    c.job["metadata"]["generation"] = 3
    plan = c.reconcile()
    assert plan.suspend_stage_jobs == {SWEEP_JOB: False} and c.status["phase"] == "Sweeping"


def test_suspended_before_the_sweep_starts_launches_nothing():
    c = sweep_cluster(ranks=(4, 8))
    c.job["spec"]["runPolicy"] = {"suspend": True}
    plan = c.reconcile()
    assert plan.create == [] and c.status["phase"] == "Suspended"


def test_needs_stage_reports_names_the_running_and_the_finished_sweep():
    job = finetunejob(rankSweep={"ranks": [4, 8]})
    stage = jobconfig.Stage(kind=jobconfig.STAGE_SWEEP, holdout_fraction=0.1)
    sweep = render_children(validate(job).defaulted, render.RenderSettings(), stage)[1]
    finished = pytorchjob_backend.read_status(with_conditions(sweep, "Succeeded", completion=DONE))
    assert stage_jobs.stage_of(job, finished).kind == jobconfig.STAGE_SWEEP
    assert ftj.needs_stage_reports(job, {SWEEP_JOB: finished}) == {SWEEP_JOB: ROOT + "sweep/"}
    running = pytorchjob_backend.read_status(with_conditions(sweep, "Running"))
    assert ftj.needs_stage_reports(job, {SWEEP_JOB: running}) == {SWEEP_JOB: ROOT + "sweep/"}
    # recorded as finished: not read again
    done = {**job, "status": {"sweep": {"job": SWEEP_JOB, "state": "Succeeded"}}}
    assert ftj.needs_stage_reports(done, {SWEEP_JOB: finished}) == {}
    stranger = {"metadata": {"name": "x", "labels": {render.LABEL_STAGE: "trial"}}}
    assert stage_jobs.stage_of(job, pytorchjob_backend.read_status(stranger)) is None


def test_spec_invalid_mid_sweep_launches_nothing_and_does_not_fail():
    c = sweep_cluster(ranks=(4, 8))
    c.reconcile()
    c.set(SWEEP_JOB, "Created", "Running")
    c.reconcile()
    c.job["spec"]["training"] = {"epochs": 1, "maxSteps": 5}  # invalid: both
    c.job["metadata"]["generation"] = 2
    finish_sweep(c, HALVED[1:])
    plan = c.reconcile()
    assert plan.create == [] and c.condition("Accepted")["reason"] == "InvalidSpecUpdate"
    assert c.status["phase"] == "Sweeping" and "failure" not in c.status
    c.job["spec"]["training"] = {"epochs": 1}
    c.job["metadata"]["generation"] = 3
    plan = c.reconcile()
    assert created_pytorchjobs(plan) == ["llama-lora"] and c.status["rank"] == 16


def test_deciding_twice_on_one_observation_gives_the_same_plan():
    c = sweep_cluster(ranks=(4, 8))
    c.reconcile()
    finish_sweep(c, HALVED[1:])
    observed = c.observe()
    first, second = ftj.decide(copy.deepcopy(observed), SETTINGS), ftj.decide(copy.deepcopy(observed), SETTINGS)
    assert first.status == second.status and [e.reason for e in first.events] == [e.reason for e in second.events]


def test_baseline_then_sweep_then_training_with_both():
    c = Cluster(finetunejob(baseline={"target": dict(TARGET)}, rankSweep={"ranks": [4, 8]}))
    plan = c.reconcile()
    assert created_pytorchjobs(plan) == [BASELINE_JOB]  # the sweep waits for the gate
    assert "sweep" not in c.status
    c.succeed(BASELINE_JOB, {"eval_loss": 1.9})
    plan = c.reconcile()
    assert created_pytorchjobs(plan) == [SWEEP_JOB] and c.status["phase"] == "Sweeping"
    finish_sweep(c, [row(4, "Succeeded", 1.1, rung=0), row(8, "Stopped", 1.2, rung=0)])
    plan = c.reconcile()
    assert created_pytorchjobs(plan) == ["llama-lora"]
    config = config_json(c, "llama-lora-config")
    assert config["stage"]["baseline_metrics"] == {"eval_loss": 1.9}
    assert config["spec"]["method"]["lora"]["rank"] == 4 and config["spec"]["method"]["lora"]["alpha"] == 8


def test_sweep_with_the_baseline_met_never_starts():
    c = Cluster(finetunejob(baseline={"target": dict(TARGET)}, rankSweep={"ranks": [4, 8]}))
    c.reconcile()
    c.succeed(BASELINE_JOB, {"eval_loss": 0.2})
    plan = c.reconcile()
    assert plan.create == [] and c.status["phase"] == "Skipped" and "sweep" not in c.status

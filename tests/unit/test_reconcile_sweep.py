"""The LoRA rank sweep: trials launched within parallelism, followed, adopted, judged."""

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
    TARGET,
    Cluster,
    baseline_cluster,
    config_json,
    created_pytorchjobs,
    reasons,
    sweep_cluster,
    trial_name,
    with_conditions,
)

# --- the rank sweep ----------------------------------------------------------------------------------


def run_sweep(c: Cluster, metrics: dict[int, float | None], parallelism: int) -> list[str]:
    """Drive a sweep to its end: every launched trial runs, then finishes with its metric (None: fails).
    Checks the parallelism limit after every reconcile; returns the trial PyTorchJobs in creation order."""
    launched: list[str] = []
    for _ in range(4 * len(metrics) + 4):
        plan = c.reconcile()
        launched += [n for n in created_pytorchjobs(plan) if "-sweep-" in n]
        assert len(c.active()) <= parallelism, c.active()
        if c.status.get("phase") != "Sweeping":
            return launched
        for name in c.active():
            rank = int(name.rsplit("-r", 1)[1])
            conditions = [ct["type"] for ct in c.pytorchjobs[name].get("status", {}).get("conditions", [])]
            if "Running" not in conditions:
                c.set(name, "Created", "Running")
            elif metrics[rank] is None:
                c.fail(name)
            else:
                c.succeed(name, {"eval_loss": metrics[rank], "perplexity": 2.0})
    raise AssertionError("the sweep did not finish")


def test_sweep_with_parallelism_1_runs_trials_in_rank_order_then_trains_the_best_rank():
    c = sweep_cluster(ranks=(16, 4, 8), parallelism=1)
    plan = c.reconcile()
    assert [(ch["kind"], ch["metadata"]["name"]) for ch in plan.create] == [
        ("ConfigMap", "llama-lora-sweep-r4-config"), ("PyTorchJob", trial_name(4))]
    assert c.status["phase"] == "Sweeping"
    assert "rank" not in c.status  # not chosen yet
    trials = c.trials()
    assert [(r, t["state"], t["alpha"], t["job"]) for r, t in trials.items()] == [
        (4, "Pending", 8, trial_name(4)), (8, "Queued", 16, trial_name(8)), (16, "Queued", 32, trial_name(16))]
    assert c.status["sweep"]["summary"] == "0/3 done, 1 running"
    assert reasons(plan) == ["TrialStarted", "Sweeping"]
    config = config_json(plan, "llama-lora-sweep-r4-config")
    assert config["stage"] == {"kind": "trial", "rank": 4, "holdout_fraction": 0.1, "max_steps": None,
                               "baseline_metrics": None}
    assert config["spec"]["method"]["lora"]["rank"] == 4 and config["spec"]["method"]["lora"]["alpha"] == 8
    assert "rankSweep" not in config["spec"]

    launched = [trial_name(4), *run_sweep(c, {4: 1.30, 8: 1.10, 16: 1.20}, parallelism=1)]
    assert launched == [trial_name(4), trial_name(8), trial_name(16)]
    assert ("PyTorchJob", "llama-lora") in c.created
    sweep = c.status["sweep"]
    assert sweep["bestRank"] == 8 and sweep["bestMetric"] == 1.10
    assert sweep["completed"] == 3 and sweep["total"] == 3
    assert sweep["summary"] == "3/3 done, best r8"
    assert [t["state"] for t in sweep["trials"]] == ["Succeeded"] * 3
    assert [t["metric"] for t in sweep["trials"]] == [1.30, 1.10, 1.20]
    assert sweep["trials"][1]["metrics"] == {"eval_loss": 1.10, "perplexity": 2.0}
    assert c.status["rank"] == 8
    selected = c.condition("RankSelected")
    assert selected["status"] == "True" and selected["reason"] == "BestHoldoutMetric"
    assert selected["message"].startswith("rank 8 (alpha 16) has the lowest holdout eval_loss (1.1) of 3 trials")
    config = config_json(c, "llama-lora-config")
    assert config["stage"]["kind"] == "train" and config["stage"]["baseline_metrics"] is None
    assert config["spec"]["method"]["lora"]["rank"] == 8 and config["spec"]["method"]["lora"]["alpha"] == 16
    assert config["spec"]["training"]["epochs"] == 3  # the full run's schedule, not the trial's
    assert c.status["phase"] == "Pending"
    assert c.status["trainingJob"]["name"] == "llama-lora"

    # training runs: the sweep is done, nothing else is launched, the rank stays
    c.set("llama-lora", "Created", "Running")
    plan = c.reconcile()
    assert plan.create == [] and c.status["phase"] == "Running" and c.status["rank"] == 8


def test_rank_chosen_event_carries_the_table():
    c = sweep_cluster(ranks=(4, 8), parallelism=2)
    c.reconcile()
    c.succeed(trial_name(4), {"eval_loss": 1.3})
    c.reconcile()
    c.succeed(trial_name(8), {"eval_loss": 1.1})
    plan = c.reconcile()
    assert reasons(plan) == ["TrialSucceeded", "RankChosen", "Created", "Pending"]
    assert plan.events[0].message == "rank 8: holdout eval_loss 1.1 in 3000s"
    table = plan.events[1].message.splitlines()
    assert table[0].startswith("rank 8 (alpha 16) has the lowest holdout eval_loss")
    assert table[-1].split() == ["8", "16", "Succeeded", "1.1000", "3000", "<-", "chosen"]
    assert table[-2].split() == ["4", "8", "Succeeded", "1.3000", "3000"]


def test_sweep_with_parallelism_2_never_runs_more_than_two():
    c = sweep_cluster(ranks=(32, 4, 16, 8), parallelism=2)
    plan = c.reconcile()
    assert created_pytorchjobs(plan) == [trial_name(4), trial_name(8)]
    assert [t["state"] for t in c.status["sweep"]["trials"]] == ["Pending", "Pending", "Queued", "Queued"]
    assert c.status["sweep"]["summary"] == "0/4 done, 2 running"
    c.set(trial_name(4), "Created", "Running")
    plan = c.reconcile()
    assert plan.create == []
    c.succeed(trial_name(4), {"eval_loss": 1.0})
    plan = c.reconcile()
    assert created_pytorchjobs(plan) == [trial_name(16)]  # the next rank in order, one free slot
    assert len(c.active()) == 2
    c.fail(trial_name(8))
    c.succeed(trial_name(16), {"eval_loss": 1.2})
    plan = c.reconcile()
    assert created_pytorchjobs(plan) == [trial_name(32)]
    c.succeed(trial_name(32), {"eval_loss": 0.99})
    plan = c.reconcile()
    assert created_pytorchjobs(plan) == ["llama-lora"]
    assert c.status["sweep"]["bestRank"] == 32 and c.status["rank"] == 32
    assert c.status["sweep"]["summary"] == "4/4 done, 1 failed, best r32"
    assert [n for k, n in c.created if k == "PyTorchJob"] == [trial_name(4), trial_name(8), trial_name(16),
                                                              trial_name(32), "llama-lora"]


def test_sweep_with_parallelism_2_full_flow_stays_within_the_limit():
    c = sweep_cluster(ranks=(4, 8, 16, 32, 64), parallelism=2)
    launched = run_sweep(c, {4: 1.5, 8: 1.4, 16: None, 32: 1.41, 64: 1.6}, parallelism=2)
    assert launched == [trial_name(r) for r in (4, 8, 16, 32, 64)]
    assert c.status["sweep"]["bestRank"] == 8


def test_tie_tolerance_prefers_the_smaller_rank():
    c = sweep_cluster(ranks=(4, 8, 16), parallelism=3, tieTolerance=0.05)
    c.reconcile()
    c.succeed(trial_name(4), {"eval_loss": 1.30})
    c.succeed(trial_name(8), {"eval_loss": 1.12})
    c.succeed(trial_name(16), {"eval_loss": 1.10})
    c.reconcile()
    assert c.status["sweep"]["bestRank"] == 8 and c.status["sweep"]["bestMetric"] == 1.12
    assert "ties within 0.05 go to the smaller rank" in c.condition("RankSelected")["message"]
    assert config_json(c, "llama-lora-config")["spec"]["method"]["lora"]["rank"] == 8


def test_trial_created_but_not_recorded_is_adopted_not_created_again():
    c = sweep_cluster(ranks=(4, 8, 16), parallelism=1)
    c.reconcile()
    # the operator crashed after creating the trial's children, before writing the status
    c.job.pop("status")
    plan = c.reconcile()
    assert plan.create == []
    assert [t["state"] for t in c.status["sweep"]["trials"]] == ["Pending", "Queued", "Queued"]
    c.set(trial_name(4), "Created", "Running")
    plan = c.reconcile()
    assert plan.create == [] and c.trials()[4]["state"] == "Running"


def test_trial_created_while_the_status_says_queued_is_adopted():
    c = sweep_cluster(ranks=(4, 8, 16), parallelism=1)
    c.reconcile()
    c.set(trial_name(4), "Created", "Running")
    c.reconcile()
    before_launch = copy.deepcopy(c.job)  # r4 Running, r8 Queued
    c.succeed(trial_name(4), {"eval_loss": 1.3})
    plan = c.reconcile()
    assert created_pytorchjobs(plan) == [trial_name(8)]
    # the status write of that pass was lost: the status still says r4 Running and r8 Queued
    c.job = {**before_launch, "status": {**before_launch["status"]}}
    c.set(trial_name(8), "Created", "Running")
    plan = c.reconcile()
    assert plan.create == []  # r8 exists: followed, not created again; r16 waits for its slot
    trials = c.trials()
    assert trials[4]["state"] == "Succeeded" and trials[4]["metric"] == 1.3
    assert trials[8]["state"] == "Running" and trials[16]["state"] == "Queued"


def test_trial_config_map_lost_is_recreated_alone():
    c = sweep_cluster(ranks=(4, 8), parallelism=1)
    c.reconcile()
    del c.config_maps["llama-lora-sweep-r4-config"]
    plan = c.reconcile()
    assert [(ch["kind"], ch["metadata"]["name"]) for ch in plan.create] == [
        ("ConfigMap", "llama-lora-sweep-r4-config")]


def test_deciding_twice_on_one_observation_gives_the_same_plan():
    c = sweep_cluster(ranks=(4, 8, 16, 32), parallelism=2)
    c.reconcile()
    c.succeed(trial_name(4), {"eval_loss": 1.0})
    c.set(trial_name(8), "Created", "Running")
    observed = c.observe()
    first, second = ftj.decide(observed, SETTINGS), ftj.decide(observed, SETTINGS)
    assert first == second
    assert created_pytorchjobs(first) == [trial_name(16)]
    assert observed.job == c.job  # decide does not mutate what it observed
    c.reconcile()
    # the next pass sees what the last one created and its status: nothing new
    for _ in range(3):
        plan = c.reconcile()
        assert plan.create == [] and plan.events == []
    assert [n for k, n in c.created if k == "PyTorchJob"] == [trial_name(4), trial_name(8), trial_name(16)]
    assert c.trials()[4]["state"] == "Succeeded" and c.trials()[16]["state"] == "Pending"


def test_sweep_resumes_from_status_after_a_restart():
    c = sweep_cluster(ranks=(4, 8, 16), parallelism=1)
    c.reconcile()
    c.succeed(trial_name(4), {"eval_loss": 1.3})
    c.reconcile()
    c.set(trial_name(8), "Created", "Running")
    c.reconcile()
    # a new operator process: only the cluster's state (status, children) is left
    restarted = Cluster(copy.deepcopy(c.job))
    restarted.pytorchjobs = copy.deepcopy(c.pytorchjobs)
    restarted.config_maps = copy.deepcopy(c.config_maps)
    plan = restarted.reconcile()
    assert plan.create == [] and plan.events == []
    assert restarted.status["sweep"] == c.status["sweep"]
    restarted.succeed(trial_name(8), {"eval_loss": 1.1})
    plan = restarted.reconcile()
    assert created_pytorchjobs(plan) == [trial_name(16)]


def test_finished_trials_are_never_relaunched_when_their_pytorchjobs_are_gone():
    c = sweep_cluster(ranks=(4, 8, 16), parallelism=2)
    c.reconcile()
    c.succeed(trial_name(4), {"eval_loss": 1.3})
    c.fail(trial_name(8))
    c.reconcile()
    assert c.trials()[8]["state"] == "Failed" and c.trials()[16]["state"] == "Pending"
    recorded = {r: copy.deepcopy(c.trials()[r]) for r in (4, 8)}
    c.delete(trial_name(4))  # TTL
    c.delete(trial_name(8))
    plan = c.reconcile()
    assert plan.create == [] and c.reports_read == {}
    assert {r: c.trials()[r] for r in (4, 8)} == recorded
    c.succeed(trial_name(16), {"eval_loss": 1.2})
    plan = c.reconcile()
    assert created_pytorchjobs(plan) == ["llama-lora"]
    assert c.status["sweep"]["bestRank"] == 16
    assert [n for k, n in c.created if k == "PyTorchJob"].count(trial_name(4)) == 1


def test_a_failed_trial_does_not_stop_the_sweep():
    c = sweep_cluster(ranks=(4, 8), parallelism=1)
    c.reconcile()
    c.fail(trial_name(4), "Master exited with code 1")
    c.progress[trial_name(4)] = {"failure": {"reason": "NonFiniteLoss", "message": "loss is NaN at step 7"}}
    plan = c.reconcile()
    assert c.reports_read == {trial_name(4): ROOT + "sweep/rank-4/"}
    assert created_pytorchjobs(plan) == [trial_name(8)]
    failed = c.trials()[4]
    assert failed["state"] == "Failed"
    assert failed["message"] == "NonFiniteLoss: loss is NaN at step 7 (Master exited with code 1)"
    assert failed["durationSeconds"] == 3000.0
    assert ("Warning", "TrialFailed") in [(e.type, e.reason) for e in plan.events]
    assert c.status["phase"] == "Sweeping"
    assert c.status["sweep"]["summary"] == "1/2 done, 1 failed, 1 running"
    c.succeed(trial_name(8), {"eval_loss": 2.0})
    c.reconcile()
    assert c.status["sweep"]["bestRank"] == 8 and c.status["rank"] == 8
    assert c.status["phase"] == "Pending"


def test_all_trials_failing_fails_the_job():
    c = sweep_cluster(ranks=(4, 8), parallelism=2)
    c.reconcile()
    c.fail(trial_name(4), "oom")
    c.fail(trial_name(8), "oom again")
    plan = c.reconcile()
    assert plan.create == []
    assert c.status["phase"] == "Failed"
    assert c.status["failure"]["reason"] == "SweepFailed"
    message = c.status["failure"]["message"]
    assert message.startswith("all 2 rank-sweep trials failed: ")
    assert "r4: TrainingFailed: oom" in message and "r8: TrainingFailed: oom again" in message
    assert "bestRank" not in c.status["sweep"] and "rank" not in c.status
    assert "trainingJob" not in c.status
    assert plan.events[-1].type == "Warning" and plan.events[-1].reason == "SweepFailed"
    final = copy.deepcopy(c.status)
    plan = c.reconcile()
    assert plan.create == [] and c.status == final


def test_trial_without_the_sweep_metric_fails_metric_missing():
    c = sweep_cluster(ranks=(4, 8), parallelism=1)
    c.reconcile()
    c.succeed(trial_name(4), {"perplexity": 3.3})
    plan = c.reconcile()
    assert c.trials()[4]["state"] == "Failed"
    assert c.trials()[4]["message"] == "MetricMissing: the trial reported no eval_loss"
    assert created_pytorchjobs(plan) == [trial_name(8)]


def test_trial_result_missing_beyond_the_publish_timeout_fails():
    c = sweep_cluster(ranks=(4, 8), parallelism=1)
    c.reconcile()
    c.set(trial_name(4), "Created", "Running")
    c.reconcile()
    c.succeed(trial_name(4), None, completion="2026-11-28T11:50:00Z")  # no result.json (yet)
    plan = c.reconcile(now="2026-11-28T11:59:59Z")
    assert c.reports_read == {trial_name(4): ROOT + "sweep/rank-4/"}
    assert plan.create == []  # still waiting for the result: the slot stays taken
    assert c.trials()[4]["state"] == "Running"
    plan = c.reconcile(now="2026-11-28T12:00:00Z")
    trial = c.trials()[4]
    assert trial["state"] == "Failed"
    assert trial["message"] == f"ResultMissing: {trial_name(4)} succeeded but wrote no result.json within 600s"
    assert trial["completionTime"] == "2026-11-28T11:50:00Z"
    assert created_pytorchjobs(plan) == [trial_name(8)]


def test_trial_result_arriving_late_within_the_timeout_counts():
    c = sweep_cluster(ranks=(4, 8), parallelism=1)
    c.reconcile()
    c.succeed(trial_name(4), None)
    c.reconcile(now="2026-11-28T11:55:00Z")
    c.results[trial_name(4)] = {"metrics": {"eval_loss": 1.1}}
    c.reconcile(now="2026-11-28T11:56:00Z")
    assert c.trials()[4]["state"] == "Succeeded" and c.trials()[4]["metric"] == 1.1


def test_trial_pytorchjob_vanished_with_and_without_a_result():
    c = sweep_cluster(ranks=(4, 8, 16), parallelism=2)
    c.reconcile()
    c.set(trial_name(4), "Created", "Running")
    c.set(trial_name(8), "Created", "Running")
    c.reconcile()
    c.results[trial_name(4)] = {"metrics": {"eval_loss": 1.3}, "seconds": 90}
    c.delete(trial_name(4))
    c.delete(trial_name(8))
    plan = c.reconcile()
    assert c.reports_read == {trial_name(4): ROOT + "sweep/rank-4/", trial_name(8): ROOT + "sweep/rank-8/"}
    trials = c.trials()
    assert trials[4]["state"] == "Succeeded" and trials[4]["metric"] == 1.3
    assert trials[8]["state"] == "Failed" and trials[8]["message"].startswith("JobLost: ")
    assert created_pytorchjobs(plan) == [trial_name(16)]


def test_suspend_during_the_sweep_suspends_trials_and_launches_nothing():
    c = sweep_cluster(ranks=(4, 8, 16, 32), parallelism=2)
    c.reconcile()
    c.succeed(trial_name(4), {"eval_loss": 1.0})  # finished: left alone
    c.set(trial_name(8), "Created", "Running")
    c.job["spec"]["runPolicy"] = {"suspend": True}
    c.job["metadata"]["generation"] = 2
    plan = c.reconcile()
    assert plan.create == []  # r16 would have taken r4's slot
    assert plan.suspend_stage_jobs == {trial_name(8): True}
    assert c.status["phase"] == "Suspended"
    assert c.condition("Suspended")["status"] == "True"
    assert "rank sweep is suspended" in c.condition("Suspended")["message"]
    assert c.trials()[4]["state"] == "Succeeded" and c.trials()[16]["state"] == "Queued"
    plan = c.reconcile()
    assert plan.create == [] and plan.suspend_stage_jobs == {}
    # resume
    c.job["spec"]["runPolicy"] = {"suspend": False}
    c.job["metadata"]["generation"] = 3
    plan = c.reconcile()
    assert plan.suspend_stage_jobs == {trial_name(8): False}
    assert created_pytorchjobs(plan) == [trial_name(16)]
    assert c.status["phase"] == "Sweeping" and c.condition("Suspended")["status"] == "False"


def test_suspended_before_the_sweep_starts_launches_nothing():
    c = sweep_cluster(ranks=(4, 8), parallelism=1)
    c.job["spec"]["runPolicy"] = {"suspend": True}
    plan = c.reconcile()
    assert plan.create == [] and c.status["phase"] == "Suspended"
    assert [t["state"] for t in c.status["sweep"]["trials"]] == ["Queued", "Queued"]


def test_needs_stage_reports_names_finished_and_vanished_stage_jobs_only():
    c = Cluster(finetunejob(baseline={"target": dict(TARGET)}, rankSweep={"ranks": [4, 8, 16, 32, 64],
                                                                            "parallelism": 4}))
    c.reconcile()
    c.succeed(BASELINE_JOB, {"eval_loss": 2.0})
    c.reconcile()
    assert c.status["baseline"]["state"] == "Succeeded"
    assert [t["state"] for t in c.status["sweep"]["trials"]] == ["Pending"] * 4 + ["Queued"]
    stage_jobs = c.observe().stage_jobs
    assert ftj.needs_stage_reports(c.job, stage_jobs) == {}  # the baseline's outcome is recorded already
    c.set(trial_name(4), "Created", "Running")
    c.succeed(trial_name(8), {"eval_loss": 1.0})
    c.fail(trial_name(16))
    c.delete(trial_name(32))
    stage_jobs = c.observe().stage_jobs
    assert ftj.needs_stage_reports(c.job, stage_jobs) == {
        trial_name(8): ROOT + "sweep/rank-8/",
        trial_name(16): ROOT + "sweep/rank-16/",
        trial_name(32): ROOT + "sweep/rank-32/",
    }
    c.reconcile()
    # recorded now: finished trials are not read again, though their PyTorchJobs remain
    stage_jobs = c.observe().stage_jobs
    assert {r: t["state"] for r, t in c.trials().items()} == {4: "Running", 8: "Succeeded", 16: "Failed",
                                                              32: "Failed", 64: "Pending"}
    assert trial_name(8) in stage_jobs and trial_name(16) in stage_jobs
    assert ftj.needs_stage_reports(c.job, stage_jobs) == {}
    # a finished job is read no more
    terminal = {**c.job, "status": {**c.status, "phase": "Failed"}}
    assert ftj.needs_stage_reports(terminal, stage_jobs) == {}


def test_needs_stage_reports_for_a_stage_job_the_status_does_not_know():
    job = finetunejob(rankSweep={"ranks": [4, 8]})
    trial = render_children(validate(job).defaulted, render.RenderSettings(),
                            jobconfig.Stage(kind=jobconfig.STAGE_TRIAL, rank=4))[1]
    finished = pytorchjob_backend.read_status(with_conditions(trial, "Succeeded", completion=DONE))
    assert stage_jobs.stage_of(job, finished) == jobconfig.Stage(kind=jobconfig.STAGE_TRIAL, rank=4)
    assert ftj.needs_stage_reports(job, {trial_name(4): finished}) == {trial_name(4): ROOT + "sweep/rank-4/"}
    running = pytorchjob_backend.read_status(with_conditions(trial, "Running"))
    assert ftj.needs_stage_reports(job, {trial_name(4): running}) == {}
    stranger = {"metadata": {"name": "x", "labels": {render.LABEL_STAGE: "trial", render.LABEL_RANK: "four"}}}
    assert stage_jobs.stage_of(job, pytorchjob_backend.read_status(stranger)) is None
    stranger_done = pytorchjob_backend.read_status(with_conditions(stranger, "Succeeded"))
    assert ftj.needs_stage_reports(job, {"x": stranger_done}) == {}


def test_adopted_trial_that_finished_unrecorded_has_its_result_read():
    c = sweep_cluster(ranks=(4, 8, 16), parallelism=1)
    c.reconcile()
    c.set(trial_name(4), "Created", "Running")
    c.reconcile()
    before_launch = copy.deepcopy(c.job)  # r4 Running, r8 Queued
    c.succeed(trial_name(4), {"eval_loss": 1.3})
    c.reconcile()  # creates r8; its status write is lost
    c.job = before_launch
    c.succeed(trial_name(8), {"eval_loss": 1.1})  # and r8 finishes while the operator is away
    c.reconcile(now="2026-11-28T12:30:00Z")
    assert trial_name(8) in c.reports_read
    assert c.trials()[8]["state"] == "Succeeded" and c.trials()[8]["metric"] == 1.1


def test_adopted_trial_waiting_for_its_result_is_not_created_again():
    c = sweep_cluster(ranks=(4, 8), parallelism=1)
    c.reconcile()
    c.job.pop("status")  # the operator crashed after creating r4, before writing the status
    c.succeed(trial_name(4), None)  # r4 succeeded; its result.json cannot be read (yet)
    plan = ftj.decide(c.observe(now="2026-11-28T11:51:00Z"), SETTINGS)
    assert trial_name(4) not in created_pytorchjobs(plan)
    assert "TrialStarted" not in reasons(plan)
    assert {t["rank"]: t["state"] for t in plan.status["sweep"]["trials"]}[4] != "Queued"


def test_spec_invalid_mid_sweep_launches_nothing_and_does_not_fail():
    c = sweep_cluster(ranks=(4, 8, 16), parallelism=1)
    c.reconcile()
    c.set(trial_name(4), "Created", "Running")
    c.reconcile()
    c.job["spec"]["training"] = {"epochs": 1, "maxSteps": 5}  # invalid: both
    c.job["metadata"]["generation"] = 2
    c.succeed(trial_name(4), {"eval_loss": 1.3})
    plan = c.reconcile()
    assert plan.create == [] and plan.suspend_stage_jobs == {}
    accepted = c.condition("Accepted")
    assert accepted["status"] == "False" and accepted["reason"] == "InvalidSpecUpdate"
    assert "training.epochs or training.maxSteps" in accepted["message"]
    assert c.status["phase"] == "Sweeping"
    assert "failure" not in c.status and c.condition("Failed") is None
    assert c.status["observedGeneration"] == 2
    # fixed: the sweep goes on where it was
    c.job["spec"]["training"] = {"epochs": 1}
    c.job["metadata"]["generation"] = 3
    plan = c.reconcile()
    assert c.condition("Accepted")["status"] == "True"
    assert c.trials()[4]["state"] == "Succeeded"
    assert created_pytorchjobs(plan) == [trial_name(8)]


def test_spec_invalid_during_the_baseline_launches_nothing():
    c = baseline_cluster()
    c.reconcile()
    c.job["spec"]["training"] = {"epochs": 1, "maxSteps": 5}
    c.job["metadata"]["generation"] = 2
    c.succeed(BASELINE_JOB, {"eval_loss": 5.0})
    plan = c.reconcile()
    assert plan.create == [] and c.status["phase"] == "Baseline"
    assert c.condition("Accepted")["reason"] == "InvalidSpecUpdate"


def test_ranks_changed_mid_sweep_keep_within_parallelism():
    c = sweep_cluster(ranks=(4, 8, 16), parallelism=1)
    c.reconcile()
    c.set(trial_name(4), "Created", "Running")
    c.reconcile()
    c.job["spec"]["rankSweep"]["ranks"] = [8, 16]
    c.job["metadata"]["generation"] = 2
    c.reconcile()
    assert len(c.active()) <= 1, c.active()


def test_baseline_then_sweep_then_training_with_both():
    c = Cluster(finetunejob(baseline={"target": dict(TARGET)}, rankSweep={"ranks": [4, 8], "parallelism": 2}))
    plan = c.reconcile()
    assert created_pytorchjobs(plan) == [BASELINE_JOB]  # the sweep waits for the gate
    assert "sweep" not in c.status
    c.succeed(BASELINE_JOB, {"eval_loss": 1.9})
    plan = c.reconcile()
    assert created_pytorchjobs(plan) == [trial_name(4), trial_name(8)]
    assert c.status["phase"] == "Sweeping"
    trial_config = config_json(plan, "llama-lora-sweep-r4-config")
    assert trial_config["spec"]["baseline"] == {"enabled": False, "forceTraining": False}
    c.succeed(trial_name(4), {"eval_loss": 1.1})
    c.succeed(trial_name(8), {"eval_loss": 1.2})
    plan = c.reconcile()
    assert created_pytorchjobs(plan) == ["llama-lora"]
    config = config_json(c, "llama-lora-config")
    assert config["stage"]["baseline_metrics"] == {"eval_loss": 1.9}
    assert config["spec"]["method"]["lora"]["rank"] == 4 and config["spec"]["method"]["lora"]["alpha"] == 8
    assert c.status["rank"] == 4
    assert c.status["baseline"]["state"] == "Succeeded" and c.status["baseline"]["met"] is False
    assert [n for k, n in c.created if k == "PyTorchJob"] == [BASELINE_JOB, trial_name(4), trial_name(8),
                                                              "llama-lora"]


def test_sweep_with_the_baseline_met_never_starts():
    c = Cluster(finetunejob(baseline={"target": dict(TARGET)}, rankSweep={"ranks": [4, 8]}))
    c.reconcile()
    c.succeed(BASELINE_JOB, {"eval_loss": 0.2})
    plan = c.reconcile()
    assert plan.create == [] and c.status["phase"] == "Skipped" and "sweep" not in c.status

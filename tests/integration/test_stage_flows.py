"""The stages before training (baseline gate, LoRA rank sweep) through kopf + KMock + SeaweedFS.

The test plays the training operator (the stage workloads' conditions) and the trainer (each stage's
result.json / progress.json in the real S3 server); assertions are on what a user sees: status,
conditions, events, and which workloads and ConfigMaps exist.
"""

from __future__ import annotations

import asyncio

import pytest

from kubetune.api import storage_layout
from kubetune.clients import kube
from kubetune_operator.backends import render_children
from kubetune_operator.render import training as render

from .conftest import NS, eventually
from .stage_helpers import (
    BASELINE_TARGET,
    DONE,
    START,
    condition,
    config_of,
    finish_sweep,
    prefix_of,
    pytorchjob_creates,
    row,
    run,
    status_of,
    submit,
    succeed,
    sweep,
    sweep_jobs,
    sweep_state,
    wait_event,
    wait_exists,
    wait_phase,
    wait_status,
    write_json,
    write_sweep_progress,
    write_sweep_result,
)

pytestmark = pytest.mark.integration


# --- baseline ----------------------------------------------------------------------------------------


async def test_baseline_meets_target_skips_training(operator, api, s3_server):
    created = await submit(api, s3_server, "base-ok", baseline=BASELINE_TARGET)
    baseline_job = await wait_exists(api, kube.PYTORCHJOBS, "base-ok-baseline")
    config_map = await wait_exists(api, kube.CONFIGMAPS, "base-ok-baseline-config")
    assert baseline_job["metadata"]["labels"][render.LABEL_STAGE] == "baseline"
    assert baseline_job["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
    assert config_of(config_map)["stage"]["kind"] == "baseline"
    status = await wait_phase(api, "base-ok", "Baseline")
    assert status["baseline"]["source"] == "BaselineJob" and status["baseline"]["state"] in ("Pending", "Running")
    assert await api.get(kube.PYTORCHJOBS, "base-ok") is None

    metrics = {"eval_loss": 0.8, "perplexity": 2.2255}
    prefix = storage_layout.baseline_prefix(prefix_of(created))
    write_json(s3_server, storage_layout.result_uri(prefix), {"metrics": metrics, "seconds": 12.5})
    await succeed(api, "base-ok-baseline")

    status = await wait_phase(api, "base-ok", "Skipped")
    sufficient = condition(status, "BaselineSufficient")
    assert sufficient["status"] == "True" and sufficient["reason"] == "TargetMet"
    baseline = status["baseline"]
    assert baseline["source"] == "BaselineJob" and baseline["job"] == "base-ok-baseline"
    assert baseline["state"] == "Succeeded"
    assert baseline["met"] is True
    assert baseline["metrics"] == metrics
    assert baseline["target"] == {"metric": "eval_loss", "value": 1.0}
    assert "eval_loss 0.8 <= 1" in baseline["summary"]
    assert status.get("completionTime")
    event = await wait_event(api, "base-ok", "BaselineSufficient")
    assert event["type"] == "Normal" and "forceTraining" in event["message"]
    await wait_event(api, "base-ok", "BaselineEvaluated", "eval_loss 0.8")
    await asyncio.sleep(1.5)  # several resyncs: training must never start
    assert await api.get(kube.PYTORCHJOBS, "base-ok") is None
    assert await api.get(kube.CONFIGMAPS, "base-ok-config") is None
    assert (await status_of(api, "base-ok"))["phase"] == "Skipped"


async def test_baseline_below_target_trains_with_the_baseline_metrics(operator, api, s3_server):
    created = await submit(api, s3_server, "base-low", baseline=BASELINE_TARGET)
    await wait_exists(api, kube.PYTORCHJOBS, "base-low-baseline")
    metrics = {"eval_loss": 1.7, "perplexity": 5.474}
    prefix = storage_layout.baseline_prefix(prefix_of(created))
    write_json(s3_server, storage_layout.result_uri(prefix), {"metrics": metrics, "seconds": 20})
    await succeed(api, "base-low-baseline")

    training = await wait_exists(api, kube.PYTORCHJOBS, "base-low")
    assert training["metadata"]["labels"][render.LABEL_STAGE] == "train"
    config = config_of(await api.get(kube.CONFIGMAPS, "base-low-config"))
    assert config["stage"]["kind"] == "train"
    assert config["stage"]["baseline_metrics"] == metrics  # training does not evaluate the base model again
    status = await wait_phase(api, "base-low", "Pending")
    sufficient = condition(status, "BaselineSufficient")
    assert sufficient["status"] == "False" and sufficient["reason"] == "BelowTarget"
    assert status["baseline"]["met"] is False
    assert status["baseline"]["metrics"] == metrics
    assert status["baseline"]["source"] == "BaselineJob"
    assert status["trainingJob"]["name"] == "base-low"
    await wait_event(api, "base-low", "Created")


async def test_failed_baseline_fails_the_job_with_the_trainers_reason(operator, api, s3_server):
    created = await submit(api, s3_server, "base-bad", baseline=BASELINE_TARGET)
    await wait_exists(api, kube.PYTORCHJOBS, "base-bad-baseline")
    prefix = storage_layout.baseline_prefix(prefix_of(created))
    write_json(s3_server, storage_layout.progress_uri(prefix),
               {"failure": {"reason": "BadInput", "message": "validation line 3 is not valid JSON"}})
    await api.set_pytorchjob_conditions("base-bad-baseline",
                                        ("Failed", "PyTorchJobFailed", "1 Master replica(s) failed."))

    status = await wait_phase(api, "base-bad", "Failed")
    assert status["failure"]["reason"] == "BaselineFailed"
    assert "validation line 3 is not valid JSON" in status["failure"]["message"]
    assert condition(status, "Failed")["reason"] == "BaselineFailed"
    assert status["baseline"]["state"] == "Failed"
    assert status["baseline"]["message"].startswith("BadInput: validation line 3 is not valid JSON")
    event = await wait_event(api, "base-bad", "BaselineFailed")
    assert event["type"] == "Warning"
    await asyncio.sleep(1.0)
    assert await api.get(kube.PYTORCHJOBS, "base-bad") is None


# --- rank sweep --------------------------------------------------------------------------------------


FINISHED_ROWS = [row(4, "Stopped", 0.9, rung=0, message="halved out after rung 0 (10 steps)"),
                 row(8, "Stopped", 0.75, rung=1, message="halved out after rung 1 (20 steps)"),
                 row(16, "Diverged", None, rung=0, message="holdout loss is nan"),
                 row(16, "Stopped", 0.95, rung=0, lr=5e-5, retryOf="r16-lr0.0002"),
                 row(32, "Succeeded", 0.7, rung=1, message="the last config left after rung 1")]


async def test_sweep_runs_one_workload_shows_its_table_and_trains_the_chosen_config(operator, api, s3_server, k8s):
    created = await submit(api, s3_server, "sw", rankSweep=sweep([4, 8, 16, 32], learningRates=[2e-4]))
    pytorchjob = await wait_exists(api, kube.PYTORCHJOBS, "sw-rank-sweep")
    status = await wait_phase(api, "sw", "Sweeping")
    assert status["sweep"]["job"] == "sw-rank-sweep" and "rank" not in status
    assert await sweep_jobs(api, "sw") == ["sw-rank-sweep"] and await api.get(kube.PYTORCHJOBS, "sw") is None
    labels = pytorchjob["metadata"]["labels"]
    assert labels[render.LABEL_JOB] == "sw" and labels[render.LABEL_STAGE] == "sweep"
    config = config_of(await api.get(kube.CONFIGMAPS, "sw-rank-sweep-config"))
    assert config["stage"] == {"kind": "sweep", "holdout_fraction": 0.1, "baseline_metrics": None}
    assert config["spec"]["rankSweep"]["ranks"] == [4, 8, 16, 32] and config["spec"]["rankSweep"]["budget"] == 0.3
    assert config["storage"]["result_uri"] == storage_layout.result_uri(storage_layout.sweep_prefix(prefix_of(created)))
    await wait_event(api, "sw", "SweepStarted", "ranks 4, 8, 16, 32")

    # while it runs, its progress.json is the live table
    await run(api, "sw-rank-sweep")
    write_sweep_progress(s3_server, created, {"stage": "sweeping", "sweep": {
        "trials": [row(4, "Running", 0.9, rung=0), row(8, "Running", 0.8, rung=0)], "usedSteps": 20,
        "budgetSteps": 60}})
    status = await wait_status(api, "sw", lambda s: len((s.get("sweep") or {}).get("trials") or []) == 2)
    assert status["sweep"]["state"] == "Running" and status["sweep"]["usedSteps"] == 20
    assert status["sweep"]["summary"] == "2 configs, 2 running"

    await finish_sweep(api, s3_server, created, FINISHED_ROWS)
    training = await wait_exists(api, kube.PYTORCHJOBS, "sw")
    assert training["metadata"]["labels"][render.LABEL_STAGE] == "train"
    config = config_of(await api.get(kube.CONFIGMAPS, "sw-config"))
    assert config["stage"]["kind"] == "train"
    assert config["spec"]["method"]["lora"]["rank"] == 32 and config["spec"]["method"]["lora"]["alpha"] == 64
    assert config["spec"]["training"]["learningRate"] == 2e-4
    status = await wait_phase(api, "sw", "Pending")
    record = status["sweep"]
    assert status["rank"] == 32 and record["bestRank"] == 32 and record["bestMetric"] == 0.7
    assert record["bestLearningRate"] == 2e-4 and record["state"] == "Succeeded"
    assert [t["state"] for t in record["trials"]] == ["Stopped", "Stopped", "Diverged", "Stopped", "Succeeded"]
    assert record["trials"][3]["retryOf"] == "r16-lr0.0002"
    assert record["durationSeconds"] == 300 and record["startTime"] == START and record["completionTime"] == DONE
    assert record["summary"] == "5 configs, 3 halved, 1 diverged, best r32 lr0.0002"
    selected = condition(status, "RankSelected")
    assert selected["status"] == "True" and "rank 32 (alpha 64)" in selected["message"]
    chosen = await wait_event(api, "sw", "RankChosen")
    assert "<- chosen" in chosen["message"] and "Diverged" in chosen["message"]
    assert pytorchjob_creates(k8s) == 3  # the data stage, the sweep and the training job, each exactly once


async def test_sweep_workload_failing_fails_the_job_with_the_trainers_reason(operator, api, s3_server):
    created = await submit(api, s3_server, "sw-dead", rankSweep=sweep([4, 8]))
    await wait_exists(api, kube.PYTORCHJOBS, "sw-dead-rank-sweep")
    write_sweep_progress(s3_server, created, {"failure": {"reason": "BadInput",
                                                          "message": "rankSweep cannot run under deepspeed"}})
    await api.set_pytorchjob_conditions("sw-dead-rank-sweep", ("Failed", "PyTorchJobFailed", "master failed"))
    status = await wait_phase(api, "sw-dead", "Failed")
    assert status["failure"]["reason"] == "SweepFailed" and sweep_state(status) == "Failed"
    assert "BadInput: rankSweep cannot run under deepspeed (master failed)" in status["failure"]["message"]
    assert "bestRank" not in status["sweep"] and "rank" not in status
    event = await wait_event(api, "sw-dead", "SweepFailed")
    assert event["type"] == "Warning"
    await asyncio.sleep(1.0)
    assert await api.get(kube.PYTORCHJOBS, "sw-dead") is None


async def test_sweep_where_no_config_learned_fails_the_job_with_the_table(operator, api, s3_server):
    created = await submit(api, s3_server, "sw-chance", rankSweep=sweep([4, 8]))
    await wait_exists(api, kube.PYTORCHJOBS, "sw-chance-rank-sweep")
    await finish_sweep(api, s3_server, created, [
        row(4, "AtChance", 4.31, rung=0, message="holdout loss 4.31 >= 0.97 ln(77) = 4.213"),
        row(8, "Diverged", None, rung=0, message="the training loss became non-finite at step 3")])
    status = await wait_phase(api, "sw-chance", "Failed")
    assert status["failure"]["reason"] == "SweepFailed"
    assert "no config of the rank sweep learned anything" in status["failure"]["message"]
    assert "AtChance" in status["failure"]["message"] and "non-finite" in status["failure"]["message"]
    assert [t["state"] for t in status["sweep"]["trials"]] == ["AtChance", "Diverged"]
    await asyncio.sleep(1.0)
    assert await api.get(kube.PYTORCHJOBS, "sw-chance") is None


async def test_operator_restart_mid_sweep_keeps_its_one_workload(operator, api, s3_server, k8s):
    created = await submit(api, s3_server, "sw-rs", rankSweep=sweep([4, 8, 16]))
    await wait_exists(api, kube.PYTORCHJOBS, "sw-rs-rank-sweep")
    await run(api, "sw-rs-rank-sweep")
    await wait_status(api, "sw-rs", lambda s: sweep_state(s) == "Running")
    uid = (await api.get(kube.PYTORCHJOBS, "sw-rs-rank-sweep"))["metadata"]["uid"]

    await operator.stop()
    await operator.start()
    await asyncio.sleep(1.5)  # the resume handler and a few resyncs
    assert (await api.get(kube.PYTORCHJOBS, "sw-rs-rank-sweep"))["metadata"]["uid"] == uid
    assert pytorchjob_creates(k8s) == 2  # the data stage and the sweep
    assert sweep_state(await status_of(api, "sw-rs")) == "Running"

    # it finishes and its TTL removes it while the operator is away: its result.json decides
    await operator.stop()
    write_sweep_result(s3_server, created, FINISHED_ROWS[:2])
    await api.client.delete(kube.PYTORCHJOBS, NS, "sw-rs-rank-sweep")
    await operator.start()
    status = await wait_phase(api, "sw-rs", "Pending")
    assert status["rank"] == 8 and sweep_state(status) == "Succeeded"  # r8 reached the deeper rung
    assert await api.get(kube.PYTORCHJOBS, "sw-rs-rank-sweep") is None
    assert pytorchjob_creates(k8s) == 3  # with the training job


async def set_suspend(api, name: str, suspend: bool) -> None:
    await api.client.patch(kube.FINETUNEJOBS, NS, name, {"spec": {"runPolicy": {"suspend": suspend}}})


async def test_suspend_during_a_sweep_holds_it_and_resume_continues(operator, api, s3_server):
    created = await submit(api, s3_server, "sw-pause", rankSweep=sweep([4, 8, 16]))
    await wait_exists(api, kube.PYTORCHJOBS, "sw-pause-rank-sweep")
    await run(api, "sw-pause-rank-sweep")
    await wait_status(api, "sw-pause", lambda s: sweep_state(s) == "Running")

    await set_suspend(api, "sw-pause", True)
    await eventually(lambda: workload_suspended(api, "sw-pause-rank-sweep", True))
    status = await wait_phase(api, "sw-pause", "Suspended")
    assert condition(status, "Suspended")["reason"] == "SuspendedBySpec"

    await set_suspend(api, "sw-pause", False)
    await eventually(lambda: workload_suspended(api, "sw-pause-rank-sweep", False))
    status = await wait_phase(api, "sw-pause", "Sweeping")
    assert condition(status, "Suspended")["reason"] == "Resumed"
    await finish_sweep(api, s3_server, created, FINISHED_ROWS[:2])
    training = await wait_exists(api, kube.PYTORCHJOBS, "sw-pause")
    assert training["spec"]["runPolicy"]["suspend"] is False
    status = await wait_phase(api, "sw-pause", "Pending")
    assert status["rank"] == 8


async def workload_suspended(api, name: str, suspend: bool) -> bool:
    pytorchjob = await api.get(kube.PYTORCHJOBS, name)
    return pytorchjob["spec"]["runPolicy"]["suspend"] is suspend


# --- more stage flows --------------------------------------------------------------------------------


async def test_baseline_below_target_then_sweep_then_training(operator, api, s3_server):
    created = await submit(api, s3_server, "both", baseline=BASELINE_TARGET, rankSweep=sweep([4, 8]))
    await wait_exists(api, kube.PYTORCHJOBS, "both-baseline")
    await wait_phase(api, "both", "Baseline")
    assert await sweep_jobs(api, "both") == []  # the sweep waits for the baseline's verdict
    metrics = {"eval_loss": 2.5}
    prefix = storage_layout.baseline_prefix(prefix_of(created))
    write_json(s3_server, storage_layout.result_uri(prefix), {"metrics": metrics, "seconds": 3})
    await succeed(api, "both-baseline")

    await wait_exists(api, kube.PYTORCHJOBS, "both-rank-sweep")
    status = await wait_phase(api, "both", "Sweeping")
    assert condition(status, "BaselineSufficient")["reason"] == "BelowTarget"
    sweep_config = config_of(await api.get(kube.CONFIGMAPS, "both-rank-sweep-config"))
    assert sweep_config["spec"]["baseline"]["enabled"] is False  # no separate baseline: it scores the holdout
    assert sweep_config["stage"]["baseline_metrics"] is None
    await finish_sweep(api, s3_server, created, [row(4, "Stopped", 1.1, rung=0), row(8, "Succeeded", 1.0, rung=0)])

    await wait_exists(api, kube.PYTORCHJOBS, "both")
    config = config_of(await api.get(kube.CONFIGMAPS, "both-config"))
    assert config["spec"]["method"]["lora"]["rank"] == 8
    assert config["stage"]["baseline_metrics"] == metrics
    status = await wait_phase(api, "both", "Pending")
    assert status["rank"] == 8 and status["baseline"]["state"] == "Succeeded"
    assert status["baseline"]["met"] is False


async def test_operator_restart_during_the_baseline_keeps_one_baseline_job(operator, api, s3_server, k8s):
    created = await submit(api, s3_server, "base-rs", baseline=BASELINE_TARGET)
    baseline_job = await wait_exists(api, kube.PYTORCHJOBS, "base-rs-baseline")
    await run(api, "base-rs-baseline")
    await wait_status(api, "base-rs", lambda s: (s.get("baseline") or {}).get("state") == "Running")
    await operator.stop()
    await operator.start()
    await asyncio.sleep(1.5)
    assert (await api.get(kube.PYTORCHJOBS, "base-rs-baseline"))["metadata"]["uid"] == baseline_job["metadata"]["uid"]
    assert pytorchjob_creates(k8s) == 2  # the data stage and the baseline
    assert (await status_of(api, "base-rs"))["phase"] == "Baseline"
    prefix = storage_layout.baseline_prefix(prefix_of(created))
    write_json(s3_server, storage_layout.result_uri(prefix), {"metrics": {"eval_loss": 0.4}})
    await succeed(api, "base-rs-baseline")
    status = await wait_phase(api, "base-rs", "Skipped")
    assert status["baseline"]["met"] is True
    assert pytorchjob_creates(k8s) == 2


async def test_force_training_needs_no_separate_baseline_job(operator, api, s3_server):
    created = await submit(api, s3_server, "forced", baseline={**BASELINE_TARGET, "forceTraining": True})
    await wait_exists(api, kube.PYTORCHJOBS, "forced")
    assert await api.get(kube.PYTORCHJOBS, "forced-baseline") is None
    config = config_of(await api.get(kube.CONFIGMAPS, "forced-config"))
    assert config["stage"]["baseline_metrics"] is None  # training evaluates the base model itself
    # the training job's own first evaluation is the baseline
    write_json(s3_server, storage_layout.progress_uri(prefix_of(created)),
               {"api": "kubetune.io/progress/v1", "stage": "training", "step": 1, "totalSteps": 10,
                "baselineMetrics": {"eval_loss": 0.5}})
    await run(api, "forced")
    status = await wait_status(api, "forced", lambda s: "baseline" in s)
    assert status["baseline"]["source"] == "TrainingJob" and status["baseline"]["met"] is True
    sufficient = condition(status, "BaselineSufficient")
    assert sufficient["status"] == "True" and sufficient["reason"] == "TrainingForced"
    status = await wait_phase(api, "forced", "Running")
    assert await api.get(kube.PYTORCHJOBS, "forced-baseline") is None


async def test_sweep_without_a_result_beyond_the_publish_timeout_fails(operator, api, s3_server):
    await submit(api, s3_server, "sw-nores", rankSweep=sweep([4, 8]))
    await wait_exists(api, kube.PYTORCHJOBS, "sw-nores-rank-sweep")
    # it succeeded long ago (longer than the publish timeout) and never wrote result.json
    await succeed(api, "sw-nores-rank-sweep", completionTime="2026-01-01T00:00:00Z")
    status = await wait_phase(api, "sw-nores", "Failed")
    assert status["failure"]["reason"] == "SweepFailed" and "ResultMissing:" in status["failure"]["message"]
    assert await api.get(kube.PYTORCHJOBS, "sw-nores") is None


async def test_sweep_created_just_before_a_crash_is_adopted_not_duplicated(operator, api, s3_server, k8s):
    """The operator died after creating the sweep's children but before recording them in status."""
    from kubetune.api.validation import validate
    from kubetune_operator.reconcile import stages

    await operator.stop()
    # its data stage had succeeded too, but that status write was lost with the rest: not run again
    created = await submit(api, s3_server, "sw-adopt", data_stage=False, rankSweep=sweep([4, 8]))
    job = {**created, "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob"}
    spec = validate(job).defaulted["spec"]
    for child in render_children({**job, "spec": stages.sweep_spec(spec)}, operator.settings.render,
                                 stages.sweep_stage(spec)):
        resource = kube.CONFIGMAPS if child["kind"] == "ConfigMap" else kube.PYTORCHJOBS
        await api.client.create(resource, child)
    uid = (await api.get(kube.PYTORCHJOBS, "sw-adopt-rank-sweep"))["metadata"]["uid"]
    await operator.start()

    await wait_status(api, "sw-adopt", lambda s: sweep_state(s) == "Pending")
    await asyncio.sleep(1.0)
    assert await sweep_jobs(api, "sw-adopt") == ["sw-adopt-rank-sweep"]
    assert (await api.get(kube.PYTORCHJOBS, "sw-adopt-rank-sweep"))["metadata"]["uid"] == uid
    assert pytorchjob_creates(k8s) == 1  # the test's own
    # an unfinished sweep's pods cannot start without their job config: a deleted one comes back
    await api.client.delete(kube.CONFIGMAPS, NS, "sw-adopt-rank-sweep-config")
    config_map = await wait_exists(api, kube.CONFIGMAPS, "sw-adopt-rank-sweep-config")
    assert config_of(config_map)["stage"]["kind"] == "sweep"
    await finish_sweep(api, s3_server, created, [row(4, "Succeeded", 0.5, rung=0), row(8, "Stopped", 0.6, rung=0)])
    await wait_exists(api, kube.PYTORCHJOBS, "sw-adopt")
    assert pytorchjob_creates(k8s) == 2

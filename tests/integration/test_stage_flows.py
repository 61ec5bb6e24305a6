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
    assert_active_trials_at_most,
    condition,
    config_of,
    events_for,
    finish_trial,
    prefix_of,
    pytorchjob_creates,
    run,
    status_of,
    submit,
    succeed,
    sweep,
    trial,
    trial_jobs,
    trial_name,
    trial_states,
    wait_event,
    wait_exists,
    wait_phase,
    wait_status,
    wait_trial_state,
    write_json,
    write_trial_failure,
    write_trial_result,
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


async def test_sweep_runs_trials_in_parallel_and_picks_the_smaller_of_tied_ranks(operator, api, s3_server, k8s):
    created = await submit(api, s3_server, "sw", rankSweep=sweep([4, 8, 16, 32], parallelism=2))
    await wait_exists(api, kube.PYTORCHJOBS, "sw-sweep-r4")
    await wait_exists(api, kube.PYTORCHJOBS, "sw-sweep-r8")
    status = await wait_phase(api, "sw", "Sweeping")
    await asyncio.sleep(1.0)  # several resyncs: no third trial before one finishes
    assert sorted(await trial_jobs(api, "sw")) == ["sw-sweep-r4", "sw-sweep-r8"]
    status = await status_of(api, "sw")
    assert trial_states(status) == {4: "Pending", 8: "Pending", 16: "Queued", 32: "Queued"}
    assert status["sweep"]["total"] == 4 and status["sweep"]["completed"] == 0
    assert "rank" not in status  # not chosen yet
    assert await api.get(kube.PYTORCHJOBS, "sw") is None

    r4 = await api.get(kube.PYTORCHJOBS, "sw-sweep-r4")
    labels = r4["metadata"]["labels"]
    assert labels[render.LABEL_JOB] == "sw" and labels[render.LABEL_STAGE] == "trial"
    assert labels[render.LABEL_RANK] == "4"
    r4_config = config_of(await api.get(kube.CONFIGMAPS, "sw-sweep-r4-config"))
    assert r4_config["stage"]["kind"] == "trial" and r4_config["stage"]["rank"] == 4
    assert r4_config["stage"]["holdout_fraction"] == 0.1
    assert r4_config["spec"]["method"]["lora"]["rank"] == 4
    assert r4_config["spec"]["method"]["lora"]["alpha"] == 8  # proportional: 32 * 4 / 16
    assert r4_config["storage"]["result_uri"] == storage_layout.result_uri(
        storage_layout.trial_prefix(prefix_of(created), 4))
    await wait_event(api, "sw", "TrialStarted", "rank 4")

    await run(api, "sw-sweep-r4")
    await run(api, "sw-sweep-r8")
    await wait_status(api, "sw", lambda s: trial_states(s).get(4) == "Running" and trial_states(s).get(8) == "Running")

    await finish_trial(api, s3_server, created, 4, 0.9)
    await wait_exists(api, kube.PYTORCHJOBS, "sw-sweep-r16")
    await wait_trial_state(api, "sw", 4, "Succeeded")
    await assert_active_trials_at_most(api, "sw", 2)
    assert await api.get(kube.PYTORCHJOBS, "sw-sweep-r32") is None

    # the larger rank finishes first with the same metric the smaller one will report
    await finish_trial(api, s3_server, created, 16, 0.7)
    await wait_exists(api, kube.PYTORCHJOBS, "sw-sweep-r32")
    await assert_active_trials_at_most(api, "sw", 2)
    await finish_trial(api, s3_server, created, 8, 0.7)
    await wait_trial_state(api, "sw", 8, "Succeeded")
    assert await api.get(kube.PYTORCHJOBS, "sw") is None  # r32 still running
    await finish_trial(api, s3_server, created, 32, 0.75)

    training = await wait_exists(api, kube.PYTORCHJOBS, "sw")
    assert training["metadata"]["labels"][render.LABEL_STAGE] == "train"
    config = config_of(await api.get(kube.CONFIGMAPS, "sw-config"))
    assert config["stage"]["kind"] == "train"
    assert config["spec"]["method"]["lora"]["rank"] == 8
    assert config["spec"]["method"]["lora"]["alpha"] == 16
    status = await wait_phase(api, "sw", "Pending")
    assert status["rank"] == 8
    record = status["sweep"]
    assert record["bestRank"] == 8 and record["bestMetric"] == 0.7
    assert record["completed"] == 4 and record["total"] == 4 and record["metric"] == "eval_loss"
    assert "best r8" in record["summary"]
    assert {t["rank"]: t["metric"] for t in record["trials"]} == {4: 0.9, 8: 0.7, 16: 0.7, 32: 0.75}
    for t in record["trials"]:
        assert t["state"] == "Succeeded"
        assert t["alpha"] == 2 * t["rank"]
        assert t["job"] == trial_name("sw", t["rank"])
        assert t["metrics"] == {"eval_loss": t["metric"]}
        assert t["durationSeconds"] == 300
        assert t["startTime"] == START and t["completionTime"] == DONE
    selected = condition(status, "RankSelected")
    assert selected["status"] == "True" and selected["reason"] == "BestHoldoutMetric"
    assert "rank 8 (alpha 16)" in selected["message"]
    chosen = await wait_event(api, "sw", "RankChosen")
    assert "rank 8" in chosen["message"] and "<- chosen" in chosen["message"]
    events = await events_for(api, "sw")
    assert sorted(e["message"].split(":")[0] for e in events if e["reason"] == "TrialSucceeded") == [
        "rank 16", "rank 32", "rank 4", "rank 8"]
    assert len([e for e in events if e["reason"] == "TrialStarted"]) == 4
    assert pytorchjob_creates(k8s) == 6  # the data stage, four trials and the training job, each exactly once


async def test_sweep_with_a_failed_trial_continues_and_chooses_among_the_others(operator, api, s3_server):
    created = await submit(api, s3_server, "sw-fail", rankSweep=sweep([4, 8, 16]))
    await wait_exists(api, kube.PYTORCHJOBS, "sw-fail-sweep-r4")
    write_trial_failure(s3_server, created, 4, "OutOfMemory", "CUDA out of memory at step 3")
    await api.set_pytorchjob_conditions("sw-fail-sweep-r4",
                                        ("Failed", "PyTorchJobFailed", "1 Master replica(s) failed."))

    await wait_exists(api, kube.PYTORCHJOBS, "sw-fail-sweep-r8")  # the others go on
    status = await wait_trial_state(api, "sw-fail", 4, "Failed")
    failed = trial(status, 4)
    assert failed["message"].startswith("OutOfMemory: CUDA out of memory at step 3")
    assert "1 Master replica(s) failed." in failed["message"]
    assert "metric" not in failed
    assert "1 failed" in status["sweep"]["summary"]
    assert status["phase"] == "Sweeping"
    event = await wait_event(api, "sw-fail", "TrialFailed")
    assert event["type"] == "Warning" and "rank 4" in event["message"] and "CUDA out of memory" in event["message"]

    await finish_trial(api, s3_server, created, 8, 0.6)
    await wait_exists(api, kube.PYTORCHJOBS, "sw-fail-sweep-r16")
    await finish_trial(api, s3_server, created, 16, 0.5)

    await wait_exists(api, kube.PYTORCHJOBS, "sw-fail")
    config = config_of(await api.get(kube.CONFIGMAPS, "sw-fail-config"))
    assert config["spec"]["method"]["lora"]["rank"] == 16
    assert config["spec"]["method"]["lora"]["alpha"] == 32
    status = await wait_phase(api, "sw-fail", "Pending")
    assert status["rank"] == 16
    assert status["sweep"]["bestRank"] == 16 and status["sweep"]["bestMetric"] == 0.5
    assert trial_states(status) == {4: "Failed", 8: "Succeeded", 16: "Succeeded"}
    assert status["sweep"]["completed"] == 3
    assert condition(status, "RankSelected")["status"] == "True"
    await wait_event(api, "sw-fail", "RankChosen", "rank 16")


async def test_sweep_where_every_trial_fails_fails_the_job(operator, api, s3_server):
    created = await submit(api, s3_server, "sw-dead", rankSweep=sweep([4, 8], parallelism=2))
    await wait_exists(api, kube.PYTORCHJOBS, "sw-dead-sweep-r4")
    await wait_exists(api, kube.PYTORCHJOBS, "sw-dead-sweep-r8")
    write_trial_failure(s3_server, created, 4, "BadInput", "train line 7 has no messages")
    await api.set_pytorchjob_conditions("sw-dead-sweep-r4", ("Failed", "PyTorchJobFailed", "r4 master failed"))
    await wait_trial_state(api, "sw-dead", 4, "Failed")
    await api.set_pytorchjob_conditions("sw-dead-sweep-r8", ("Failed", "PyTorchJobFailed", "r8 master failed"))

    status = await wait_phase(api, "sw-dead", "Failed")
    assert status["failure"]["reason"] == "SweepFailed"
    message = status["failure"]["message"]
    assert "all 2 rank-sweep trials failed" in message
    assert "r4: BadInput: train line 7 has no messages" in message
    assert "r8: TrainingFailed: r8 master failed" in message
    assert condition(status, "Failed")["reason"] == "SweepFailed"
    assert trial_states(status) == {4: "Failed", 8: "Failed"}
    assert "bestRank" not in status["sweep"] and "rank" not in status
    assert condition(status, "RankSelected").get("status") != "True"
    event = await wait_event(api, "sw-dead", "SweepFailed")
    assert event["type"] == "Warning"
    await asyncio.sleep(1.0)
    assert await api.get(kube.PYTORCHJOBS, "sw-dead") is None
    assert await api.get(kube.CONFIGMAPS, "sw-dead-config") is None


async def test_operator_restart_mid_sweep_resumes_without_rerunning_trials(operator, api, s3_server, k8s):
    created = await submit(api, s3_server, "sw-rs", rankSweep=sweep([4, 8, 16]))
    await wait_exists(api, kube.PYTORCHJOBS, "sw-rs-sweep-r4")
    await finish_trial(api, s3_server, created, 4, 0.8)
    await wait_exists(api, kube.PYTORCHJOBS, "sw-rs-sweep-r8")
    await run(api, "sw-rs-sweep-r8")
    await wait_status(api, "sw-rs", lambda s: trial_states(s) == {4: "Succeeded", 8: "Running", 16: "Queued"})
    r8_uid = (await api.get(kube.PYTORCHJOBS, "sw-rs-sweep-r8"))["metadata"]["uid"]
    assert pytorchjob_creates(k8s) == 3  # the data stage, r4 and r8

    await operator.stop()
    await api.client.delete(kube.PYTORCHJOBS, NS, "sw-rs-sweep-r4")  # the finished trial's TTL removed it
    await operator.start()
    await asyncio.sleep(1.5)  # the resume handler and a few resyncs

    assert await api.get(kube.PYTORCHJOBS, "sw-rs-sweep-r4") is None  # a finished trial is never re-run
    assert list(await trial_jobs(api, "sw-rs")) == ["sw-rs-sweep-r8"]
    assert (await api.get(kube.PYTORCHJOBS, "sw-rs-sweep-r8"))["metadata"]["uid"] == r8_uid
    assert pytorchjob_creates(k8s) == 3
    status = await status_of(api, "sw-rs")
    assert trial_states(status) == {4: "Succeeded", 8: "Running", 16: "Queued"}
    assert trial(status, 4)["metric"] == 0.8
    assert status["phase"] == "Sweeping"

    await finish_trial(api, s3_server, created, 8, 0.6)
    await wait_exists(api, kube.PYTORCHJOBS, "sw-rs-sweep-r16")
    await finish_trial(api, s3_server, created, 16, 0.65)
    await wait_exists(api, kube.PYTORCHJOBS, "sw-rs")
    status = await wait_phase(api, "sw-rs", "Pending")
    assert status["rank"] == 8 and status["sweep"]["bestRank"] == 8
    assert config_of(await api.get(kube.CONFIGMAPS, "sw-rs-config"))["spec"]["method"]["lora"]["rank"] == 8
    assert await api.get(kube.PYTORCHJOBS, "sw-rs-sweep-r4") is None
    assert pytorchjob_creates(k8s) == 5  # data, r4, r8, r16, training


async def test_trials_that_vanished_while_the_operator_was_away(operator, api, s3_server, k8s):
    """A trial that finished and was TTL-removed is read from its result.json; one deleted before it
    finished is lost (Failed, JobLost); neither is created again."""
    created = await submit(api, s3_server, "sw-gone", rankSweep=sweep([4, 8, 16], parallelism=2))
    await wait_exists(api, kube.PYTORCHJOBS, "sw-gone-sweep-r4")
    await wait_exists(api, kube.PYTORCHJOBS, "sw-gone-sweep-r8")
    await run(api, "sw-gone-sweep-r4")
    await run(api, "sw-gone-sweep-r8")
    await wait_status(api, "sw-gone", lambda s: trial_states(s) == {4: "Running", 8: "Running", 16: "Queued"})

    await operator.stop()
    write_trial_result(s3_server, created, 4, 0.55)
    await api.client.delete(kube.PYTORCHJOBS, NS, "sw-gone-sweep-r4")
    await api.client.delete(kube.PYTORCHJOBS, NS, "sw-gone-sweep-r8")
    await operator.start()

    status = await wait_status(api, "sw-gone", lambda s: trial_states(s).get(8) == "Failed")
    assert trial_states(status)[4] == "Succeeded"
    assert trial(status, 4)["metric"] == 0.55
    assert trial(status, 8)["message"].startswith("JobLost:")
    await wait_exists(api, kube.PYTORCHJOBS, "sw-gone-sweep-r16")
    await asyncio.sleep(1.0)
    assert list(await trial_jobs(api, "sw-gone")) == ["sw-gone-sweep-r16"]
    assert pytorchjob_creates(k8s) == 4  # with the data stage
    await finish_trial(api, s3_server, created, 16, 0.6)
    status = await wait_phase(api, "sw-gone", "Pending")
    assert status["rank"] == 4
    assert config_of(await api.get(kube.CONFIGMAPS, "sw-gone-config"))["spec"]["method"]["lora"]["rank"] == 4


async def set_suspend(api, name: str, suspend: bool) -> None:
    await api.client.patch(kube.FINETUNEJOBS, NS, name, {"spec": {"runPolicy": {"suspend": suspend}}})


async def test_suspend_during_a_sweep_holds_the_trials_and_resume_continues(operator, api, s3_server):
    created = await submit(api, s3_server, "sw-pause", rankSweep=sweep([4, 8, 16], parallelism=2))
    await wait_exists(api, kube.PYTORCHJOBS, "sw-pause-sweep-r4")
    await wait_exists(api, kube.PYTORCHJOBS, "sw-pause-sweep-r8")
    await run(api, "sw-pause-sweep-r4")
    await run(api, "sw-pause-sweep-r8")
    await wait_status(api, "sw-pause", lambda s: trial_states(s) == {4: "Running", 8: "Running", 16: "Queued"})

    await set_suspend(api, "sw-pause", True)
    await eventually(lambda: trial_suspended(api, "sw-pause-sweep-r4", True))
    await eventually(lambda: trial_suspended(api, "sw-pause-sweep-r8", True))
    status = await wait_phase(api, "sw-pause", "Suspended")
    assert condition(status, "Suspended")["status"] == "True"
    assert condition(status, "Suspended")["reason"] == "SuspendedBySpec"
    await api.set_pytorchjob_conditions("sw-pause-sweep-r8", ("Suspended", "PyTorchJobSuspended", "suspended"))

    # r4 finishes just as it is suspended: its slot frees up, but nothing new starts while suspended
    await finish_trial(api, s3_server, created, 4, 0.7)
    await wait_trial_state(api, "sw-pause", 4, "Succeeded")
    await asyncio.sleep(1.0)
    assert await api.get(kube.PYTORCHJOBS, "sw-pause-sweep-r16") is None
    status = await status_of(api, "sw-pause")
    assert status["phase"] == "Suspended" and trial_states(status)[16] == "Queued"
    assert (await api.get(kube.PYTORCHJOBS, "sw-pause-sweep-r4"))["spec"]["runPolicy"]["suspend"] is True

    await set_suspend(api, "sw-pause", False)
    await eventually(lambda: trial_suspended(api, "sw-pause-sweep-r8", False))
    r16 = await wait_exists(api, kube.PYTORCHJOBS, "sw-pause-sweep-r16")
    assert r16["spec"]["runPolicy"]["suspend"] is False
    status = await wait_phase(api, "sw-pause", "Sweeping")
    assert condition(status, "Suspended")["status"] == "False"
    assert condition(status, "Suspended")["reason"] == "Resumed"
    await finish_trial(api, s3_server, created, 8, 0.9)
    await finish_trial(api, s3_server, created, 16, 0.8)
    training = await wait_exists(api, kube.PYTORCHJOBS, "sw-pause")
    assert training["spec"]["runPolicy"]["suspend"] is False
    status = await wait_phase(api, "sw-pause", "Pending")
    assert status["rank"] == 4


async def trial_suspended(api, name: str, suspend: bool) -> bool:
    pytorchjob = await api.get(kube.PYTORCHJOBS, name)
    return pytorchjob["spec"]["runPolicy"]["suspend"] is suspend


# --- more stage flows --------------------------------------------------------------------------------


async def test_baseline_below_target_then_sweep_then_training(operator, api, s3_server):
    created = await submit(api, s3_server, "both", baseline=BASELINE_TARGET, rankSweep=sweep([4, 8]))
    await wait_exists(api, kube.PYTORCHJOBS, "both-baseline")
    await wait_phase(api, "both", "Baseline")
    assert await trial_jobs(api, "both") == {}  # the sweep waits for the baseline's verdict
    metrics = {"eval_loss": 2.5}
    prefix = storage_layout.baseline_prefix(prefix_of(created))
    write_json(s3_server, storage_layout.result_uri(prefix), {"metrics": metrics, "seconds": 3})
    await succeed(api, "both-baseline")

    await wait_exists(api, kube.PYTORCHJOBS, "both-sweep-r4")
    status = await wait_phase(api, "both", "Sweeping")
    assert condition(status, "BaselineSufficient")["reason"] == "BelowTarget"
    trial_config = config_of(await api.get(kube.CONFIGMAPS, "both-sweep-r4-config"))
    assert trial_config["spec"]["baseline"]["enabled"] is False  # trials do not evaluate the base model
    assert trial_config["stage"]["baseline_metrics"] is None
    await finish_trial(api, s3_server, created, 4, 1.1)
    await wait_exists(api, kube.PYTORCHJOBS, "both-sweep-r8")
    await finish_trial(api, s3_server, created, 8, 1.0)

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


async def test_trials_without_a_usable_result_fail(operator, api, s3_server):
    created = await submit(api, s3_server, "sw-nores", rankSweep=sweep([4, 8], parallelism=2))
    await wait_exists(api, kube.PYTORCHJOBS, "sw-nores-sweep-r4")
    await wait_exists(api, kube.PYTORCHJOBS, "sw-nores-sweep-r8")
    # r4 succeeded long ago (longer than the publish timeout) and never wrote result.json
    await succeed(api, "sw-nores-sweep-r4", completionTime="2026-01-01T00:00:00Z")
    # r8 wrote a result without the sweep metric
    prefix = storage_layout.trial_prefix(prefix_of(created), 8)
    write_json(s3_server, storage_layout.result_uri(prefix), {"metrics": {"perplexity": 3.0}})
    await succeed(api, "sw-nores-sweep-r8")

    status = await wait_phase(api, "sw-nores", "Failed")
    assert status["failure"]["reason"] == "SweepFailed"
    assert trial(status, 4)["message"].startswith("ResultMissing:")
    assert trial(status, 8)["message"].startswith("MetricMissing:")
    assert await api.get(kube.PYTORCHJOBS, "sw-nores") is None


async def test_trial_created_just_before_a_crash_is_adopted_not_duplicated(operator, api, s3_server, k8s):
    """The operator died after creating a trial's children but before recording them in status."""
    from kubetune.api import jobconfig
    from kubetune.api.validation import validate
    from kubetune_operator.reconcile import stages

    await operator.stop()
    # its data stage had succeeded too, but that status write was lost with the rest: not run again
    created = await submit(api, s3_server, "sw-adopt", data_stage=False, rankSweep=sweep([4, 8]))
    job = {**created, "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob"}
    spec = validate(job).defaulted["spec"]
    stage = stages.trial_stage(spec, 4)
    assert stage.kind == jobconfig.STAGE_TRIAL
    for child in render_children({**job, "spec": stages.trial_spec(spec, 4)}, operator.settings.render, stage):
        resource = kube.CONFIGMAPS if child["kind"] == "ConfigMap" else kube.PYTORCHJOBS
        await api.client.create(resource, child)
    uid = (await api.get(kube.PYTORCHJOBS, "sw-adopt-sweep-r4"))["metadata"]["uid"]
    await operator.start()

    status = await wait_status(api, "sw-adopt", lambda s: trial_states(s).get(4) == "Pending")
    assert trial_states(status) == {4: "Pending", 8: "Queued"}
    await asyncio.sleep(1.0)
    assert list(await trial_jobs(api, "sw-adopt")) == ["sw-adopt-sweep-r4"]
    assert (await api.get(kube.PYTORCHJOBS, "sw-adopt-sweep-r4"))["metadata"]["uid"] == uid
    assert pytorchjob_creates(k8s) == 1
    # an unfinished trial's pods cannot start without their job config: a deleted one comes back
    await api.client.delete(kube.CONFIGMAPS, NS, "sw-adopt-sweep-r4-config")
    config_map = await wait_exists(api, kube.CONFIGMAPS, "sw-adopt-sweep-r4-config")
    assert config_of(config_map)["stage"]["rank"] == 4
    await finish_trial(api, s3_server, created, 4, 0.5)
    await wait_exists(api, kube.PYTORCHJOBS, "sw-adopt-sweep-r8")
    assert pytorchjob_creates(k8s) == 2

"""Throttled status writes (reconcile.statuswrite): volatile fields (a FineTuneJob's progress, an
AdapterDeployment's open drift window and running analysis counts) are written at most every
min_interval; any other change is written at once, with the volatile fields' latest values."""

from __future__ import annotations

import copy

import pytest

from kubetune_operator.backends import pytorchjob as pytorchjob_backend
from kubetune_operator.reconcile import finetunejob as ftj
from kubetune_operator.reconcile import statuswrite as sw
from kubetune_testing.factories import finetunejob

T0 = "2026-11-28T12:00:00Z"
T5 = "2026-11-28T12:00:05Z"
T10 = "2026-11-28T12:00:10Z"
T11 = "2026-11-28T12:00:11Z"
FTJ = sw.FINETUNEJOB_VOLATILE
ADEP = sw.ADAPTERDEPLOYMENT_VOLATILE


def running(step: int, last_write: str | None = T0) -> dict:
    status = {"phase": "Running", "observedGeneration": 1,
              "conditions": [{"type": "Running", "status": "True", "reason": "TrainingRunning", "message": "",
                              "lastTransitionTime": T0, "observedGeneration": 1}],
              "progress": {"stage": "training", "step": step, "totalSteps": 100, "percent": step,
                           "trainLoss": 2.0 - step / 100, "updateTime": T0}}
    if last_write:
        status[sw.LAST_WRITE] = last_write
    return status


def test_progress_only_within_the_interval_is_held_back():
    write = sw.status_write(running(10), running(11, last_write=None), T5, 10, FTJ)
    assert write.patch is None and write.throttled and write.due_in == 5
    assert not sw.should_write(running(10), running(11), T5, 10, FTJ)


def test_progress_only_after_the_interval_is_written_with_the_time():
    write = sw.status_write(running(10), running(42), T10, 10, FTJ)
    assert not write.throttled
    assert write.patch == {"progress": {"step": 42, "percent": 42, "trainLoss": 1.58}, sw.LAST_WRITE: T10}
    assert sw.status_write(running(10), running(42), T11, 10, FTJ).patch is not None


def test_phase_or_condition_change_is_written_at_once_with_the_latest_progress():
    new = running(50)
    new["phase"] = "Publishing"
    write = sw.status_write(running(10), new, T5, 10, FTJ)
    assert write.patch == {"phase": "Publishing", "progress": {"step": 50, "percent": 50, "trainLoss": 1.5},
                           sw.LAST_WRITE: T5}
    new = running(11)
    new["conditions"][0]["message"] = "restarting"
    assert sw.status_write(running(10), new, T5, 10, FTJ).patch["conditions"] == new["conditions"]
    for key, value in (("observedGeneration", 2), ("adapter", {"digest": "sha256:x"}),
                       ("baseline", {"state": "Succeeded"}), ("sweep", {"completed": 1}),
                       ("failure", {"reason": "X", "message": "y"}), ("attempts", 2)):
        new = {**running(11), key: value}
        assert sw.should_write(running(10), new, T5, 10, FTJ), key


def test_missing_or_unreadable_or_future_last_write_time_writes():
    assert sw.status_write(running(10, last_write=None), running(11), T5, 10, FTJ).patch[sw.LAST_WRITE] == T5
    assert sw.should_write(running(10, last_write="garbage"), running(11), T5, 10, FTJ)
    assert sw.should_write(running(10, last_write=T11), running(11), T5, 10, FTJ)  # clock skew: never freeze


def test_disabled_writes_every_change():
    write = sw.status_write(running(10), running(11), T0, 0, FTJ)
    assert write.patch == {"progress": {"step": 11, "percent": 11, "trainLoss": 1.89}, sw.LAST_WRITE: T0}


def test_nothing_changed_sends_nothing_and_is_not_counted_as_throttled():
    write = sw.status_write(running(10), running(10), T11, 10, FTJ)
    assert write == sw.StatusWrite(None)


def test_a_status_rebuilt_without_the_last_write_time_does_not_remove_it():
    old = running(10)
    new = copy.deepcopy(old)
    del new[sw.LAST_WRITE]
    assert sw.status_write(old, new, T11, 10, FTJ) == sw.StatusWrite(None)


def test_held_back_values_are_written_by_the_next_write():
    """The controllers diff against the stored status: what a skipped write held back goes with the next one."""
    stored = running(10)
    for step, now in ((11, "2026-11-28T12:00:02Z"), (12, "2026-11-28T12:00:04Z")):
        assert sw.status_write(stored, running(step), now, 10, FTJ).patch is None
    write = sw.status_write(stored, running(13), T10, 10, FTJ)
    assert write.patch["progress"]["step"] == 13


def test_the_real_state_machine_progress_is_volatile():
    job = finetunejob()
    job["metadata"]["uid"] = "0b7f-uid"
    first = ftj.decide(ftj.Observed(job=job, now=T0), ftj.Settings())
    job = {**job, "status": {**first.status, sw.LAST_WRITE: T0}}
    workload = pytorchjob_backend.read_status({**first.create[1], "status": {"conditions": [
        {"type": "Running", "status": "True", "reason": "Running", "message": "", "lastTransitionTime": T0}]}})
    progress = {"api": "kubetune.io/progress/v1", "stage": "training", "step": 5, "totalSteps": 10,
                "updateTime": T0}
    running_plan = ftj.decide(ftj.Observed(job=job, now=T0, workload=workload, progress=progress),
                              ftj.Settings())
    assert sw.should_write(job["status"], running_plan.status, T5, 10, FTJ)  # Pending -> Running
    job = {**job, "status": {**running_plan.status, sw.LAST_WRITE: T0}}
    later = ftj.decide(ftj.Observed(job=job, now=T5, workload=workload,
                                    progress={**progress, "step": 6, "updateTime": T5}), ftj.Settings())
    write = sw.status_write(job["status"], later.status, T5, 10, FTJ)
    assert write.throttled
    assert sw.status_write(job["status"], later.status, T10, 10, FTJ).patch["progress"] == {
        "step": 6, "percent": 60, "updateTime": T5}


def adep_status(requests: int, decision_time: str = T0, canary_requests: int = 3, **drift) -> dict:
    return {"phase": "Progressing", "observedGeneration": 1, sw.LAST_WRITE: T0, "adapters": [{
        "name": "support-bot", "podsReady": 2, "stepIndex": 1,
        "analysis": {"step": 1, "startTime": T0, "last": {"outcome": "Pending", "canaryRequests": canary_requests,
                                                          "stableRequests": 10 * canary_requests,
                                                          "message": f"{canary_requests} canary requests"}},
        "drift": {"state": "Watching", "window": {"index": 3, "requests": requests, "startTime": T0},
                  "lastDecision": {"time": decision_time, "reason": "RetrainCoolingDown", "message": "cooling"},
                  "windows": [], **drift}}]}


def test_adapterdeployment_window_and_analysis_counters_are_volatile():
    old = adep_status(10)
    assert sw.status_write(old, adep_status(25, decision_time=T5, canary_requests=9), T5, 10, ADEP).throttled
    write = sw.status_write(old, adep_status(25, decision_time=T5), T10, 10, ADEP)
    assert write.patch[sw.LAST_WRITE] == T10
    assert write.patch["adapters"][0]["drift"]["window"]["requests"] == 25  # lists go whole


@pytest.mark.parametrize("change", [
    lambda s: s["adapters"][0]["drift"].update(state="Drifted"),
    lambda s: s["adapters"][0]["drift"]["window"].update(index=4),
    lambda s: s["adapters"][0]["drift"].update(windows=[{"index": 3, "drifted": True}]),
    lambda s: s["adapters"][0]["drift"].update(retrain={"job": "support-support-bot-retrain-1"}),
    lambda s: s["adapters"][0]["drift"]["lastDecision"].update(reason="RetrainStarted"),
    lambda s: s["adapters"][0]["analysis"]["last"].update(outcome="Pass"),
    lambda s: s["adapters"][0].update(podsReady=1),
    lambda s: s.update(phase="Ready"),
])
def test_adapterdeployment_rollout_and_drift_decisions_are_written_at_once(change):
    new = adep_status(25, decision_time=T5)
    change(new)
    assert sw.should_write(adep_status(10), new, T5, 10, ADEP)

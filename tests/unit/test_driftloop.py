"""The drift loop's pure decisions: guards (k of n, hysteresis, cooldown, budget, caps, labelled data),
retrain start/adoption/outcome, the promotion gate, and which source an alias serves."""

from __future__ import annotations

import copy

from kubetune.api.validation import validate
from kubetune_operator.reconcile import driftloop as dl
from kubetune_testing.factories import adapterdeployment

T0 = "2026-11-28T12:00:00Z"


def adep(**drift) -> dict:
    doc = adapterdeployment()
    doc["metadata"]["uid"] = "uid-adep"
    doc["spec"]["trafficSampling"] = {"rate": 1.0, "uri": "s3://samples/support"}
    doc["spec"]["adapters"][0]["drift"] = {
        "guard": {"triggerWindows": 2, "ofWindows": 3, "clearWindows": 2, "cooldownSeconds": 600,
                  "maxRetrainsPerPeriod": 2, "periodSeconds": 86400},
        "retrain": {"labelledData": {"uri": "s3://labels/support/", "minExamples": 50},
                    "template": {"metadata": {"labels": {"team": "a"}},
                                 "spec": {"baseModel": {"uri": "hf://meta-llama/Llama-2-7b-hf"},
                                          "task": "SequenceClassification", "training": {"epochs": 2},
                                          "output": {"uri": "s3://adapters/retrains"}}}},
        **drift,
    }
    doc["spec"]["adapters"][0]["drift"] = {k: v for k, v in doc["spec"]["adapters"][0]["drift"].items()
                                           if v is not None}
    result = validate(doc)
    assert result.ok, result.errors
    return result.defaulted


def verdict(index: int, drifted: bool, diagnostics: bool = False) -> dict:
    return {"index": index, "requests": 100, "endTime": T0, "drifted": drifted,
            "triggers": {"confidence": {"fired": drifted}, "entropy": {"fired": drifted}},
            "diagnostics": {"embedding": {"fired": diagnostics}}, "summary": f"window {index}"}


def observed(*verdicts, now=T0, version="team-a/support-bot@aaa", **kw) -> dl.Observed:
    return dl.Observed(now=now, version=version, verdicts=tuple(verdicts), **kw)


def run(doc, previous, obs):
    adapter = doc["spec"]["adapters"][0]
    return dl.decide(doc, adapter, previous, obs)


def reasons(plan) -> list[str]:
    return [e.reason for e in plan.events]


def test_k_of_n_windows_before_drift_and_hysteresis_before_clearing():
    doc = adep(retrain=None)
    plan = run(doc, None, observed(verdict(1, True)))
    assert plan.status["state"] == "Suspect" and not plan.status.get("drifted")
    plan = run(doc, plan.status, observed(verdict(2, False), verdict(3, True)))
    assert plan.status["drifted"] is True and "DriftDetected" in reasons(plan)
    assert "DetectOnly" in reasons(plan) and plan.start_retrain is None
    plan = run(doc, plan.status, observed(verdict(4, False)))
    assert plan.status["drifted"] is True  # one clean window is not enough (clearWindows 2)
    plan = run(doc, plan.status, observed(verdict(5, False)))
    assert plan.status["drifted"] is False and "DriftCleared" in reasons(plan)
    assert plan.status["state"] == "Watching"


def test_spread_out_bad_windows_do_not_trigger():
    doc = adep()
    status = None
    for i, bad in enumerate([True, False, False, True, False, False, True]):
        plan = run(doc, status, observed(verdict(i, bad), new_labelled=500))
        status = plan.status
        assert plan.start_retrain is None
    assert not status.get("drifted")


def test_diagnostic_only_windows_are_reported_not_acted_on():
    doc = adep()
    plan = run(doc, None, observed(*[verdict(i, False, diagnostics=True) for i in range(5)], new_labelled=500))
    assert reasons(plan).count("WindowDiagnostics") == 5
    assert plan.start_retrain is None and not plan.status.get("drifted")


def test_a_burst_starts_exactly_one_retrain_and_then_follows_it():
    doc = adep()
    plan = run(doc, None, observed(*[verdict(i, True) for i in range(20)], new_labelled=80))
    assert plan.start_retrain == "support-support-bot-retrain-1"
    assert reasons(plan).count("RetrainStarted") == 1
    status = plan.status
    assert status["state"] == "Retraining"
    job = dl.RetrainJob("support-support-bot-retrain-1", "Running")
    for i in range(20, 30):  # still drifted, the retrain runs: nothing new starts
        plan = run(doc, status, observed(verdict(i, True), new_labelled=500, retrain_jobs=(job,)))
        status = plan.status
        assert plan.start_retrain is None
    assert status["retrain"]["phase"] == "Running"


def test_a_lost_status_patch_adopts_the_running_job_instead_of_starting_another():
    doc = adep()
    job = dl.RetrainJob("support-support-bot-retrain-1", "Pending")
    plan = run(doc, None, observed(verdict(1, True), verdict(2, True), new_labelled=500, retrain_jobs=(job,)))
    assert plan.start_retrain is None
    assert plan.status["retrain"]["job"] == job.name


def test_guards_hold_a_retrain_back_with_one_event_per_reason():
    doc = adep()
    drifted = run(doc, None, observed(verdict(1, True), verdict(2, True), new_labelled=10)).status
    assert drifted["lastDecision"]["reason"] == "InsufficientLabelledData"
    plan = run(doc, drifted, observed(new_labelled=10))
    assert "InsufficientLabelledData" not in reasons(plan)  # not repeated every pass
    plan = run(doc, drifted, observed(new_labelled=500, cluster_in_flight=2, cluster_cap=2))
    assert plan.start_retrain is None and "RetrainClusterCapReached" in reasons(plan)
    plan = run(doc, drifted, observed(new_labelled=500, labelled_problem="cannot list s3://labels/"))
    assert "LabelledDataUnavailable" in reasons(plan)
    plan = run(doc, drifted, observed(new_labelled=500))
    assert plan.start_retrain is not None


def test_cooldown_and_budget():
    doc = adep()
    status = run(doc, None, observed(verdict(1, True), verdict(2, True), new_labelled=500)).status
    failed = dl.RetrainJob(status["retrain"]["job"], "Failed", message="OOM")
    plan = run(doc, status, observed(retrain_jobs=(failed,), new_labelled=500))
    assert "RetrainFailed" in reasons(plan) and plan.status["history"][-1]["outcome"] == "Failed"
    assert plan.status["state"] == "Cooldown" and plan.status["cooldownUntil"] == "2026-11-28T12:10:00Z"
    status = plan.status
    plan = run(doc, status, observed(verdict(3, True), verdict(4, True), now="2026-11-28T12:05:00Z",
                                     retrain_jobs=(failed,), new_labelled=500))
    assert plan.start_retrain is None and "RetrainCoolingDown" in reasons(plan)
    plan = run(doc, plan.status, observed(now="2026-11-28T12:11:00Z", retrain_jobs=(failed,), new_labelled=500))
    assert plan.start_retrain == "support-support-bot-retrain-2"
    status = plan.status
    second = dl.RetrainJob(plan.start_retrain, "Failed", message="again")
    status = run(doc, status, observed(now="2026-11-28T12:12:00Z", retrain_jobs=(failed, second))).status
    plan = run(doc, status, observed(verdict(5, True), verdict(6, True), now="2026-11-28T13:00:00Z",
                                     retrain_jobs=(failed, second), new_labelled=500))
    assert plan.start_retrain is None and "RetrainBudgetExhausted" in reasons(plan)  # 2 per day
    plan = run(doc, plan.status, observed(now="2026-11-29T12:30:00Z", retrain_jobs=(failed, second),
                                          new_labelled=500))
    assert plan.start_retrain == "support-support-bot-retrain-3"


def manifest(new, original, metric="accuracy"):
    return {"task": "SequenceClassification", "evaluations": {
        "new": {"examples": 40, "candidate": {metric: new[0]}, "reference": {metric: new[1]}},
        "original": {"examples": 200, "candidate": {metric: original[0]}, "reference": {metric: original[1]}}}}


def test_gate():
    promotion = {"minImprovement": 0.0, "maxRegression": 0.02}
    ok = dl.gate(manifest((0.9, 0.1), (0.95, 0.96)), promotion, "SequenceClassification")
    assert ok.promote and ok.numbers["improvement"] == 0.8 and ok.numbers["originalChange"] == -0.01
    worse_old = dl.gate(manifest((0.9, 0.1), (0.80, 0.96)), promotion, "SequenceClassification")
    assert not worse_old.promote and worse_old.reason == "RegressesOnOriginalData"
    not_better = dl.gate(manifest((0.5, 0.5), (0.96, 0.96)), promotion, "SequenceClassification")
    assert not not_better.promote and not_better.reason == "NotBetterOnNewData"
    loss = dl.gate(manifest((0.4, 1.9), (0.30, 0.29), "eval_loss"), {**promotion, "metric": "eval_loss"}, "CausalLM")
    assert loss.promote  # lower is better: 0.4 beats 1.9; 0.30 vs 0.29 is within 0.02
    missing = dl.gate({"evaluations": {}}, promotion, "SequenceClassification")
    assert not missing.promote and missing.reason == "EvaluationMissing"


def test_success_runs_the_gate_then_promotes_and_the_source_switches():
    doc = adep()
    adapter = doc["spec"]["adapters"][0]
    status = run(doc, None, observed(verdict(1, True), verdict(2, True), new_labelled=500)).status
    published = {"digest": "sha256:" + "c" * 64, "manifestUri": "s3://adapters/retrains/m.json"}
    done = dl.RetrainJob(status["retrain"]["job"], "Succeeded", adapter=published)
    plan = run(doc, status, observed(retrain_jobs=(done,), candidate=manifest((0.9, 0.1), (0.95, 0.95))))
    assert "CandidatePromoted" in reasons(plan)
    entry = plan.status["history"][-1]
    assert entry["outcome"] == "Promoted" and entry["numbers"]["new"] == {"candidate": 0.9, "serving": 0.1,
                                                                          "examples": 40}
    promoted = dl.promoted_source(adapter, plan.status)
    assert promoted["digest"] == published["digest"]
    # the user points the adapter at another job: their choice wins over the promoted retrain
    other = copy.deepcopy(adapter)
    other["source"] = {"fineTuneJobRef": {"name": "hand-made"}}
    assert dl.promoted_source(other, plan.status) is None


def test_a_worse_candidate_is_rejected_with_its_numbers():
    doc = adep()
    status = run(doc, None, observed(verdict(1, True), verdict(2, True), new_labelled=500)).status
    done = dl.RetrainJob(status["retrain"]["job"], "Succeeded", adapter={"digest": "sha256:d", "manifestUri": "u"})
    plan = run(doc, status, observed(retrain_jobs=(done,), candidate=manifest((0.9, 0.1), (0.70, 0.95))))
    assert "CandidateRejected" in reasons(plan)
    assert plan.status["history"][-1]["outcome"] == "Rejected"
    assert plan.status["history"][-1]["numbers"]["original"]["candidate"] == 0.70
    assert "promoted" not in plan.status


def test_a_new_stable_version_restarts_the_windows():
    doc = adep(retrain=None)
    status = run(doc, None, observed(verdict(1, True), verdict(2, True))).status
    assert status["drifted"]
    plan = run(doc, status, observed(version="team-a/support-bot@bbb"))
    assert not plan.status.get("drifted") and plan.status["windows"] == []


def test_retrain_job_is_a_valid_finetunejob_owned_by_the_deployment():
    doc = adep()
    adapter = doc["spec"]["adapters"][0]
    data = dl.RetrainData("s3://data/train.jsonl", "s3://data/val.jsonl", "s3://data/orig.jsonl", "s3://data/new.jsonl",
                          "text-label")
    job = dl.retrain_job(doc, adapter, "support-support-bot-retrain-1", data, "s3://archive/manifest.json")
    result = validate(job)
    assert result.ok, result.errors
    assert job["metadata"]["ownerReferences"][0]["uid"] == "uid-adep"
    assert job["metadata"]["labels"] == {"team": "a", dl.LABEL_RETRAIN_OF: "support",
                                         dl.LABEL_RETRAIN_ADAPTER: "support-bot"}
    assert job["spec"]["evaluation"]["reference"] == {"manifestUri": "s3://archive/manifest.json"}
    assert [s["name"] for s in job["spec"]["evaluation"]["sets"]] == ["original", "new"]


def test_job_names_fit_and_split_is_stable():
    name = dl.retrain_job_name("a-very-long-adapterdeployment-name", "another-long-adapter", 12)
    assert len(name) <= 45 and name.endswith("-retrain-12")
    lines = [(f"text {i}", f"line {i}") for i in range(1000)]
    train, holdout = dl.split_labelled(lines, 0.2)
    assert 150 < len(holdout) < 250 and len(train) + len(holdout) == 1000
    assert dl.split_labelled(lines, 0.2) == (train, holdout)


def test_window_due():
    window = {"requests": 100, "maxSeconds": 60, "minRequests": 20}
    assert dl.window_due(100, T0, T0, window)
    assert not dl.window_due(50, T0, "2026-11-28T12:00:30Z", window)
    assert dl.window_due(50, T0, "2026-11-28T12:01:00Z", window)
    assert not dl.window_due(10, T0, "2026-11-28T13:00:00Z", window)  # too few, however long


def test_rollout_view_serves_the_promoted_retrain_while_the_spec_source_is_unchanged():
    doc = adep()
    drift = {"promoted": {"job": "r1", "digest": "sha256:" + "e" * 64, "manifestUri": "s3://arc/r1/manifest.json",
                          "replaces": dl.adapter_source_key(doc["spec"]["adapters"][0])}}
    view = dl.rollout_view(doc, {"support-bot": {"name": "support-bot", "drift": drift}})
    assert view["spec"]["adapters"][0]["source"] == {"uri": "s3://arc/r1/manifest.json", "digest": "sha256:" + "e" * 64}
    assert doc["spec"]["adapters"][0]["source"] == {"fineTuneJobRef": {"name": "llama-lora"}}  # spec untouched
    assert dl.rollout_view(doc, {})["spec"]["adapters"][0]["source"] == {"fineTuneJobRef": {"name": "llama-lora"}}


def test_a_retrain_that_cannot_be_created_counts_as_failed_and_cools_down():
    doc = adep()
    adapter = doc["spec"]["adapters"][0]
    plan = run(doc, None, observed(verdict(1, True), verdict(2, True), new_labelled=500))
    status, event = dl.retrain_not_started(plan.status, adapter, "team-a/support-bot", T0, "RetrainNotStarted",
                                           "labelled.jsonl line 3: not JSON")
    assert "retrain" not in status and status["history"][-1]["outcome"] == "Failed"
    assert status["cooldownUntil"] == "2026-11-28T12:10:00Z" and status["state"] == "Cooldown"
    assert event.type == "Warning" and event.message.startswith("team-a/support-bot: retrain ")
    assert "line 3" in event.message

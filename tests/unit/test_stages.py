"""The stages before training, pure: baseline gate and LoRA rank sweep (reconcile/stages.py), their
PyTorchJob names (render), their job config and storage prefixes (api/jobconfig.py) and their spec fields."""

from __future__ import annotations

import copy
import json
import re

import pytest

from kubetune.api import jobconfig, storage_layout
from kubetune.api.validation import validate
from kubetune_operator.backends import render_children
from kubetune_operator.reconcile import stages
from kubetune_operator.render import training as render
from kubetune_testing.factories import finetunejob

ROOT = "s3://adapters/team-a/team-a/llama-lora/0b7f-uid/"
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
BASELINE = jobconfig.Stage(kind=jobconfig.STAGE_BASELINE)


def trial(rank: int) -> jobconfig.Stage:
    return jobconfig.Stage(kind=jobconfig.STAGE_TRIAL, rank=rank)


def defaulted(**overrides) -> dict:
    result = validate(finetunejob(**overrides))
    assert result.ok, [str(e) for e in result.errors]
    return result.defaulted["spec"]


def sweep_spec(**sweep) -> dict:
    return defaulted(rankSweep=sweep)


def t(rank, state=stages.SUCCEEDED, metric=None, **extra) -> dict:
    out = {"rank": rank, "state": state, **extra}
    if metric is not None:
        out["metric"] = metric
    return out


# --- baseline ----------------------------------------------------------------------------------------


def test_baseline_spec_defaults_when_absent():
    assert stages.baseline_spec({}) == {"enabled": True, "forceTraining": False}
    assert stages.baseline_spec({"baseline": {"enabled": False}}) == {"enabled": False}


@pytest.mark.parametrize(("baseline", "gates"), [
    (None, False),
    ({}, False),
    ({"enabled": True}, False),
    ({"target": {"metric": "eval_loss", "value": 1.0}}, True),
    ({"enabled": True, "target": {"metric": "eval_loss", "value": 1.0}, "forceTraining": False}, True),
    ({"enabled": True, "target": {"metric": "eval_loss", "value": 1.0}, "forceTraining": True}, False),
    ({"enabled": False, "target": {"metric": "eval_loss", "value": 1.0}}, False),
])
def test_baseline_gates_only_with_a_target_that_can_stop_the_job(baseline, gates):
    spec = {} if baseline is None else {"baseline": baseline}
    assert stages.baseline_gates(spec) is gates


def test_higher_is_better():
    assert stages.higher_is_better("accuracy") and stages.higher_is_better("macro_f1")
    assert not stages.higher_is_better("eval_loss") and not stages.higher_is_better("perplexity")


@pytest.mark.parametrize(("metric", "value", "target", "met"), [
    ("eval_loss", 0.9, 1.0, True),
    ("eval_loss", 1.0, 1.0, True),  # at the target counts
    ("eval_loss", 1.1, 1.0, False),
    ("perplexity", 3.0, 4.0, True),
    ("perplexity", 5.0, 4.0, False),
    ("accuracy", 0.95, 0.9, True),
    ("accuracy", 0.9, 0.9, True),
    ("accuracy", 0.083, 0.9, False),
    ("macro_f1", 0.7, 0.6, True),
    ("macro_f1", 0.5, 0.6, False),
])
def test_baseline_met_by_metric_direction(metric, value, target, met):
    assert stages.baseline_met({metric: value, "other": 123.0}, {"metric": metric, "value": target}) is met


def test_baseline_met_is_none_without_target_or_metric():
    target = {"metric": "accuracy", "value": 0.9}
    assert stages.baseline_met({"accuracy": 0.99}, None) is None
    assert stages.baseline_met({"accuracy": 0.99}, {}) is None
    assert stages.baseline_met({"eval_loss": 0.1}, target) is None  # the metric was not reported
    assert stages.baseline_met({}, target) is None
    assert stages.baseline_met(None, target) is None
    assert stages.baseline_met({"accuracy": float("nan")}, target) is None
    assert stages.baseline_met({"accuracy": float("inf")}, target) is None
    assert stages.baseline_met({"accuracy": True}, target) is None  # a bool is not a metric
    assert stages.baseline_met({"accuracy": "0.99"}, target) is None


@pytest.mark.parametrize(("metrics", "target", "task", "summary"), [
    ({"accuracy": 0.083}, {"metric": "accuracy", "value": 0.9}, "SequenceClassification", "accuracy 0.083 < 0.9"),
    ({"accuracy": 0.95}, {"metric": "accuracy", "value": 0.9}, "SequenceClassification", "accuracy 0.95 >= 0.9"),
    ({"eval_loss": 0.8}, {"metric": "eval_loss", "value": 1.0}, "CausalLM", "eval_loss 0.8 <= 1"),
    ({"eval_loss": 1.23456}, {"metric": "eval_loss", "value": 1.0}, "CausalLM", "eval_loss 1.235 > 1"),
    ({"perplexity": 12.5}, {"metric": "perplexity", "value": 10}, "CausalLM", "perplexity 12.5 > 10"),
    ({"eval_loss": 0.8}, {"metric": "accuracy", "value": 0.9}, "SequenceClassification", "accuracy not reported"),
    ({"accuracy": float("nan")}, {"metric": "accuracy", "value": 0.9}, "SequenceClassification",
     "accuracy not reported"),
    ({"accuracy": 0.41, "eval_loss": 1.9}, None, "SequenceClassification", "accuracy 0.41"),
    ({"accuracy": 0.41, "eval_loss": 1.9}, None, "CausalLM", "eval_loss 1.9"),
    ({"accuracy": 0.41}, None, "CausalLM", ""),
    (None, None, "CausalLM", ""),
])
def test_baseline_summary(metrics, target, task, summary):
    assert stages.baseline_summary(metrics, target, task) == summary


# --- sweep: what to run ------------------------------------------------------------------------------


def test_sweep_requested_only_for_lora_and_qlora():
    assert stages.sweep_requested(sweep_spec())
    qlora = defaulted(method={"type": "QLoRA", "quantization": {}}, distributed={"nodes": 1, "gpusPerNode": 1},
                      rankSweep={})
    assert stages.sweep_requested(qlora)
    assert not stages.sweep_requested(defaulted())
    full = defaulted(method={"type": "Full"})
    assert not stages.sweep_requested({**full, "rankSweep": {"ranks": [4, 8]}})


def test_sweep_ranks_sorted_and_unique():
    spec = sweep_spec(ranks=[32, 4, 16])
    assert stages.sweep_ranks(spec) == [4, 16, 32]
    assert stages.sweep_ranks({"rankSweep": {"ranks": [8, 4, 8, 2]}}) == [2, 4, 8]
    assert stages.sweep_ranks(sweep_spec()) == [4, 8, 16, 32]


def test_lora_alpha_proportional_keeps_the_ratio():
    spec = sweep_spec()  # lora rank 16, alpha 32 (default 2 x rank)
    assert spec["method"]["lora"] == {**spec["method"]["lora"], "rank": 16, "alpha": 32}
    assert spec["rankSweep"]["alpha"] == "Proportional"
    assert [stages.lora_alpha(spec, r) for r in (1, 4, 8, 16, 32, 512)] == [2, 8, 16, 32, 64, 1024]
    low = copy.deepcopy(spec)
    low["method"]["lora"]["alpha"] = 1
    assert stages.lora_alpha(low, 4) == 1  # never below 1 (0.25 rounds to 0)
    assert stages.lora_alpha(low, 64) == 4


def test_lora_alpha_fixed_keeps_the_spec_alpha():
    spec = sweep_spec(alpha="Fixed")
    assert [stages.lora_alpha(spec, r) for r in (4, 8, 64)] == [32, 32, 32]


def test_trial_spec_is_the_job_at_one_rank_short_and_plain():
    spec = defaulted(
        training={"epochs": 3, "evalSteps": 50, "earlyStopping": {"patience": 2}},
        output={"uri": "s3://adapters/x", "mergeAdapter": True},
        baseline={"target": {"metric": "eval_loss", "value": 1.0}},
        rankSweep={"ranks": [8, 4], "epochs": 0.5, "maxSteps": 20},
    )
    before = copy.deepcopy(spec)
    out = stages.trial_spec(spec, 4)
    assert spec == before  # the input is not mutated
    assert out["method"]["lora"]["rank"] == 4 and out["method"]["lora"]["alpha"] == 8
    assert out["method"]["lora"]["dropout"] == spec["method"]["lora"]["dropout"]
    assert out["training"]["epochs"] == 0.5
    for key in ("maxSteps", "earlyStopping", "evalSteps"):
        assert key not in out["training"]
    assert out["training"].get("learningRate") == spec["training"].get("learningRate")
    assert out["baseline"] == {"enabled": False, "forceTraining": False}
    assert out["output"]["mergeAdapter"] is False
    assert out["output"]["uri"] == "s3://adapters/x"
    assert "rankSweep" not in out
    assert out["dataset"] == spec["dataset"]
    # and nested objects are not shared with the input
    out["training"]["learningRate"] = 1.0
    out["output"]["uri"] = "s3://elsewhere/y"
    assert spec == before


def test_trial_spec_fixed_alpha_and_max_steps_dropped_from_training():
    spec = defaulted(training={"maxSteps": 300}, rankSweep={"ranks": [4, 8], "alpha": "Fixed", "epochs": 2})
    out = stages.trial_spec(spec, 8)
    assert out["method"]["lora"] == {**spec["method"]["lora"], "rank": 8, "alpha": 32}
    assert "maxSteps" not in out["training"] and out["training"]["epochs"] == 2
    assert spec["training"]["maxSteps"] == 300


def test_trial_stage_carries_rank_holdout_and_step_cap():
    assert stages.trial_stage(sweep_spec(maxSteps=20, holdoutFraction=0.2), 8) == jobconfig.Stage(
        kind=jobconfig.STAGE_TRIAL, rank=8, holdout_fraction=0.2, max_steps=20)
    assert stages.trial_stage(sweep_spec(), 4) == jobconfig.Stage(
        kind=jobconfig.STAGE_TRIAL, rank=4, holdout_fraction=0.1, max_steps=None)


def test_training_spec_applies_the_chosen_rank():
    spec = sweep_spec()
    before = copy.deepcopy(spec)
    out = stages.training_spec(spec, 8)
    assert out["method"]["lora"]["rank"] == 8 and out["method"]["lora"]["alpha"] == 16
    assert out["training"] == spec["training"]  # the full run keeps its own schedule
    assert out["output"] == spec["output"]
    assert spec == before
    assert stages.training_spec(spec, None) is spec
    plain = defaulted()
    assert stages.training_spec(plain, 8) is plain  # no sweep: the spec's own rank
    fixed = stages.training_spec(sweep_spec(alpha="Fixed"), 4)
    assert fixed["method"]["lora"]["rank"] == 4 and fixed["method"]["lora"]["alpha"] == 32


# --- sweep: choosing ---------------------------------------------------------------------------------


def test_choose_rank_lower_is_better():
    trials = [t(4, metric=1.3), t(8, metric=1.1), t(16, metric=1.2), t(32, metric=1.15)]
    assert stages.choose_rank(trials, "eval_loss")["rank"] == 8
    assert stages.choose_rank(trials, "perplexity")["rank"] == 8


def test_choose_rank_higher_is_better():
    trials = [t(4, metric=0.70), t(8, metric=0.91), t(16, metric=0.85)]
    assert stages.choose_rank(trials, "accuracy")["rank"] == 8
    assert stages.choose_rank(trials, "macro_f1")["rank"] == 8
    assert stages.choose_rank(trials, "eval_loss")["rank"] == 4  # same numbers, other direction


def test_choose_rank_exact_tie_goes_to_the_smaller_rank():
    trials = [t(32, metric=1.0), t(8, metric=1.0), t(16, metric=1.0), t(4, metric=1.5)]
    best = stages.choose_rank(trials, "eval_loss")
    assert best == t(8, metric=1.0)
    assert stages.choose_rank([t(16, metric=0.9), t(8, metric=0.9)], "accuracy")["rank"] == 8


def test_choose_rank_tolerance_ties_go_to_the_smallest_rank_within_it():
    trials = [t(4, metric=1.30), t(8, metric=1.12), t(16, metric=1.10), t(32, metric=1.00)]
    assert stages.choose_rank(trials, "eval_loss", 0.0)["rank"] == 32
    assert stages.choose_rank(trials, "eval_loss", 0.05)["rank"] == 32
    assert stages.choose_rank(trials, "eval_loss", 0.11)["rank"] == 16  # 1.10 is within 0.11 of 1.00
    assert stages.choose_rank(trials, "eval_loss", 0.15)["rank"] == 8  # 1.12 too; 1.30 is not
    assert stages.choose_rank(trials, "eval_loss", 0.5)["rank"] == 4
    accuracy = [t(4, metric=0.80), t(8, metric=0.89), t(16, metric=0.90)]
    assert stages.choose_rank(accuracy, "accuracy", 0.02)["rank"] == 8
    assert stages.choose_rank(accuracy, "accuracy", 0.2)["rank"] == 4
    assert stages.choose_rank(accuracy, "accuracy", 0.0)["rank"] == 16


def test_choose_rank_ignores_failed_and_non_finite_trials():
    trials = [
        t(4, stages.FAILED, metric=0.1, message="TrainingFailed: oom"),
        t(8, metric=float("nan")),
        t(16, metric=float("-inf")),
        t(32, stages.RUNNING, metric=0.2),
        t(64, stages.QUEUED),
        t(128, metric=1.4),
        t(256, metric=True),
        t(512),  # succeeded without a metric
    ]
    assert stages.choose_rank(trials, "eval_loss")["rank"] == 128
    assert stages.choose_rank(trials, "eval_loss", 10.0)["rank"] == 128


def test_choose_rank_none_when_nothing_succeeded():
    assert stages.choose_rank([], "eval_loss") is None
    assert stages.choose_rank([t(4, stages.FAILED), t(8, stages.FAILED, metric=1.0)], "eval_loss") is None
    assert stages.choose_rank([t(4, metric=float("nan")), t(8, stages.RUNNING)], "eval_loss") is None


@pytest.mark.parametrize(("trials", "parallelism", "ranks"), [
    ([t(16, stages.QUEUED), t(4, stages.QUEUED), t(8, stages.QUEUED)], 1, [4]),
    ([t(16, stages.QUEUED), t(4, stages.QUEUED), t(8, stages.QUEUED)], 2, [4, 8]),
    ([t(16, stages.QUEUED), t(4, stages.QUEUED), t(8, stages.QUEUED)], 16, [4, 8, 16]),
    ([t(4, stages.RUNNING), t(8, stages.QUEUED), t(16, stages.QUEUED)], 1, []),
    ([t(4, stages.PENDING), t(8, stages.QUEUED), t(16, stages.QUEUED)], 2, [8]),
    ([t(4, stages.PENDING), t(8, stages.RUNNING), t(16, stages.QUEUED)], 2, []),
    ([t(4, stages.SUCCEEDED), t(8, stages.FAILED), t(16, stages.QUEUED), t(32, stages.QUEUED)], 1, [16]),
    ([t(4, stages.RUNNING), t(8, stages.RUNNING), t(16, stages.QUEUED)], 1, []),  # over the limit: none
    ([t(4, stages.SUCCEEDED), t(8, stages.FAILED)], 4, []),
])
def test_runnable_fills_free_slots_in_rank_order(trials, parallelism, ranks):
    assert stages.runnable(trials, parallelism) == ranks


def test_sweep_summary():
    queued = [t(4, stages.QUEUED), t(8, stages.QUEUED), t(16, stages.QUEUED)]
    assert stages.sweep_summary(queued, None) == "0/3 done"
    running = [t(4, stages.PENDING), t(8, stages.RUNNING), t(16, stages.QUEUED)]
    assert stages.sweep_summary(running, None) == "0/3 done, 2 running"
    mixed = [t(4, metric=1.0), t(8, stages.FAILED), t(16, stages.RUNNING)]
    assert stages.sweep_summary(mixed, None) == "2/3 done, 1 failed, 1 running"
    done = [t(4, metric=1.0), t(8, stages.FAILED), t(16, metric=0.9)]
    assert stages.sweep_summary(done, done[2]) == "3/3 done, 1 failed, best r16"
    assert stages.sweep_summary([t(4, metric=1.0), t(8, metric=2.0)], t(4, metric=1.0)) == "2/2 done, best r4"


def test_trial_metric_from_result_json():
    assert stages.trial_metric({"metrics": {"eval_loss": 1.25, "accuracy": 0.5}}, "eval_loss") == 1.25
    value = stages.trial_metric({"metrics": {"accuracy": 1}}, "accuracy")
    assert value == 1.0 and isinstance(value, float)
    assert stages.trial_metric({"metrics": {"eval_loss": 1.25}}, "accuracy") is None
    assert stages.trial_metric({"metrics": {"eval_loss": float("nan")}}, "eval_loss") is None
    assert stages.trial_metric({"metrics": {"eval_loss": "1.2"}}, "eval_loss") is None
    assert stages.trial_metric({"metrics": None}, "eval_loss") is None
    assert stages.trial_metric({}, "eval_loss") is None
    assert stages.trial_metric(None, "eval_loss") is None


def test_table_rows_in_rank_order_with_the_choice_marked():
    trials = [
        t(16, metric=1.2, alpha=32, durationSeconds=95.4),
        t(4, metric=1.3, alpha=8, durationSeconds=120.0),
        t(8, stages.FAILED, alpha=16, message="x"),
        t(32, stages.RUNNING),
    ]
    lines = stages.table(trials, "eval_loss", 16).splitlines()
    assert len(lines) == 5
    assert lines[0].split() == ["rank", "alpha", "state", "eval_loss", "seconds"]
    assert lines[1].split() == ["4", "8", "Succeeded", "1.3000", "120"]
    assert lines[2].split() == ["8", "16", "Failed", "-", "-"]
    assert lines[3].split() == ["16", "32", "Succeeded", "1.2000", "95", "<-", "chosen"]
    assert lines[4].split() == ["32", "-", "Running", "-", "-"]
    assert [line.endswith("<- chosen") for line in lines] == [False, False, False, True, False]
    assert lines[1] == "    4     8 Succeeded       1.3000      120"
    assert len({len(line) for line in lines[:3]}) == 1  # aligned columns
    assert "<- chosen" not in stages.table(trials, "eval_loss", None)


# --- names of the stage jobs -------------------------------------------------------------------------


def test_stage_job_names_are_deterministic_and_suffixed():
    assert render.stage_job_name("llama-lora", BASELINE) == "llama-lora-baseline"
    assert render.stage_job_name("llama-lora", trial(8)) == "llama-lora-sweep-r8"
    assert render.stage_job_name("llama-lora", jobconfig.Stage()) == "llama-lora"
    assert render.stage_config_map_name("llama-lora", BASELINE) == "llama-lora-baseline-config"
    assert render.stage_config_map_name("llama-lora", trial(8)) == "llama-lora-sweep-r8-config"
    assert render.stage_config_map_name("llama-lora", jobconfig.Stage()) == "llama-lora-config"
    # a trial's name does not depend on anything but the rank (not holdout, steps or metrics)
    other = jobconfig.Stage(kind=jobconfig.STAGE_TRIAL, rank=8, holdout_fraction=0.3, max_steps=5)
    assert render.stage_job_name("llama-lora", other) == "llama-lora-sweep-r8"
    names = {render.stage_job_name("llama-lora", trial(r)) for r in (4, 8, 16, 32)}
    assert len(names) == 4


def test_stage_names_leave_room_for_the_training_operators_replica_services():
    # the training operator names a Service `<job>-worker-<index>` per replica (nodes <= 1024): a DNS-1035 label
    name = "a" * 44 + "z"
    assert len(name) == 45
    job_name = render.stage_job_name(name, trial(512))
    assert len(job_name) <= render.MAX_WORKLOAD_NAME == 51 and job_name.endswith("-sweep-r512")
    assert DNS_1035.match(f"{job_name}-worker-1022") and len(f"{job_name}-worker-1022") <= 63
    assert render.stage_job_name(name, trial(512)) == job_name
    assert render.stage_job_name("a" * 42, BASELINE) == f"{'a' * 42}-baseline"


@pytest.mark.parametrize("length", [53, 60, 63, 100, 253])
def test_long_job_names_are_hashed_within_the_workload_limit(length):
    base = ("team-a-llama-2-7b-chat-support-bot-" * 10)[:length - 1] + "x"
    sibling = base[:-1] + "y"  # same prefix, differs only at the end (lost by truncation)
    for stage in (BASELINE, trial(4), trial(512)):
        first, again = render.stage_job_name(base, stage), render.stage_job_name(base, stage)
        other = render.stage_job_name(sibling, stage)
        assert first == again
        assert len(first) <= render.MAX_WORKLOAD_NAME and len(other) <= render.MAX_WORKLOAD_NAME
        assert first != other
        assert DNS_1035.match(first), first
        suffix = "baseline" if stage.kind == jobconfig.STAGE_BASELINE else f"sweep-r{stage.rank}"
        assert first.endswith("-" + suffix)
        assert "--" not in first
    names = {render.stage_job_name(base, s) for s in (BASELINE, trial(4), trial(8), trial(512))}
    assert len(names) == 4


def test_hashed_name_cut_at_a_dash_has_no_double_dash():
    cut = render.MAX_WORKLOAD_NAME - len("baseline") - 8 - 2  # what is kept before the hash and the suffix
    name = "x" * (cut - 1) + "-" + "y" * 30  # the cut for a 'baseline' suffix falls on the dash
    out = render.stage_job_name(name, BASELINE)
    assert len(out) <= render.MAX_WORKLOAD_NAME and "--" not in out and out.startswith("x" * (cut - 1) + "-")


def test_stage_job_names_never_collide_with_another_jobs_training_job():
    # "llama" (with a baseline and a sweep) next to a FineTuneJob named "llama-baseline" or "llama-sweep-r4"
    # would share PyTorchJob and ConfigMap names: the API refuses such job names.
    for name in ("llama-baseline", "llama-sweep-r4"):
        job = finetunejob()
        job["metadata"]["name"] = name
        errors = [str(e) for e in validate(job).errors]
        assert any("must not end in -baseline or -sweep-r<number>" in e for e in errors), errors
    for name in ("llama-baseline2", "baseline", "llama-sweep-rx"):
        job = finetunejob()
        job["metadata"]["name"] = name
        assert validate(job).ok, name


def test_rendered_trial_children_carry_stage_labels_and_mount_their_own_config():
    spec = sweep_spec()
    job = {**finetunejob(), "spec": stages.trial_spec(spec, 8)}
    config_map, pytorchjob = render_children(job, render.RenderSettings(), stages.trial_stage(spec, 8))
    assert config_map["metadata"]["name"] == "llama-lora-sweep-r8-config"
    assert pytorchjob["metadata"]["name"] == "llama-lora-sweep-r8"
    labels = pytorchjob["metadata"]["labels"]
    assert labels[render.LABEL_STAGE] == "trial" and labels[render.LABEL_RANK] == "8"
    assert labels[render.LABEL_JOB] == "llama-lora"
    template = pytorchjob["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    volume = next(v for v in template["spec"]["volumes"] if v["name"] == "job-config")
    assert volume["configMap"]["name"] == "llama-lora-sweep-r8-config"
    config = json.loads(config_map["data"][jobconfig.CONFIG_FILE])
    assert config["stage"]["kind"] == "trial" and config["stage"]["rank"] == 8
    assert config["spec"]["method"]["lora"]["rank"] == 8
    assert config["storage"]["result_uri"] == ROOT + "sweep/rank-8/result.json"


# --- job config and storage layout -------------------------------------------------------------------


def test_stage_prefix():
    assert jobconfig.stage_prefix(ROOT, BASELINE) == ROOT + "baseline/"
    assert jobconfig.stage_prefix(ROOT, trial(8)) == ROOT + "sweep/rank-8/"
    assert jobconfig.stage_prefix(ROOT, jobconfig.Stage()) == ROOT
    assert jobconfig.stage_prefix(ROOT.rstrip("/"), trial(4)) == ROOT + "sweep/rank-4/"


def test_job_config_of_the_baseline_stage():
    config = jobconfig.job_config("team-a", "llama-lora", "0b7f-uid", defaulted(), BASELINE)
    assert config.stage == BASELINE
    assert config.storage.job_prefix == ROOT + "baseline/"
    assert config.storage.result_uri == ROOT + "baseline/result.json"
    assert config.storage.checkpoints_prefix == ROOT + "baseline/checkpoints/"
    assert storage_layout.progress_uri(config.storage.job_prefix) == ROOT + "baseline/progress.json"
    assert config.storage.manifest_uri == ROOT + "manifest.json"  # at the job root, not the stage's


def test_job_config_of_a_trial_stage():
    stage = jobconfig.Stage(kind=jobconfig.STAGE_TRIAL, rank=16, holdout_fraction=0.1, max_steps=20)
    config = jobconfig.job_config("team-a", "llama-lora", "0b7f-uid", defaulted(), stage)
    assert config.storage.job_prefix == ROOT + "sweep/rank-16/"
    assert config.storage.result_uri == ROOT + "sweep/rank-16/result.json"
    assert config.storage.checkpoints_prefix == ROOT + "sweep/rank-16/checkpoints/"
    assert storage_layout.progress_uri(config.storage.job_prefix) == ROOT + "sweep/rank-16/progress.json"
    assert config.storage.manifest_uri == ROOT + "manifest.json"


def test_job_config_of_training_has_no_result():
    config = jobconfig.job_config("team-a", "llama-lora", "0b7f-uid", defaulted())
    assert config.stage == jobconfig.Stage(kind=jobconfig.STAGE_TRAIN)
    assert config.storage.job_prefix == ROOT
    assert config.storage.result_uri == ""
    assert config.storage.manifest_uri == ROOT + "manifest.json"


@pytest.mark.parametrize("stage", [
    jobconfig.Stage(kind=jobconfig.STAGE_TRIAL, rank=8, holdout_fraction=0.15, max_steps=20),
    jobconfig.Stage(kind=jobconfig.STAGE_BASELINE),
    jobconfig.Stage(kind=jobconfig.STAGE_TRAIN, baseline_metrics={"eval_loss": 2.5, "perplexity": 12.2}),
])
def test_job_config_json_round_trip_with_a_stage(stage):
    config = jobconfig.job_config("team-a", "llama-lora", "0b7f-uid", defaulted(), stage)
    text = config.to_json()
    assert json.loads(text)["stage"]["kind"] == stage.kind
    again = jobconfig.JobConfig.from_json(text)
    assert again == config
    assert again.stage == stage
    assert again.to_json() == text


def test_job_config_without_a_stage_reads_as_training():
    raw = json.loads(jobconfig.job_config("team-a", "llama-lora", "0b7f-uid", defaulted()).to_json())
    raw.pop("stage")
    assert jobconfig.JobConfig.from_json(json.dumps(raw)).stage == jobconfig.Stage()
    raw["api"] = "kubetune.io/jobconfig/v0"
    with pytest.raises(ValueError, match="jobconfig/v0"):
        jobconfig.JobConfig.from_json(json.dumps(raw))


# --- validation of spec.baseline and spec.rankSweep --------------------------------------------------


def test_rank_sweep_and_baseline_defaults():
    spec = defaulted(rankSweep={}, baseline={"target": {"metric": "eval_loss", "value": 1.0}})
    assert spec["rankSweep"] == {"ranks": [4, 8, 16, 32], "holdoutFraction": 0.1, "epochs": 1,
                                 "metric": "eval_loss", "parallelism": 1, "alpha": "Proportional",
                                 "tieTolerance": 0.0}
    assert spec["baseline"] == {"target": {"metric": "eval_loss", "value": 1.0}, "enabled": True,
                                "forceTraining": False}
    plain = defaulted()
    assert plain["baseline"] == {"enabled": True, "forceTraining": False}
    assert "rankSweep" not in plain


def test_rank_sweep_values_are_kept():
    spec = defaulted(rankSweep={"ranks": [2, 64], "holdoutFraction": 0.25, "epochs": 0.5, "maxSteps": 30,
                                "parallelism": 2, "alpha": "Fixed", "tieTolerance": 0.01})
    assert spec["rankSweep"] == {"ranks": [2, 64], "holdoutFraction": 0.25, "epochs": 0.5, "maxSteps": 30,
                                 "metric": "eval_loss", "parallelism": 2, "alpha": "Fixed", "tieTolerance": 0.01}


def test_classification_metrics_are_accepted_for_classification():
    result = validate(finetunejob(task="SequenceClassification",
                                  dataset={"uri": "s3://data/train.jsonl", "format": "text-label"},
                                  rankSweep={"metric": "macro_f1"},
                                  baseline={"target": {"metric": "accuracy", "value": 0.9}}))
    assert result.ok, [str(e) for e in result.errors]


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"rankSweep": {"ranks": [4, 4]}}, "spec.rankSweep.ranks[1]: Duplicate value: 4"),
    ({"rankSweep": {"ranks": [4]}}, "spec.rankSweep.ranks: [4] is too short"),
    ({"rankSweep": {"ranks": [4, 513]}}, "spec.rankSweep.ranks[1]: 513 is greater than the maximum of 512"),
    ({"rankSweep": {"ranks": [0, 4]}}, "spec.rankSweep.ranks[0]: 0 is less than the minimum of 1"),
    ({"rankSweep": {"holdoutFraction": 0}}, "spec.rankSweep.holdoutFraction: 0 is less than or equal to"),
    ({"rankSweep": {"holdoutFraction": 0.6}}, "spec.rankSweep.holdoutFraction: 0.6 is greater than the maximum"),
    ({"rankSweep": {"epochs": 0}}, "spec.rankSweep.epochs: 0 is less than or equal to the minimum of 0"),
    ({"rankSweep": {"parallelism": 0}}, "spec.rankSweep.parallelism: 0 is less than the minimum of 1"),
    ({"rankSweep": {"parallelism": 17}}, "spec.rankSweep.parallelism: 17 is greater than the maximum of 16"),
    ({"rankSweep": {"alpha": "Scaled"}}, "spec.rankSweep.alpha: 'Scaled' is not one of"),
    ({"rankSweep": {"tieTolerance": -0.1}}, "spec.rankSweep.tieTolerance: -0.1 is less than the minimum of 0"),
    ({"rankSweep": {"maxSteps": 0}}, "spec.rankSweep.maxSteps: 0 is less than the minimum of 1"),
    ({"rankSweep": {"metric": "bleu"}}, "spec.rankSweep.metric: 'bleu' is not one of"),
    ({"rankSweep": {"rank": [4, 8]}}, "spec.rankSweep.rank: unknown field"),
    ({"rankSweep": {"metric": "accuracy"}},
     "spec.rankSweep.metric: rankSweep.metric accuracy and macro_f1 need task SequenceClassification"),
    ({"method": {"type": "Full"}, "rankSweep": {}},
     "spec.rankSweep: rankSweep applies only when method.type is LoRA or QLoRA"),
    ({"baseline": {"enabled": False, "target": {"metric": "eval_loss", "value": 1.0}}},
     "spec.baseline.target: baseline.target needs baseline.enabled: true"),
    ({"baseline": {"target": {"metric": "eval_loss"}}}, "spec.baseline.target.value: required field is missing"),
    ({"baseline": {"target": {"metric": "bleu", "value": 1.0}}}, "spec.baseline.target.metric: 'bleu' is not one"),
    ({"baseline": {"target": {"metric": "macro_f1", "value": 0.5}}},
     "spec.baseline.target.metric: baseline.target.metric accuracy and macro_f1 need task SequenceClassification"),
    ({"dataset": {"uri": "s3://data/train.jsonl", "format": "chat", "validationSplit": 0},
      "baseline": {"target": {"metric": "eval_loss", "value": 1.0}}},
     "spec.baseline.target: baseline.target needs validation data"),
])
def test_invalid_stage_fields_are_rejected(overrides, expected):
    errors = [str(e) for e in validate(finetunejob(**overrides)).errors]
    assert any(expected in e for e in errors), errors


def test_classification_target_value_must_be_a_fraction():
    doc = finetunejob(task="SequenceClassification", dataset={"uri": "s3://data/train.jsonl", "format": "text-label"},
                      baseline={"target": {"metric": "accuracy", "value": 1.5}})
    errors = [str(e) for e in validate(doc).errors]
    assert errors == ["spec.baseline.target.value: baseline.target.value of accuracy or macro_f1 must be between "
                      "0 and 1"]


def test_perplexity_needs_a_causal_lm():
    doc = finetunejob(task="SequenceClassification", dataset={"uri": "s3://data/train.jsonl", "format": "text-label"},
                      rankSweep={"metric": "perplexity"})
    errors = [str(e) for e in validate(doc).errors]
    assert "spec.rankSweep.metric: rankSweep.metric perplexity needs task CausalLM" in errors


def test_tie_tolerance_holds_at_its_boundary_despite_float_rounding():
    # 1.10 - 1.00 is 0.10000000000000009 in floats: still a tie at tolerance 0.1
    trials = [{"rank": 4, "state": "Succeeded", "metric": 1.10}, {"rank": 16, "state": "Succeeded", "metric": 1.00}]
    assert stages.choose_rank(trials, "eval_loss", 0.1)["rank"] == 4
    trials = [{"rank": 8, "state": "Succeeded", "metric": 0.90}, {"rank": 32, "state": "Succeeded", "metric": 0.91}]
    assert stages.choose_rank(trials, "accuracy", 0.01)["rank"] == 8
    assert stages.choose_rank(trials, "accuracy", 0.009)["rank"] == 32

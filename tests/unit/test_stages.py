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


SWEEP = jobconfig.Stage(kind=jobconfig.STAGE_SWEEP, holdout_fraction=0.1)


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


def test_sweep_spec_is_the_job_own_without_a_baseline_or_merge():
    spec = defaulted(
        training={"epochs": 3, "evalSteps": 50, "earlyStopping": {"patience": 2}},
        output={"uri": "s3://adapters/x", "mergeAdapter": True},
        baseline={"target": {"metric": "eval_loss", "value": 1.0}},
        rankSweep={"ranks": [8, 4], "maxSteps": 20, "nodes": 1, "gpusPerNode": 2},
    )
    before = copy.deepcopy(spec)
    out = stages.sweep_spec(spec)
    assert spec == before  # the input is not mutated
    assert out["training"] == spec["training"]  # the full run's settings size the budget
    assert out["rankSweep"] == spec["rankSweep"]  # the trainer reads the sweep's own settings
    assert out["baseline"] == {"enabled": False, "forceTraining": False}
    assert out["output"]["mergeAdapter"] is False and out["output"]["uri"] == "s3://adapters/x"
    assert (out["distributed"]["nodes"], out["distributed"]["gpusPerNode"]) == (1, 2)
    assert out["distributed"]["deepspeed"]["enabled"] is False and spec["distributed"]["deepspeed"]["enabled"]
    out["training"]["learningRate"] = 1.0
    assert spec == before  # nested objects are not shared


def test_sweep_stage_carries_the_holdout():
    assert stages.sweep_stage(sweep_spec(holdoutFraction=0.2)) == jobconfig.Stage(
        kind=jobconfig.STAGE_SWEEP, holdout_fraction=0.2)


def test_training_spec_applies_the_chosen_rank_and_the_swept_learning_rate():
    spec = sweep_spec()
    before = copy.deepcopy(spec)
    out = stages.training_spec(spec, 8, 1e-3)
    assert out["method"]["lora"]["rank"] == 8 and out["method"]["lora"]["alpha"] == 16
    assert out["training"] == spec["training"]  # learning rates were not swept: the spec's own
    assert spec == before
    assert stages.training_spec(spec, None) is spec
    plain = defaulted()
    assert stages.training_spec(plain, 8) is plain  # no sweep: the spec's own rank
    fixed = stages.training_spec(sweep_spec(alpha="Fixed"), 4)
    assert fixed["method"]["lora"]["rank"] == 4 and fixed["method"]["lora"]["alpha"] == 32
    swept = stages.training_spec(sweep_spec(learningRates=[1e-3, 4e-3]), 4, 4e-3)
    assert swept["training"]["learningRate"] == 4e-3


# --- sweep: its table --------------------------------------------------------------------------------


def test_trial_rows_keep_what_status_can_store():
    rows = [{"name": "r8-lr0.001", "rank": 8, "alpha": 16, "learningRate": 1e-3, "state": "Stopped", "metric": 1.2,
             "steps": 10, "rung": 0, "seconds": 3.5, "message": "halved out", "metrics": {"eval_loss": 1.2}},
            {"rank": 4, "state": "Diverged", "metric": float("nan"), "learningRate": float("inf"), "steps": -1},
            {"rank": 4, "state": "Queued"}, {"state": "Succeeded"}, {"rank": 0, "state": "Succeeded"},
            {"rank": True, "state": "Succeeded"}, "not a row", {"rank": 4, "state": "AtChance", "message": "x" * 5000}]
    assert stages.trial_rows(rows) == [
        {"name": "r8-lr0.001", "rank": 8, "alpha": 16, "learningRate": 1e-3, "state": "Stopped", "metric": 1.2,
         "steps": 10, "rung": 0, "seconds": 3.5, "message": "halved out"},
        {"rank": 4, "state": "Diverged"},
        {"rank": 4, "state": "AtChance", "message": "x" * 1024}]
    assert stages.trial_rows(None) == [] and stages.trial_rows({"rank": 4}) == []
    assert len(stages.trial_rows([{"rank": 4, "state": "Stopped"}] * 100)) == stages.MAX_TRIAL_ROWS


def test_sweep_summary_counts_states():
    rows = [t(4, "Stopped"), t(8, "Stopped"), t(16, "Diverged"), t(32, "AtChance"), t(16, "Succeeded")]
    assert stages.sweep_summary(rows, None) == "5 configs, 2 halved, 1 diverged, 1 at chance"
    best = {"rank": 16, "learningRate": 2e-4}
    assert stages.sweep_summary(rows, best) == "5 configs, 2 halved, 1 diverged, 1 at chance, best r16 lr0.0002"
    assert stages.sweep_summary([], None) == "0 configs"


def test_table_rows_in_order_tried_with_the_choice_and_the_retry_marked():
    rows = [t(4, "Stopped", 1.3, name="r4-lr0.001", alpha=8, learningRate=1e-3, rung=0, steps=5,
              message="halved out after rung 0 (5 steps)"),
            t(8, "Diverged", None, name="r8-lr0.001", alpha=16, learningRate=1e-3, rung=0, steps=3,
              message="holdout loss is nan"),
            t(8, "Succeeded", 1.1, name="r8-lr0.00025-retry", alpha=16, learningRate=2.5e-4, rung=1, steps=10,
              retryOf="r8-lr0.001")]
    table = stages.table(rows, "eval_loss", rows[2]).splitlines()
    assert table[0].split() == ["rank", "alpha", "lr", "state", "rung", "steps", "eval_loss", "note"]
    assert table[1].split()[:7] == ["4", "8", "0.001", "Stopped", "0", "5", "1.3000"]
    assert table[2].split()[:7] == ["8", "16", "0.001", "Diverged", "0", "3", "-"]
    assert table[2].endswith("holdout loss is nan")
    assert table[3].endswith("retry of r8-lr0.001; <- chosen")


# --- names of the stage jobs -------------------------------------------------------------------------


def test_stage_job_names_are_deterministic_and_suffixed():
    assert render.stage_job_name("llama-lora", BASELINE) == "llama-lora-baseline"
    assert render.stage_job_name("llama-lora", SWEEP) == "llama-lora-rank-sweep"
    assert render.stage_job_name("llama-lora", jobconfig.Stage()) == "llama-lora"
    assert render.stage_config_map_name("llama-lora", BASELINE) == "llama-lora-baseline-config"
    assert render.stage_config_map_name("llama-lora", SWEEP) == "llama-lora-rank-sweep-config"
    assert render.stage_config_map_name("llama-lora", jobconfig.Stage()) == "llama-lora-config"
    # the sweep's name depends on nothing but its kind (not the holdout)
    other = jobconfig.Stage(kind=jobconfig.STAGE_SWEEP, holdout_fraction=0.3)
    assert render.stage_job_name("llama-lora", other) == "llama-lora-rank-sweep"


def test_stage_names_leave_room_for_the_training_operators_replica_services():
    # the training operator names a Service `<job>-worker-<index>` per replica (nodes <= 1024): a DNS-1035 label
    name = "a" * 44 + "z"
    assert len(name) == 45
    job_name = render.stage_job_name(name, BASELINE)
    assert len(job_name) <= render.MAX_WORKLOAD_NAME == 51 and job_name.endswith("-baseline")
    assert DNS_1035.match(f"{job_name}-worker-1022") and len(f"{job_name}-worker-1022") <= 63
    swept = render.stage_job_name(name, SWEEP)  # 56 characters: hashed within the limit
    assert len(swept) <= render.MAX_WORKLOAD_NAME and swept.endswith("-rank-sweep")


@pytest.mark.parametrize("length", [53, 60, 63, 100, 253])
def test_long_job_names_are_hashed_within_the_workload_limit(length):
    base = ("team-a-llama-2-7b-chat-support-bot-" * 10)[:length - 1] + "x"
    sibling = base[:-1] + "y"  # same prefix, differs only at the end (lost by truncation)
    for stage in (BASELINE, SWEEP):
        first, again = render.stage_job_name(base, stage), render.stage_job_name(base, stage)
        other = render.stage_job_name(sibling, stage)
        assert first == again
        assert len(first) <= render.MAX_WORKLOAD_NAME and len(other) <= render.MAX_WORKLOAD_NAME
        assert first != other
        assert DNS_1035.match(first), first
        assert first.endswith("-baseline" if stage == BASELINE else "-rank-sweep")
        assert "--" not in first
    assert render.stage_job_name(base, BASELINE) != render.stage_job_name(base, SWEEP)


def test_hashed_name_cut_at_a_dash_has_no_double_dash():
    cut = render.MAX_WORKLOAD_NAME - len("baseline") - 8 - 2  # what is kept before the hash and the suffix
    name = "x" * (cut - 1) + "-" + "y" * 30  # the cut for a 'baseline' suffix falls on the dash
    out = render.stage_job_name(name, BASELINE)
    assert len(out) <= render.MAX_WORKLOAD_NAME and "--" not in out and out.startswith("x" * (cut - 1) + "-")


def test_stage_job_names_never_collide_with_another_jobs_training_job():
    # "llama" (with a baseline and a sweep) next to a FineTuneJob named "llama-baseline" or "llama-rank-sweep"
    # would share PyTorchJob and ConfigMap names: the API refuses such job names.
    for name in ("llama-baseline", "llama-rank-sweep"):
        job = finetunejob()
        job["metadata"]["name"] = name
        errors = [str(e) for e in validate(job).errors]
        assert any("must not end in -baseline or -rank-sweep" in e for e in errors), errors
    for name in ("llama-baseline2", "baseline", "llama-sweep", "llama-sweep-r4", "rank-sweep"):
        job = finetunejob()
        job["metadata"]["name"] = name
        assert validate(job).ok, name


def test_rendered_sweep_children_carry_stage_labels_and_mount_their_own_config():
    spec = sweep_spec()
    job = {**finetunejob(), "spec": stages.sweep_spec(spec)}
    config_map, pytorchjob = render_children(job, render.RenderSettings(), stages.sweep_stage(spec))
    assert config_map["metadata"]["name"] == "llama-lora-rank-sweep-config"
    assert pytorchjob["metadata"]["name"] == "llama-lora-rank-sweep"
    labels = pytorchjob["metadata"]["labels"]
    assert labels[render.LABEL_STAGE] == "sweep" and labels[render.LABEL_JOB] == "llama-lora"
    template = pytorchjob["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    volume = next(v for v in template["spec"]["volumes"] if v["name"] == "job-config")
    assert volume["configMap"]["name"] == "llama-lora-rank-sweep-config"
    config = json.loads(config_map["data"][jobconfig.CONFIG_FILE])
    assert config["stage"]["kind"] == "sweep" and config["stage"]["holdout_fraction"] == 0.1
    assert config["spec"]["rankSweep"]["ranks"] == [4, 8, 16, 32]
    assert config["storage"]["result_uri"] == ROOT + "sweep/result.json"


# --- job config and storage layout -------------------------------------------------------------------


def test_stage_prefix():
    assert jobconfig.stage_prefix(ROOT, BASELINE) == ROOT + "baseline/"
    assert jobconfig.stage_prefix(ROOT, SWEEP) == ROOT + "sweep/"
    assert jobconfig.stage_prefix(ROOT, jobconfig.Stage()) == ROOT
    assert jobconfig.stage_prefix(ROOT.rstrip("/"), SWEEP) == ROOT + "sweep/"


def test_job_config_of_the_baseline_stage():
    config = jobconfig.job_config("team-a", "llama-lora", "0b7f-uid", defaulted(), BASELINE)
    assert config.stage == BASELINE
    assert config.storage.job_prefix == ROOT + "baseline/"
    assert config.storage.result_uri == ROOT + "baseline/result.json"
    assert config.storage.checkpoints_prefix == ROOT + "baseline/checkpoints/"
    assert storage_layout.progress_uri(config.storage.job_prefix) == ROOT + "baseline/progress.json"
    assert config.storage.manifest_uri == ROOT + "manifest.json"  # at the job root, not the stage's


def test_job_config_of_the_sweep_stage():
    config = jobconfig.job_config("team-a", "llama-lora", "0b7f-uid", defaulted(), SWEEP)
    assert config.storage.job_prefix == ROOT + "sweep/"
    assert config.storage.result_uri == ROOT + "sweep/result.json"
    assert config.storage.checkpoints_prefix == ROOT + "sweep/checkpoints/"
    assert storage_layout.progress_uri(config.storage.job_prefix) == ROOT + "sweep/progress.json"
    assert config.storage.manifest_uri == ROOT + "manifest.json"


def test_job_config_of_training_has_no_result():
    config = jobconfig.job_config("team-a", "llama-lora", "0b7f-uid", defaulted())
    assert config.stage == jobconfig.Stage(kind=jobconfig.STAGE_TRAIN)
    assert config.storage.job_prefix == ROOT
    assert config.storage.result_uri == ""
    assert config.storage.manifest_uri == ROOT + "manifest.json"


@pytest.mark.parametrize("stage", [
    jobconfig.Stage(kind=jobconfig.STAGE_SWEEP, holdout_fraction=0.15),
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
    assert spec["rankSweep"] == {"ranks": [4, 8, 16, 32], "budget": 0.3, "holdoutFraction": 0.1, "epochs": 1,
                                 "metric": "eval_loss", "parallelism": 1, "alpha": "Proportional",
                                 "tieTolerance": 0.0}
    assert spec["baseline"] == {"target": {"metric": "eval_loss", "value": 1.0}, "enabled": True,
                                "forceTraining": False}
    plain = defaulted()
    assert plain["baseline"] == {"enabled": True, "forceTraining": False}
    assert "rankSweep" not in plain


def test_rank_sweep_values_are_kept():
    # epochs and parallelism no longer act but stay accepted: GitOps repositories carry them
    spec = defaulted(rankSweep={"ranks": [2, 64], "holdoutFraction": 0.25, "epochs": 0.5, "maxSteps": 30,
                                "parallelism": 2, "alpha": "Fixed", "tieTolerance": 0.01, "budget": 0.5,
                                "learningRates": [1e-3, 3e-3]})
    assert spec["rankSweep"] == {"ranks": [2, 64], "holdoutFraction": 0.25, "epochs": 0.5, "maxSteps": 30,
                                 "metric": "eval_loss", "parallelism": 2, "alpha": "Fixed", "tieTolerance": 0.01,
                                 "budget": 0.5, "learningRates": [1e-3, 3e-3]}


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
    ({"rankSweep": {"budget": 0}}, "spec.rankSweep.budget: 0 is less than or equal to the minimum of 0"),
    ({"rankSweep": {"budget": 1.5}}, "spec.rankSweep.budget: 1.5 is greater than the maximum of 1"),
    ({"rankSweep": {"learningRates": [1e-3, 1e-3]}}, "spec.rankSweep.learningRates[1]: Duplicate value"),
    ({"rankSweep": {"learningRates": []}}, "spec.rankSweep.learningRates: [] should be non-empty"),
    ({"rankSweep": {"ranks": list(range(1, 10)), "learningRates": [1e-4, 1e-3, 1e-2, 1e-1]}},
     "spec.rankSweep.learningRates: rankSweep: at most 32 configs (ranks x learningRates)"),
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

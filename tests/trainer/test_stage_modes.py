"""The trainer's baseline and sweep stages (what a `<job>-baseline` or `<job>-sweep` PyTorchJob
runs): they write result.json under their own prefix and never publish an adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.api import jobconfig, storage_layout
from kubetune_operator.reconcile import stages
from kubetune_trainer.modeling import BadInput
from kubetune_trainer.train import Schedule

from .conftest import job_spec, lm_corpus, make_config, run_in_process, write_jsonl


def _read(uri: str) -> dict | None:
    path = Path(storage_layout.split_uri(uri)[2])
    return json.loads(path.read_text()) if path.exists() else None


def test_schedule_cap_bounds_steps_warmup_and_evaluation():
    training = {"perDeviceBatchSize": 4, "epochs": 3, "scheduler": {"warmupRatio": 0.1}, "checkpointSteps": 500}
    full = Schedule.from_spec(training, world_size=1, train_size=400)
    capped = Schedule.from_spec(training, world_size=1, train_size=400, cap=20)
    assert full.total_steps == 300 and capped.total_steps == 20
    assert capped.warmup_steps == 2 and capped.eval_every == 20


def test_baseline_stage_evaluates_the_base_model_and_stops(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "train.jsonl", lm_corpus(40))
    config = make_config(job_spec(tiny_llama, data, tmp_path / "out"), name="base",
                         stage=jobconfig.Stage(kind=jobconfig.STAGE_BASELINE))
    result = run_in_process(config, tmp_path / "work")
    assert config.storage.result_uri.endswith("/baseline/result.json")
    written = _read(config.storage.result_uri)
    assert written == result and written["kind"] == "baseline" and written["api"] == jobconfig.STAGE_RESULT_API
    assert written["examples"]["validation"] == 8  # validationSplit 0.2 of 40
    assert written["metrics"]["eval_loss"] > 0 and written["metrics"]["perplexity"] > 1
    assert _read(config.storage.manifest_uri) is None  # nothing trained, nothing published
    assert _read(storage_layout.progress_uri(config.storage.job_prefix))["stage"] == "done"


def test_baseline_stage_without_validation_data_is_bad_input(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "train.jsonl", lm_corpus(16))
    spec = job_spec(tiny_llama, data, tmp_path / "out", dataset__validationSplit=0.0)
    config = make_config(spec, name="noval", stage=jobconfig.Stage(kind=jobconfig.STAGE_BASELINE))
    with pytest.raises(BadInput, match="validation split is empty"):
        run_in_process(config, tmp_path / "work")


def test_sweep_halves_the_configs_on_a_holdout_within_the_budget(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "train.jsonl", lm_corpus(60))
    spec = make_config(job_spec(tiny_llama, data, tmp_path / "out", training={
        "epochs": 4, "learningRate": 0.01, "perDeviceBatchSize": 4, "maxSeqLength": 64, "precision": "FP32",
        "gradientCheckpointing": False, "checkpointSteps": 1000}), name="sweep").spec
    spec["rankSweep"] = {"ranks": [2, 8], "learningRates": [0.01, 0.03], "holdoutFraction": 0.25, "budget": 0.5,
                         "metric": "eval_loss", "alpha": "Proportional", "tieTolerance": 0.0}
    config = jobconfig.job_config("test", "sweep", "uid-sweep", stages.sweep_spec(spec), stages.sweep_stage(spec))
    result = run_in_process(config, tmp_path / "work")
    assert config.storage.result_uri.endswith("/sweep/result.json")
    written = _read(config.storage.result_uri)
    assert written == result and written["kind"] == "sweep"
    # 48 training lines after the validation split; a quarter of them is the holdout
    assert written["examples"] == {"train": 36, "holdout": 12}
    # the full run: 4 epochs of 48 lines at batch 4 = 48 steps; half of it is the budget. 4 configs: rung 0
    # gives each s0, rung 1 gives the best two s0 more: 6 units plus one reserved retry -> s0 = 24 // 7 = 3
    assert (written["fullRunSteps"], written["budgetSteps"], written["firstRungSteps"]) == (48, 24, 3)
    assert written["usedSteps"] <= written["budgetSteps"]
    rows = written["trials"]
    assert {(r["rank"], r["learningRate"]) for r in rows if not r.get("retryOf")} == {
        (2, 0.01), (2, 0.03), (8, 0.01), (8, 0.03)}
    assert {r["alpha"] for r in rows if r["rank"] == 8} == {32}  # alpha/rank 16/4 kept
    finalists = [r for r in rows if r["state"] == "Succeeded"]
    assert len(finalists) == 1 and finalists[0]["steps"] == 6 and finalists[0]["rung"] == 1
    halved = [r for r in rows if r["state"] == "Stopped"]
    assert {r["steps"] for r in halved} <= {3, 6} and all("halved out" in r["message"] for r in halved)
    # the finalist beat the config halved at the same rung, at the same number of steps
    same_rung = [r for r in halved if r["rung"] == 1]
    assert all(finalists[0]["metric"] <= r["metric"] for r in same_rung)
    assert written["best"]["name"] == finalists[0]["name"]
    assert written["baseMetrics"]["eval_loss"] > finalists[0]["metric"]
    assert _read(config.storage.manifest_uri) is None  # the sweep never publishes an adapter
    assert _read(storage_layout.progress_uri(config.storage.job_prefix))["sweep"]["trials"]

"""The trainer's baseline and trial stages (what a `<job>-baseline` or `<job>-sweep-r<rank>` PyTorchJob
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


def test_trial_trains_on_the_training_split_minus_a_holdout_and_scores_it(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "train.jsonl", lm_corpus(60))
    spec = make_config(job_spec(tiny_llama, data, tmp_path / "out", training={
        "epochs": 1, "learningRate": 0.01, "perDeviceBatchSize": 4, "maxSeqLength": 64, "precision": "FP32",
        "gradientCheckpointing": False, "checkpointSteps": 1000}), name="trial").spec
    spec["rankSweep"] = {"ranks": [2, 8], "holdoutFraction": 0.25, "epochs": 1, "maxSteps": 5, "metric": "eval_loss",
                         "parallelism": 1, "alpha": "Proportional", "tieTolerance": 0.0}
    stage = stages.trial_stage(spec, 8)
    config = jobconfig.job_config("test", "trial", "uid-trial", stages.trial_spec(spec, 8), stage)
    result = run_in_process(config, tmp_path / "work")
    assert config.storage.result_uri.endswith("/sweep/rank-8/result.json")
    written = _read(config.storage.result_uri)
    assert written["kind"] == "trial" and written["rank"] == 8 and written["alpha"] == 32  # alpha/rank 16/4 kept
    # 48 training lines after the validation split; a quarter of them is the holdout
    assert written["examples"] == {"train": 36, "holdout": 12}
    assert written["steps"] == 5  # rankSweep.maxSteps caps the epoch
    assert written["metrics"]["eval_loss"] == result["metrics"]["eval_loss"] > 0
    assert _read(config.storage.manifest_uri) is None  # trials never publish adapters

"""Under DeepSpeed ZeRO-3 (and ZeRO-2 for the monitors) with two processes (gloo, CPU), in the rendered
PyTorchJob's pod run verbatim by the training-operator stand-in (`run_pods`): the monitors report what a
DDP run reports, early stopping publishes the best evaluation's weights (also after a resume), and a NaN
loss fails the job with the step and the reason."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kubetune.api import jobconfig, storage_layout

from .conftest import WORDS, adapter_dir, job_spec, lm_corpus, make_config, manifest_of, run_pods, write_jsonl

TWO_PROCESSES = {"nodes": 1, "gpusPerNode": 0, "processesPerNode": 2}
ZERO3 = {"enabled": True, "zeroStage": 3}



def evaluations(manifest: dict) -> list[dict]:
    return [h for h in manifest["training"]["history"] if "eval_loss" in h]


def _monitored_run(tiny_llama, tmp_path: Path, name: str, deepspeed: dict) -> list[dict]:
    """Four steps of two micro-batches each (gradient accumulation), monitored at steps 2 and 4."""
    data = write_jsonl(tmp_path / "train.jsonl", lm_corpus(64))
    config = make_config(job_spec(tiny_llama, data, tmp_path / name, training__maxSteps=4,
                                  training__perDeviceBatchSize=4, training__effectiveBatchSize=16,
                                  training__evalSteps=2,
                                  distributed={**TWO_PROCESSES, "deepspeed": deepspeed}), name=name)
    result = run_pods(config, tmp_path / name)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    manifest = manifest_of(config)
    assert manifest["training"]["schedule"]["grad_accum"] == 2
    return evaluations(manifest)


@pytest.fixture(scope="module")
def ddp_monitors(tiny_llama, tmp_path_factory) -> list[dict]:
    return _monitored_run(tiny_llama, tmp_path_factory.mktemp("ddp"), "ddp", {"enabled": False})


@pytest.mark.parametrize("stage", [3, 2])
def test_zero_monitors_match_a_ddp_run(stage, ddp_monitors, tiny_llama, tmp_path):
    """Per-layer gradient norms (from the reduced gradients accumulated over two micro-batches, before
    clipping) and LoRA-to-base ratios (from the gathered weights under ZeRO-3) equal DDP's at the same
    seed and data."""
    zero = _monitored_run(tiny_llama, tmp_path, f"zero{stage}", {"enabled": True, "zeroStage": stage})
    assert [e["step"] for e in zero] == [2, 4]
    for ddp, monitored in zip(ddp_monitors, zero, strict=True):
        for key in ("layerGradNormMax", "layerGradNormMean", "loraToBaseMax", "loraToBaseMean"):
            assert monitored[key] > 0
            assert monitored[key] == pytest.approx(ddp[key], rel=1e-3), key
        assert monitored["layerGradNormTopLayer"] == ddp["layerGradNormTopLayer"]
        assert monitored["loraToBaseTopLayer"] == ddp["loraToBaseTopLayer"]


def _best_checkpoint_weights(config: jobconfig.JobConfig, step: int) -> dict[str, torch.Tensor]:
    """The fp32 weights of the checkpoint at `step`, consolidated from every rank's ZeRO-3 partition."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    prefix = storage_layout.checkpoint_prefix(config.storage.job_prefix, step)
    directory = storage_layout.split_uri(prefix)[2]
    return get_fp32_state_dict_from_zero_checkpoint(directory, tag="ds", exclude_frozen_parameters=True)


def test_zero3_early_stopping_publishes_the_best_weights_also_after_a_resume(tiny_llama, tmp_path):
    """Full fine-tuning on random sequences memorises them and the validation loss rises. The published
    weights are the best evaluation's, equal to that step's checkpoint; a second launch resumes from the
    last checkpoint (after the best step) and still publishes them: each rank's share of the best weights
    is in the checkpoint."""
    rng = random.Random(3)
    rows = [{"prompt": " ".join(rng.choices(WORDS, k=3)), "completion": " ".join(rng.choices(WORDS, k=6))}
            for _ in range(24)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    spec = job_spec(tiny_llama, data, tmp_path / "out", method={"type": "Full"}, training__learningRate=0.01,
                    training__maxSteps=60, training__evalSteps=5, training__checkpointSteps=5,
                    training__perDeviceBatchSize=4, dataset__validationSplit=0.25,
                    training__scheduler={"type": "constant", "warmupRatio": 0.0},
                    training__earlyStopping={"patience": 2}, distributed={**TWO_PROCESSES, "deepspeed": ZERO3})
    config = make_config(spec, name="best")
    first = run_pods(config, tmp_path / "first")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    manifest = manifest_of(config)
    evals = evaluations(manifest)
    best = min(evals, key=lambda h: h["eval_loss"])
    assert evals[-1]["eval_loss"] > best["eval_loss"]  # it did get worse
    assert manifest["training"]["bestStep"] == best["step"] != evals[-1]["step"]
    assert f"restored the weights of step {best['step']}" in manifest["training"]["stopReason"]
    assert manifest["metrics"]["eval_loss"] == pytest.approx(best["eval_loss"], abs=1e-5)

    published = {}
    for path in adapter_dir(config, manifest).glob("*.safetensors"):
        published |= load_file(str(path))
    at_best = _best_checkpoint_weights(config, best["step"])
    common = sorted(set(published) & set(at_best))
    assert len(common) >= len(at_best) // 2, (sorted(published)[:5], sorted(at_best)[:5])
    for key in common:
        torch.testing.assert_close(published[key].float(), at_best[key].float(), rtol=0, atol=1e-6)

    second = run_pods(config, tmp_path / "second")  # the same job, new pods: resumes from the checkpoint
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from checkpoint" in second.stderr
    again = manifest_of(config)
    assert again["training"]["bestStep"] == best["step"]
    assert f"restored the weights of step {best['step']}" in again["training"]["stopReason"]
    assert again["metrics"]["eval_loss"] == pytest.approx(best["eval_loss"], abs=1e-5)


def _model_with_a_nan_embedding(directory: Path, word: str) -> Path:
    """A tiny Llama whose embedding row for `word` is NaN, as a corrupted checkpoint can be: every batch
    without the word trains normally, the first one with it has a NaN loss."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from kubetune_testing.tiny import make_tiny_llama

    texts = [f"{r['prompt']} {r['completion']}" for r in lm_corpus()] + ["system user assistant", word]
    make_tiny_llama(directory, texts)
    token = AutoTokenizer.from_pretrained(directory).convert_tokens_to_ids(word)
    weights_file = directory / "model.safetensors"
    weights = load_file(str(weights_file))
    weights["model.embed_tokens.weight"][token] = float("nan")
    save_file(weights, str(weights_file), metadata={"format": "pt"})
    return directory


def test_a_nan_loss_under_zero3_fails_the_job_with_the_step_and_the_reason(tmp_path):
    model = _model_with_a_nan_embedding(tmp_path / "model", "zulu")
    rows = lm_corpus(40)
    # The word replaces the row's last one, so the row keeps its length and its place among the
    # length-grouped batches (lengthened, its batch moved to the first step of this seed).
    completion = rows[17]["completion"].rsplit(" ", 1)[0]
    rows[17] = {"prompt": rows[17]["prompt"], "completion": f"{completion} zulu"}
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    validation = write_jsonl(tmp_path / "validation.jsonl", lm_corpus(8, seed=1))
    config = make_config(job_spec(model, data, tmp_path / "out", training__maxSteps=30,
                                  training__perDeviceBatchSize=2, training__evalSteps=30,
                                  dataset__validationUri=f"file://{validation}",
                                  distributed={**TWO_PROCESSES, "deepspeed": ZERO3}), name="nan")
    result = run_pods(config, tmp_path / "run")
    assert result.returncode == jobconfig.EXIT_FAILED, result.stdout[-3000:] + result.stderr[-3000:]
    progress = json.loads(Path(storage_layout.split_uri(
        storage_layout.progress_uri(config.storage.job_prefix))[2]).read_text())
    failure = progress["failure"]
    assert progress["stage"] == "failed" and failure["reason"] == "NonFiniteLoss", failure
    step = int(re.search(r"loss became nan at step (\d+);", failure["message"]).group(1))
    assert 1 < step <= 30  # mid-run: not the smoke step, and before a NaN reached the weights
    assert manifest_of(config) is None

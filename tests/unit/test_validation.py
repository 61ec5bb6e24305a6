"""Client-side validation: structural errors with field paths, unknown fields, semantic checks."""

from __future__ import annotations

import pytest

from kubetune.api.validation import validate
from kubetune_testing.factories import finetunejob, set_path


def errors_of(doc) -> list[str]:
    return [str(e) for e in validate(doc).errors]


@pytest.mark.parametrize(("path", "value", "expected"), [
    ("spec.method.lora", {"rank": 0}, "spec.method.lora.rank: 0 is less than the minimum of 1"),
    ("spec.method.lora", {"rank": 513}, "spec.method.lora.rank: 513 is greater than the maximum of 512"),
    ("spec.method.type", "Adapter", "spec.method.type: 'Adapter' is not one of"),
    ("spec.dataset.format", "csv", "spec.dataset.format: 'csv' is not one of"),
    ("spec.dataset.uri", "http://x/y.jsonl", "spec.dataset.uri: 'http://x/y.jsonl' does not match"),
    ("spec.output.uri", "s3://", "spec.output.uri"),
    ("spec.training.learningRate", 0, "spec.training.learningRate: 0 is less than or equal to the minimum of 0"),
    ("spec.training.precision", "bf16", "spec.training.precision: 'bf16' is not one of"),
    ("spec.distributed.deepspeed", {"zeroStage": 4}, "spec.distributed.deepspeed.zeroStage: 4 is not one of"),
    ("spec.resources", {"sharedMemory": "lots"}, "spec.resources.sharedMemory"),
    ("spec.output", None, "spec.output: required field is missing"),
    ("spec.training.learningrate", 0.1, "spec.training.learningrate: unknown field"),
    ("spec.scheduling", {"queue": "x"}, "spec.scheduling.queue: unknown field"),
])
def test_structural_errors_name_the_field(path, value, expected):
    errors = errors_of(set_path(finetunejob(), path, value))
    assert any(expected in e for e in errors), errors


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"training": {"epochs": 1, "perDeviceBatchSize": 4, "effectiveBatchSize": 100}},
     "spec.training.effectiveBatchSize: 100 is not a multiple of perDeviceBatchSize x world size = 4 x 16"),
    ({"method": {"type": "FreezeThaw"}}, "spec.distributed.deepspeed.enabled: method FreezeThaw"),
    ({"distributed": {"gpusPerNode": 0, "deepspeed": {"enabled": False}}, "training": {"epochs": 1,
                                                                                         "precision": "FP16"}},
     "spec.training.precision: FP16 with loss scaling needs GPUs"),
    ({"method": {"type": "QLoRA", "quantization": {}},
      "distributed": {"gpusPerNode": 1, "deepspeed": {"offloadParams": True}}},
     "spec.distributed.deepspeed.offloadParams: 4-bit quantized weights"),
])
def test_semantic_errors(overrides, expected):
    errors = errors_of(finetunejob(**overrides))
    assert any(expected in e for e in errors), errors


def test_checkpoint_interval_beyond_the_run_is_a_warning():
    result = validate(finetunejob(training={"maxSteps": 100}))
    assert result.ok
    assert any("checkpointSteps" in str(w) for w in result.warnings)


def test_defaults_fill_every_section():
    spec = validate(finetunejob()).defaulted["spec"]
    assert spec["task"] == "CausalLM"
    assert spec["training"]["scheduler"] == {"type": "linear"}  # warmupRatio: derived (training_defaults)
    assert spec["training"]["precision"] == "Auto"
    assert spec["distributed"]["deepspeed"]["zeroStage"] == 3
    assert spec["runPolicy"] == {"suspend": False, "backoffLimit": 3}
    assert spec["dataset"]["validationSplit"] == 0.1
    qlora = validate(finetunejob(method={"type": "QLoRA", "quantization": {}},
                                 distributed={"gpusPerNode": 1})).defaulted["spec"]["method"]
    assert qlora["quantization"] == {"bits": 4, "quantType": "nf4", "doubleQuant": True,
                                     "computeDtype": "bfloat16"}
    assert qlora["lora"]["rank"] == 16
    freeze = validate(finetunejob(method={"type": "FreezeThaw"}, distributed={"nodes": 1, "gpusPerNode": 1})
                      ).defaulted["spec"]["method"]
    assert freeze["freezeThaw"]["initialTrainableBlocks"] == 2 and "lora" not in freeze


def test_wrong_api_version_or_kind():
    assert errors_of(set_path(finetunejob(), "apiVersion", "kubetune.io/v1")) == [
        "apiVersion: must be kubetune.io/v1alpha1, got 'kubetune.io/v1'"]
    assert "kind: must be one of" in errors_of(set_path(finetunejob(), "kind", "Job"))[0]


def test_validation_does_not_modify_its_input():
    doc = finetunejob()
    before = repr(doc)
    validate(doc)
    assert repr(doc) == before


# --- AdapterDeployment: the drift retrain template is a FineTuneJob checked at admission ----------------

def _drifting(template_spec: dict) -> dict:
    from kubetune_testing.factories import adapterdeployment

    doc = adapterdeployment()
    doc["spec"]["trafficSampling"] = {"rate": 0.2, "uri": "s3://samples/support"}
    doc["spec"]["adapters"][0]["drift"] = {"retrain": {"labelledData": {"uri": "s3://labels/support/"},
                                                       "template": {"spec": template_spec}}}
    return doc


RETRAIN_SPEC = {"baseModel": {"uri": "hf://meta-llama/Llama-2-7b-hf"}, "task": "SequenceClassification",
                "training": {"epochs": 2}, "output": {"uri": "s3://adapters/support-retrains"}}


def test_a_valid_retrain_template_passes_and_gets_drift_defaults():
    result = validate(_drifting(RETRAIN_SPEC))
    assert result.ok, result.errors
    drift = result.defaulted["spec"]["adapters"][0]["drift"]
    assert drift["window"] == {"requests": 1000, "maxSeconds": 3600, "minRequests": 200}
    assert drift["guard"]["triggerWindows"] == 3 and drift["guard"]["ofWindows"] == 4
    assert drift["retrain"]["includeOriginalData"] is True


def test_retrain_template_errors_point_into_the_template():
    result = validate(_drifting({**RETRAIN_SPEC, "training": {"epochs": -1}}))
    assert not result.ok
    assert any(e.path == "spec.adapters[0].drift.retrain.template.spec.training.epochs" for e in result.errors), \
        result.errors


def test_retrain_template_may_not_set_what_the_operator_fills_in():
    result = validate(_drifting({**RETRAIN_SPEC, "dataset": {"uri": "s3://d/x.jsonl", "format": "text-label"},
                                 "evaluation": {"sets": [{"name": "a", "uri": "s3://d/a.jsonl"}]}}))
    paths = {e.path for e in result.errors}
    assert "spec.adapters[0].drift.retrain.template.spec.dataset.uri" in paths
    assert "spec.adapters[0].drift.retrain.template.spec.evaluation" in paths


def test_file_sampling_is_for_kubetune_local_only():
    doc = _drifting(RETRAIN_SPEC)
    doc["spec"]["trafficSampling"]["uri"] = "file:///tmp/samples"
    assert validate(doc, local=True).ok
    errors = validate(doc).errors
    assert [e.path for e in errors] == ["spec.trafficSampling.uri"] and "kubetune local" in errors[0].message


def test_the_operator_method_table_covers_the_api_enum_and_fills_each_settings_section():
    from kubetune.api.methods import METHODS
    from kubetune.api.v1alpha1 import finetunejob as v1alpha1_finetunejob
    from kubetune.api.validation import SETTINGS_SCHEMAS, resolve_method_defaults

    assert list(METHODS) == list(v1alpha1_finetunejob.METHODS)
    for name, facts in METHODS.items():
        resolved = resolve_method_defaults({"method": {"type": name}})["method"]
        assert set(resolved) - {"type"} == ({facts.settings} if facts.settings else set())
        assert facts.settings is None or facts.settings in SETTINGS_SCHEMAS
        assert facts.has_lora_rank == (facts.settings == "lora")

"""Two processes in the rendered pod (torchrun, gloo, CPU), with DeepSpeed ZeRO-3 and with plain
DDP, publish a real adapter whose tensors have the same names and shapes as a single-process run's."""

from __future__ import annotations

import pytest
from safetensors import safe_open

from .conftest import adapter_dir, job_spec, lm_corpus, make_config, manifest_of, run_pods, write_jsonl


def tensor_shapes(path) -> dict[str, tuple]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118


@pytest.fixture(scope="module")
def single_process_shapes(tiny_llama, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("single")
    data = write_jsonl(tmp_path / "train.jsonl", lm_corpus(64))
    single = make_config(job_spec(tiny_llama, data, tmp_path / "out", training__maxSteps=6,
                                  training__perDeviceBatchSize=4, training__evalSteps=6), name="single")
    result = run_pods(single, tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return tensor_shapes(adapter_dir(single, manifest_of(single)) / "adapter_model.safetensors")


@pytest.mark.parametrize("deepspeed", [{"enabled": True, "zeroStage": 3}, {"enabled": False}], ids=["zero3", "ddp"])
def test_two_processes_publish_the_single_process_adapter_shapes(deepspeed, single_process_shapes, tiny_llama,
                                                                 tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", lm_corpus(64))
    config = make_config(job_spec(tiny_llama, data, tmp_path / "out", training__maxSteps=6,
                                  training__perDeviceBatchSize=4, training__evalSteps=6,
                                  distributed={"nodes": 1, "gpusPerNode": 0, "processesPerNode": 2,
                                               "deepspeed": deepspeed}), name="two")
    result = run_pods(config, tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    if deepspeed["enabled"]:
        assert '"zeroInit": true' in result.stderr  # weights partitioned while loading, never whole on a rank
    manifest = manifest_of(config)
    assert manifest["training"]["schedule"]["world_size"] == 2
    shapes = tensor_shapes(adapter_dir(config, manifest) / "adapter_model.safetensors")
    assert shapes == single_process_shapes
    assert shapes and all(all(d > 0 for d in shape) for shape in shapes.values())
    assert manifest["metrics"]["eval_loss"] < manifest["baselineMetrics"]["eval_loss"]
    # the drift reference's greedy answers: every rank generates under ZeRO-3 (each forward is a
    # collective), rank 0 alone otherwise (run_pods gives every pod's log as stdout)
    answering = result.stdout.count("answering holdout prompts for the drift reference")
    assert answering == (2 if deepspeed["enabled"] else 1)
    assert manifest["driftProfile"]["decoding"]["prompts"] == manifest["dataset"]["validationExamples"]

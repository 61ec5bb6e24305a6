"""DeepSpeed ZeRO-3 under `torchrun --nproc_per_node 2` (gloo, CPU) publishes a real adapter whose
tensors have the same names and shapes as a single-process run's."""

from __future__ import annotations

from safetensors import safe_open

from .conftest import adapter_dir, job_spec, lm_corpus, make_config, manifest_of, run_torchrun, write_jsonl


def tensor_shapes(path) -> dict[str, tuple]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118


def test_zero3_two_processes_matches_single_process_adapter(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", lm_corpus(64))
    common = {"training__maxSteps": 6, "training__perDeviceBatchSize": 4, "training__evalSteps": 6}
    zero3 = make_config(job_spec(tiny_llama, data, tmp_path / "out", **common,
                                 distributed={"nodes": 1, "gpusPerNode": 0, "processesPerNode": 2,
                                              "deepspeed": {"enabled": True, "zeroStage": 3}}), name="zero3")
    single = make_config(job_spec(tiny_llama, data, tmp_path / "out", **common), name="single")

    result = run_torchrun(zero3, tmp_path, nproc=2)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert '"zeroInit": true' in result.stderr  # weights partitioned while loading, never whole on a rank
    result = run_torchrun(single, tmp_path, nproc=1)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    zero3_manifest, single_manifest = manifest_of(zero3), manifest_of(single)
    assert zero3_manifest["training"]["schedule"]["world_size"] == 2
    zero3_shapes = tensor_shapes(adapter_dir(zero3, zero3_manifest) / "adapter_model.safetensors")
    single_shapes = tensor_shapes(adapter_dir(single, single_manifest) / "adapter_model.safetensors")
    assert zero3_shapes == single_shapes
    assert zero3_shapes and all(all(d > 0 for d in shape) for shape in zero3_shapes.values())
    assert zero3_manifest["metrics"]["eval_loss"] < zero3_manifest["baselineMetrics"]["eval_loss"]

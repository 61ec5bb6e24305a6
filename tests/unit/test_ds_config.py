"""The DeepSpeed config generator (kubetune_trainer.ds_config): pure, so tested without torch."""

from __future__ import annotations

import ast
import itertools
import os
import subprocess
import sys
from typing import Any

import pytest

from kubetune_trainer import ds_config
from kubetune_trainer.ds_config import deepspeed_config, qlora_quant_storage_dtype, use_zero_init
from tests.conftest import REPO_ROOT


def cfg(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "world_size": 16, "per_device_batch": 4, "grad_accum": 2, "zero_stage": 3, "precision": "bf16",
        "method": "LoRA", "offload_optimizer": False, "offload_params": False, "max_grad_norm": 1.0,
    }
    args.update(overrides)
    return deepspeed_config(**args)


def test_module_imports_neither_torch_nor_deepspeed():
    tree = ast.parse((REPO_ROOT / "trainer_image" / "kubetune_trainer" / "ds_config.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                 and node.module}
    assert not imported & {"torch", "deepspeed", "transformers", "peft", "bitsandbytes"}


@pytest.mark.parametrize(("world", "micro", "accum"), [(1, 1, 1), (2, 4, 2), (16, 4, 2), (8, 2, 16)])
def test_batch_arithmetic(world: int, micro: int, accum: int):
    c = cfg(world_size=world, per_device_batch=micro, grad_accum=accum)
    assert c["train_micro_batch_size_per_gpu"] == micro
    assert c["gradient_accumulation_steps"] == accum
    assert c["train_batch_size"] == micro * accum * world


def test_example_7b_job_effective_batch_128():
    # examples/finetunejob-lora-7b-zero3.yaml: 2 nodes x 8 GPUs, 4 per device, effective batch 128.
    c = cfg(world_size=16, per_device_batch=4, grad_accum=128 // (4 * 16))
    assert c["train_batch_size"] == 128 and c["gradient_accumulation_steps"] == 2


@pytest.mark.parametrize("field", ["world_size", "per_device_batch", "grad_accum"])
@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_batch_fields_must_be_positive_integers(field: str, bad: Any):
    with pytest.raises(ValueError, match=field):
        cfg(**{field: bad})


def test_gradient_clipping_is_the_max_grad_norm():
    assert cfg(max_grad_norm=0.5)["gradient_clipping"] == 0.5
    with pytest.raises(ValueError, match="max_grad_norm"):
        cfg(max_grad_norm=0)


def test_stage3_gathers_16bit_weights_on_save_and_partitions_everything():
    zero = cfg(zero_stage=3)["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["contiguous_gradients"] is True and zero["reduce_scatter"] is True
    for key in ("stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "stage3_max_live_parameters",
                "stage3_max_reuse_distance", "sub_group_size", "reduce_bucket_size"):
        assert isinstance(zero[key], int) and zero[key] > 0, key


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_stage3_keys_only_on_stage3(stage: int):
    zero = cfg(zero_stage=stage)["zero_optimization"]
    assert zero["stage"] == stage
    assert not [k for k in zero if k.startswith("stage3_")]


def test_stage0_is_just_the_stage():
    assert cfg(zero_stage=0)["zero_optimization"] == {"stage": 0}


def test_bucket_sizes_follow_hf_auto_with_hidden_size():
    zero = cfg(zero_stage=3, hidden_size=4096)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 4096 * 4096
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 4096 * 4096)
    assert zero["stage3_param_persistence_threshold"] == 10 * 4096
    assert cfg(zero_stage=2, hidden_size=4096)["zero_optimization"]["allgather_bucket_size"] == 4096 * 4096


def test_bucket_sizes_default_to_deepspeeds_without_hidden_size():
    zero = cfg(zero_stage=3)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 500_000_000
    assert zero["stage3_prefetch_bucket_size"] == 50_000_000
    assert zero["stage3_param_persistence_threshold"] == 100_000


def test_overlap_comm_on_gpus_only():
    assert cfg(accelerator="cuda")["zero_optimization"]["overlap_comm"] is True
    # No CUDA streams on CPU; it made ZeRO-3 ~40x slower there (bench/spikes/zero3_lora_cpu.py).
    assert cfg(accelerator="cpu", precision="fp32")["zero_optimization"]["overlap_comm"] is False
    with pytest.raises(ValueError, match="accelerator"):
        cfg(accelerator="tpu")


def test_no_offload_sections_unless_asked():
    c = cfg()
    assert "offload_optimizer" not in c["zero_optimization"]
    assert "offload_param" not in c["zero_optimization"]
    assert "zero_force_ds_cpu_optimizer" not in c


def test_offload_optimizer_to_pinned_cpu_memory():
    c = cfg(offload_optimizer=True)
    assert c["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert "offload_param" not in c["zero_optimization"]
    # Our torch.optim.AdamW instead of DeepSpeedCPUAdam: DeepSpeed refuses it unless this is false.
    assert c["zero_force_ds_cpu_optimizer"] is False


def test_offload_params_to_pinned_cpu_memory():
    zero = cfg(offload_params=True, offload_optimizer=True)["zero_optimization"]
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}


def test_no_pinned_memory_on_cpu():
    zero = cfg(accelerator="cpu", precision="fp32", offload_params=True, offload_optimizer=True)["zero_optimization"]
    assert zero["offload_param"]["pin_memory"] is False and zero["offload_optimizer"]["pin_memory"] is False


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_offload_params_needs_stage3(stage: int):
    with pytest.raises(ValueError, match="zero_stage 3"):
        cfg(zero_stage=stage, offload_params=True)


def test_offload_optimizer_needs_zero():
    with pytest.raises(ValueError, match="zero_stage >= 1"):
        cfg(zero_stage=0, offload_optimizer=True)
    assert cfg(zero_stage=1, offload_optimizer=True)["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_bf16_section():
    c = cfg(precision="bf16")
    assert c["bf16"] == {"enabled": True}
    assert c["fp16"]["enabled"] is False


def test_fp16_dynamic_loss_scaling():
    c = cfg(precision="fp16")
    assert c["bf16"]["enabled"] is False
    assert c["fp16"] == {
        "enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
        "hysteresis": 2, "min_loss_scale": 1,
    }


def test_fp32_disables_both():
    c = cfg(precision="fp32")
    assert c["bf16"]["enabled"] is False and c["fp16"]["enabled"] is False


@pytest.mark.parametrize("bad", ["Auto", "BF16", "int8", ""])
def test_precision_must_be_resolved_lowercase(bad: str):
    with pytest.raises(ValueError, match="precision"):
        cfg(precision=bad)


ALL = list(itertools.product([0, 1, 2, 3], ["bf16", "fp16", "fp32"], ["LoRA", "QLoRA", "Full", "FreezeThaw"],
                             [False, True], [False, True]))


def valid_combinations() -> list[dict[str, Any]]:
    out = []
    for stage, precision, method, off_opt, off_par in ALL:
        args = {"zero_stage": stage, "precision": precision, "method": method, "offload_optimizer": off_opt,
                "offload_params": off_par}
        try:
            cfg(**args)
        except ValueError:
            continue
        out.append(args)
    return out


def test_never_an_optimizer_or_scheduler_section():
    # We pass our own optimizer and scheduler to deepspeed.initialize; DeepSpeed refuses both at once.
    for args in valid_combinations():
        c = cfg(**args)
        assert "optimizer" not in c and "scheduler" not in c, args
        assert "auto" not in repr(c), args  # "auto" is an HF Trainer placeholder, DeepSpeed cannot read it


def test_invalid_stage_and_method():
    with pytest.raises(ValueError, match="zero_stage"):
        cfg(zero_stage=4)
    with pytest.raises(ValueError, match="method"):
        cfg(method="DoRA")


def test_qlora_keeps_the_stage_but_refuses_param_offload():
    # PEFT >= 0.10 + bitsandbytes >= 0.43: QLoRA under ZeRO-3 works when the 4-bit storage dtype matches.
    assert cfg(method="QLoRA", zero_stage=3)["zero_optimization"]["stage"] == 3
    with pytest.raises(ValueError, match="offload"):
        cfg(method="QLoRA", zero_stage=3, offload_params=True)
    # Optimizer offload only touches the (fp32) LoRA master weights.
    assert cfg(method="QLoRA", offload_optimizer=True)["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_qlora_is_never_built_under_zero_init():
    assert use_zero_init(zero_stage=3, method="LoRA") is True
    assert use_zero_init(zero_stage=3, method="Full") is True
    assert use_zero_init(zero_stage=3, method="QLoRA") is False
    assert use_zero_init(zero_stage=2, method="LoRA") is False


def test_qlora_quant_storage_matches_compute_dtype():
    assert qlora_quant_storage_dtype("bf16") == "bfloat16"
    assert qlora_quant_storage_dtype("fp16") == "float16"
    assert qlora_quant_storage_dtype("fp32") == "float32"
    with pytest.raises(ValueError):
        qlora_quant_storage_dtype("auto")


def test_checkpoint_tags_must_agree_and_no_deepspeed_step_log():
    c = cfg()
    assert c["checkpoint"] == {"tag_validation": "Fail"}
    assert c["steps_per_print"] >= 10**9


def test_config_is_a_fresh_json_serialisable_dict():
    import json

    a, b = cfg(), cfg()
    a["zero_optimization"]["stage"] = 0
    assert b["zero_optimization"]["stage"] == 3
    assert json.loads(json.dumps(b)) == b


def test_constants_match_the_crd_enums():
    from kubetune.api.v1alpha1 import finetunejob as v1alpha1_finetunejob

    assert {p.lower() for p in v1alpha1_finetunejob.PRECISIONS} - {"auto"} == set(ds_config.PRECISIONS)


def test_method_limits_come_from_the_registry():
    """QLoRA's limits are its module's (no parameter offload, no zero.Init); the others allow both."""
    from kubetune_trainer.methods import METHODS

    with pytest.raises(ValueError, match="offload"):
        cfg(method="QLoRA", offload_params=True)
    for name, method in METHODS.items():
        assert use_zero_init(zero_stage=3, method=name) is method.deepspeed.zero_init
        if method.deepspeed.offload_params:
            assert cfg(method=name, offload_params=True)["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_registry_is_import_light():
    """ds_config reads the method registry, and both must stay importable without torch."""
    code = "import sys, kubetune_trainer.ds_config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_deepspeed_accepts_every_valid_combination(monkeypatch: pytest.MonkeyPatch):
    """DeepSpeed's own config parser (strict about zero_optimization keys) takes everything we generate.

    World size 1: outside a process group DeepSpeed checks the batch arithmetic against world size 1.
    """
    if "DS_ACCELERATOR" not in os.environ:
        monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # no accelerator probing (if deepspeed is not imported yet)
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    for args in valid_combinations():
        for hidden_size, accelerator in itertools.product([None, 4096], ["cuda", "cpu"]):
            try:
                c = cfg(world_size=1, hidden_size=hidden_size, accelerator=accelerator, **args)
            except ValueError:
                continue
            parsed = DeepSpeedConfig(c)
            assert parsed.train_batch_size == 8
            assert parsed.zero_optimization_stage == args["zero_stage"]
            assert parsed.gradient_clipping == 1.0

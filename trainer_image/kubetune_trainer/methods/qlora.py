"""QLoRA: LoRA on a bitsandbytes 4-bit base (see ds_config's docstring for its DeepSpeed limits)."""

from __future__ import annotations

from . import DeepSpeedLimits
from .lora import LoRA, apply_lora


class QLoRA(LoRA):
    name = "QLoRA"
    # DeepSpeed's parameter offload would strip the bitsandbytes quantization state; transformers never
    # loads a quantized model under zero.Init (deepspeed.initialize partitions it afterwards).
    deepspeed = DeepSpeedLimits(offload_params=False, zero_init=False)
    quantized = True

    def load_options(self, spec: dict, *, dtype, device) -> dict:
        import torch
        from transformers import BitsAndBytesConfig

        quant = spec["method"]["quantization"]
        return {
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=quant["quantType"],
                bnb_4bit_use_double_quant=quant["doubleQuant"],
                bnb_4bit_compute_dtype=getattr(torch, quant["computeDtype"]),
                bnb_4bit_quant_storage=dtype,  # lets ZeRO-3 shard the packed 4-bit weights
            ),
            "device_map": {"": device.index if device.type == "cuda" else "cpu"},
        }

    def prepare(self, model, spec: dict, *, gradient_checkpointing: bool):
        from peft import prepare_model_for_kbit_training

        # k-bit preparation enables gradient checkpointing itself
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
        return apply_lora(model, spec), None

"""What a runtime refuses in an adapter's adapter_config.json (pure), for pre-flight: a refusal here is
one the engine would answer at load time on every pod, after the rollout began."""

from __future__ import annotations


def vllm_refusals(adapter_config: dict) -> list[str]:
    """vLLM v0.11.0's `PEFTHelper` (vllm/lora/peft_helper.py) on loading a LoRA adapter:
    `_validate_features` raises "vLLM only supports modules_to_save being None." and "vLLM does not yet
    support DoRA."; `validate_legal` refuses adapter bias (bias other than "none"), which needs LoRA bias
    support that kubetune never enables. The rank limit is checked on its own (RankTooHigh)."""
    refusals = []
    if adapter_config.get("modules_to_save"):
        refusals.append(f"adapter_config.json modules_to_save {adapter_config['modules_to_save']}: vLLM only "
                        "supports modules_to_save being None (a classification head is saved that way)")
    if adapter_config.get("use_dora"):
        refusals.append("adapter_config.json use_dora: vLLM does not support DoRA")
    bias = adapter_config.get("bias") or "none"
    if bias != "none":
        refusals.append(f"adapter_config.json bias {bias!r}: vLLM loads no adapter bias")
    return refusals


def peft_refusals(adapter_config: dict) -> list[str]:
    """The CPU engine loads with peft itself, which takes every LoRA adapter peft saved."""
    return []

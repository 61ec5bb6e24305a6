"""What the operator needs to know about each training method (`spec.method.type`), as plain data.

The trainer's registry (kubetune_trainer.methods) holds the behaviour; this table holds the few facts
validation and reconciliation decide on, keyed by the same names. Adding a method adds one row here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodFacts:
    settings: str | None  # the spec.method section holding its settings ("lora", "freezeThaw"), if any
    has_lora_rank: bool  # spec.method.lora.rank applies: the rank is reported and can be swept
    quantized: bool  # a 4-bit base: DeepSpeed cannot offload its parameters
    publishes_adapter: bool  # adapter files on top of the base, not whole weights
    changes_trainable_params: bool  # unfreezes parameters mid-run: no DeepSpeed engine across processes


METHODS: dict[str, MethodFacts] = {
    "LoRA": MethodFacts("lora", has_lora_rank=True, quantized=False, publishes_adapter=True,
                        changes_trainable_params=False),
    "QLoRA": MethodFacts("lora", has_lora_rank=True, quantized=True, publishes_adapter=True,
                         changes_trainable_params=False),
    "Full": MethodFacts(None, has_lora_rank=False, quantized=False, publishes_adapter=False,
                        changes_trainable_params=False),
    "FreezeThaw": MethodFacts("freezeThaw", has_lora_rank=False, quantized=False, publishes_adapter=False,
                              changes_trainable_params=True),
}


def facts(spec: dict) -> MethodFacts | None:
    """The facts of the spec's method; None when it names none we know (the schema reports that)."""
    return METHODS.get((spec.get("method") or {}).get("type"))

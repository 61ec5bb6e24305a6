"""LoRA: low-rank adapters on a frozen base; the adapter (and a classifier head) is published."""

from __future__ import annotations

from . import DeepSpeedLimits
from .full import enable_gradient_checkpointing


def linear_module_names(model) -> list[str]:
    """Distinct last-name parts of the model's linear layers (what targetModules can name)."""
    from torch import nn

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def resolve_target_modules(model, requested: list[str]) -> list[str] | str:
    from ..modeling import BadInput

    if requested == ["all-linear"]:
        return "all-linear"
    available = linear_module_names(model)
    missing = [name for name in requested if name not in available]
    if missing:
        raise BadInput(
            f"method.lora.targetModules {missing} match no module of this model; its linear modules are: "
            f"{', '.join(available)} (or use all-linear)")
    return requested


def apply_lora(model, spec: dict):
    from peft import LoraConfig, get_peft_model

    from ..modeling import head_module_names

    lora = spec["method"]["lora"]
    classification = spec["task"] == "SequenceClassification"
    config = LoraConfig(
        r=lora["rank"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=resolve_target_modules(model, lora["targetModules"]),
        use_rslora=lora.get("useRslora", False),
        task_type="SEQ_CLS" if classification else "CAUSAL_LM",
        # The classifier head starts random: it must be trained and saved with the adapter.
        modules_to_save=head_module_names(model) if classification else None,
    )
    return get_peft_model(model, config)


class LoRA:
    name = "LoRA"
    deepspeed = DeepSpeedLimits()
    quantized = False
    publishes_adapter = True

    def load_options(self, spec: dict, *, dtype, device) -> dict:
        return {}

    def prepare(self, model, spec: dict, *, gradient_checkpointing: bool):
        if gradient_checkpointing:
            enable_gradient_checkpointing(model)
            model.enable_input_require_grads()  # frozen embeddings: let checkpointed blocks see a grad path
        return apply_lora(model, spec), None

    def optimizer_parameters(self, model) -> list:
        return [p for p in model.parameters() if p.requires_grad]

    def save(self, model, target, state_dict: dict | None) -> None:
        model.save_pretrained(target, state_dict=state_dict)

    def manifest_fields(self, spec: dict) -> dict:
        return {"rank": spec["method"].get("lora", {}).get("rank")}

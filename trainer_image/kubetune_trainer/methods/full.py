"""Full fine-tuning: every weight trains and the whole model is published."""

from __future__ import annotations

from . import DeepSpeedLimits


def enable_gradient_checkpointing(model) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class Full:
    name = "Full"
    deepspeed = DeepSpeedLimits()
    quantized = False
    publishes_adapter = False

    def load_options(self, spec: dict, *, dtype, device) -> dict:
        return {}

    def prepare(self, model, spec: dict, *, gradient_checkpointing: bool):
        if gradient_checkpointing:
            enable_gradient_checkpointing(model)
        return model, None

    def optimizer_parameters(self, model) -> list:
        return [p for p in model.parameters() if p.requires_grad]

    def save(self, model, target, state_dict: dict | None) -> None:
        model.save_pretrained(target, state_dict=state_dict, safe_serialization=True)

    def manifest_fields(self, spec: dict) -> dict:
        return {"rank": None}

"""FreezeThaw: the head and the top blocks train; more blocks thaw when the evaluation plateaus."""

from __future__ import annotations

from dataclasses import dataclass

from . import DeepSpeedLimits
from .full import enable_gradient_checkpointing


def transformer_blocks(model) -> list:
    """The repeated blocks, bottom to top (the longest ModuleList of the model)."""
    from torch import nn

    from ..modeling import BadInput

    best: list = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            best = list(module)
    if not best:
        raise BadInput("method FreezeThaw: cannot find the model's transformer blocks")
    return best


@dataclass
class Thawing:
    """Top `trainable` blocks + head train; `thaw()` unfreezes the next block down."""

    model: object
    blocks: list
    trainable: int
    per_plateau: int
    maximum: int
    patience: int
    min_delta: float

    @classmethod
    def apply(cls, model, settings: dict) -> Thawing:
        from ..modeling import head_module_names

        blocks = transformer_blocks(model)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for head in head_module_names(model):
            for parameter in getattr(model, head).parameters():
                parameter.requires_grad_(True)
        state = cls(model, blocks, 0, settings["thawPerPlateau"],
                    min(settings.get("maxTrainableBlocks") or len(blocks), len(blocks)),
                    settings["plateauPatience"], settings["minDelta"])
        state.set_trainable(settings["initialTrainableBlocks"])
        return state

    def set_trainable(self, count: int) -> None:
        self.trainable = min(count, self.maximum)
        for index, block in enumerate(self.blocks):
            trainable = index >= len(self.blocks) - self.trainable
            for parameter in block.parameters():
                parameter.requires_grad_(trainable)

    @property
    def can_thaw(self) -> bool:
        return self.trainable < self.maximum

    def thaw(self) -> None:
        self.set_trainable(self.trainable + self.per_plateau)


class FreezeThaw:
    name = "FreezeThaw"
    deepspeed = DeepSpeedLimits()  # the operator allows DeepSpeed only for one process (no thaw across ranks)
    quantized = False
    publishes_adapter = False

    def load_options(self, spec: dict, *, dtype, device) -> dict:
        return {}

    def prepare(self, model, spec: dict, *, gradient_checkpointing: bool):
        if gradient_checkpointing:
            enable_gradient_checkpointing(model)
        return model, Thawing.apply(model, spec["method"]["freezeThaw"])

    def optimizer_parameters(self, model) -> list:
        # every block may thaw later; AdamW skips parameters without gradients
        return [p for p in model.parameters() if p.dtype.is_floating_point]

    def save(self, model, target, state_dict: dict | None) -> None:
        model.save_pretrained(target, state_dict=state_dict, safe_serialization=True)

    def manifest_fields(self, spec: dict) -> dict:
        return {"rank": None}


"""A classification head pools as it was trained: the trainer records the mode (labels.json `pooling`,
or `kubetune_pooling` in a merged model's config) and the engine swaps the encoder's pooler to match.
The same rule as kubetune_trainer.pooling (the deployables share no torch code: see docs/architecture.md).
"""

from __future__ import annotations

import torch
from torch import nn

ARCHITECTURE = "architecture"
MODES = ("mean", "cls", "max")


class TokenPooler(nn.Module):
    """Mean, [CLS] or max over the unmasked tokens, in place of the encoder's pooler (no weights)."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode, self.mask = mode, None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.mode == "cls":
            return hidden[:, 0]
        mask = self.mask if self.mask is not None and self.mask.shape == hidden.shape[:2] else None
        mask = (torch.ones(hidden.shape[:2], device=hidden.device) if mask is None else mask)
        mask = mask.to(hidden.dtype).unsqueeze(-1)
        if self.mode == "max":
            return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)


def use_pooling(model: nn.Module, mode: str | None) -> None:
    """Make `model` (a ...ForSequenceClassification) pool by `mode`; None or ARCHITECTURE: as it is."""
    if mode in (None, ARCHITECTURE):
        return
    encoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if mode not in MODES or not isinstance(getattr(encoder, "pooler", None), nn.Module):
        raise ValueError(f"cannot pool by {mode!r}: {type(model).__name__} has no pooler to replace")
    pooler = TokenPooler(mode)
    encoder.pooler = pooler

    def remember_mask(module, args, kwargs):
        pooler.mask = kwargs.get("attention_mask")

    encoder.register_forward_pre_hook(remember_mask, with_kwargs=True)

"""How a classifier pools its tokens: as the checkpoint was trained (sentence-transformers' Pooling
module: mean, CLS or max), else the architecture's own head. Recorded in the manifest and labels.json,
so the serving engine pools the same way. Why and how: docs/trainer.md#the-classification-head.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

ARCHITECTURE = "architecture"  # the model class's own head (BERT: dense + tanh over [CLS])
MODES = ("mean", "cls", "max")
_FLAGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}
_POOLING_TYPE = "sentence_transformers.models.Pooling"


def checkpoint_pooling(model_dir: Path) -> tuple[str, str]:
    """(mode, why): the pooling a sentence-transformers checkpoint was trained with, from its Pooling
    module's config (found through modules.json), or ARCHITECTURE when the checkpoint names none."""
    path = model_dir / "1_Pooling" / "config.json"
    try:
        modules = json.loads((model_dir / "modules.json").read_text())
        named = [m.get("path") for m in modules if m.get("type") == _POOLING_TYPE and m.get("path")]
        path = model_dir / named[0] / "config.json" if named else path
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return ARCHITECTURE, "the checkpoint has no sentence-transformers pooling config"
    chosen = [mode for flag, mode in _FLAGS.items() if config.get(flag)]
    if len(chosen) != 1:
        return ARCHITECTURE, f"{path.relative_to(model_dir)} asks for no single pooling kubetune applies: {chosen}"
    return chosen[0], f"{path.relative_to(model_dir)}: pooling_mode_{chosen[0]}"


class TokenPooler(nn.Module):
    """Stands in for the encoder's pooler: mean, [CLS] or max over the real (unmasked) tokens, with no
    weights of its own. The attention mask comes from a pre-hook on the encoder (`_remember_mask`)."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.mode == "cls":
            return hidden_states[:, 0]
        mask = self.mask
        if mask is None or mask.shape != hidden_states.shape[:2]:
            mask = torch.ones(hidden_states.shape[:2], device=hidden_states.device)
        mask = mask.to(hidden_states.dtype).unsqueeze(-1)
        if self.mode == "max":
            return hidden_states.masked_fill(mask == 0, torch.finfo(hidden_states.dtype).min).max(dim=1).values
        return (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)


def _remember_mask(pooler: TokenPooler):
    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]
        pooler.mask = mask
        return None

    return hook


def apply_pooling(model: nn.Module, mode: str) -> tuple[str, str]:
    """Replace the encoder's pooler by a `TokenPooler(mode)`; (applied mode, why). Architectures whose
    head does not go through a pooler module keep their own head (ARCHITECTURE)."""
    if mode == ARCHITECTURE:
        return ARCHITECTURE, "asked for the architecture's head"
    encoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(getattr(encoder, "pooler", None), nn.Module):
        return ARCHITECTURE, f"{type(model).__name__} has no pooler module to replace"
    pooler = TokenPooler(mode)
    encoder.pooler = pooler
    encoder.register_forward_pre_hook(_remember_mask(pooler), with_kwargs=True)
    return mode, f"{mode} pooling replaces {type(model).__name__}'s pooler"


def prepare_head(model: nn.Module, model_dir: Path, requested: str = "Auto") -> dict:
    """Pool as `requested` (Auto: as the checkpoint says); the record for the manifest and labels.json."""
    wanted, why = checkpoint_pooling(model_dir) if requested == "Auto" else (requested.lower(), "asked in the spec")
    applied, how = apply_pooling(model, wanted)
    record = {"pooling": applied, "reason": why if applied == wanted else how}
    log.info("classification head", extra=record)
    return record

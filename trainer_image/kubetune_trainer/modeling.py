"""Loading the base model, and what every method shares (heads, parameter counts, monitors).

Errors a user can fix (no such model, a target module that matches nothing) raise `BadInput`, which
the entrypoint turns into exit code 2 (never retried) with the message in the log.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from .errors import BadInput  # re-exported: the methods and recipe raise it from here
from .methods import method_of

log = logging.getLogger(__name__)


# --- where the weights are -------------------------------------------------------------------------


def resolve_model_dir(base_model: dict, store, cache_dir: Path) -> Path:
    """A local directory holding the base model: file:// as is, s3:// downloaded once into the cache,
    hf:// through huggingface_hub (which honours HF_HUB_OFFLINE and HF_ENDPOINT mirrors)."""
    uri, revision = base_model["uri"], base_model.get("revision", "main")
    scheme, _, rest = uri.partition("://")
    if scheme == "file":
        path = Path("/" + rest.lstrip("/"))
        if not (path / "config.json").is_file():
            raise BadInput(f"baseModel.uri {uri}: no config.json in {path}")
        return path
    if scheme == "s3":
        prefix = uri.rstrip("/") + "/"
        target = cache_dir / "models" / re.sub(r"[^A-Za-z0-9._-]", "_", prefix)
        done = target / ".complete"
        if not done.exists():
            from .storage import download_prefix

            if not download_prefix(store, prefix, target):
                raise BadInput(f"baseModel.uri {uri}: no objects under that prefix")
            done.write_text("ok")
        return target
    if scheme == "hf":
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(rest, revision=revision, token=os.environ.get("HF_TOKEN") or None,
                                          cache_dir=str(cache_dir / "hf")))
        except Exception as exc:  # offline, private, missing: all need a spec or mirror fix
            raise BadInput(f"baseModel.uri {uri}@{revision}: {exc}") from exc
    raise BadInput(f"baseModel.uri {uri}: unsupported scheme")


# --- precision -------------------------------------------------------------------------------------


def pick_precision(requested: str, device: torch.device) -> str:
    """Auto: bf16 where the GPU supports it, fp16 (with loss scaling) on older GPUs, fp32 on CPU."""
    if requested != "Auto":
        return requested.lower()
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --- the model -------------------------------------------------------------------------------------


def load_model(model_dir: Path, spec: dict, *, precision: str, num_labels: int | None, label_ids: dict | None,
               device: torch.device):
    """The base model for the task, loaded as the method asks (QLoRA: quantized)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs: dict = {"trust_remote_code": bool(spec["baseModel"].get("trustRemoteCode", False))}
    # Weights stay fp32 for fp16 training (the loss scaler needs fp32 masters); bf16 weights are fine.
    kwargs["dtype"] = torch.bfloat16 if precision == "bf16" else torch.float32
    kwargs |= method_of(spec).load_options(spec, dtype=kwargs["dtype"], device=device)
    if spec["task"] == "SequenceClassification":
        id2label = {i: name for name, i in label_ids.items()}
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=num_labels, id2label=id2label, label2id=label_ids, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model.config.use_cache = False  # no KV cache in training (and needed for padding-free packing)
    return model


def head_module_names(model: nn.Module) -> list[str]:
    """The output head(s): never LoRA targets; trained in full and saved with the adapter."""
    heads = []
    for candidate in ("lm_head", "score", "classifier", "cls"):
        if getattr(model, candidate, None) is not None:
            heads.append(candidate)
    return heads


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def lora_to_base_ratios(model: nn.Module) -> dict[str, float]:
    """Per adapted module: ||B·A·scale|| / ||W||, how far the adapter has moved each layer."""
    ratios = {}
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict) or "default" not in lora_a:
            continue
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        if a.numel() == 0 or b.numel() == 0:  # ZeRO-3 partitioned: not available on this rank
            continue
        base = module.base_layer.weight
        if base.numel() == 0 or base.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            continue  # 4-bit packed weights: no cheap norm
        with torch.no_grad():
            delta = (b.float() @ a.float()) * module.scaling["default"]
            ratios[name] = float(delta.norm() / base.float().norm().clamp_min(1e-12))
    return ratios


def layer_grad_norms(model: nn.Module) -> dict[str, float]:
    """Gradient norm per adapted layer (its LoRA A and B together), or per trainable module for the other
    methods; partitioned (ZeRO-3) or missing gradients are left out."""
    squares: dict[str, float] = {}
    for name, parameter in model.named_parameters():
        grad = parameter.grad
        if grad is None or grad.numel() == 0:
            continue
        layer = name.split(".lora_")[0] if ".lora_" in name else name.rsplit(".", 1)[0]
        squares[layer] = squares.get(layer, 0.0) + float(grad.detach().float().norm()) ** 2
    return {layer: value ** 0.5 for layer, value in squares.items()}

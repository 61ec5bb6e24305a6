"""Loading the base model, and what every method shares (heads, parameter counts, monitors).

Errors a user can fix (no such model, a target module that matches nothing) raise `BadInput`, which
the entrypoint turns into exit code 2 (never retried) with the message in the log.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from kubetune.api import base_identity

from .errors import BadInput  # re-exported: the methods and recipe raise it from here
from .methods import method_of

log = logging.getLogger(__name__)


# --- where the weights are -------------------------------------------------------------------------


def resolve_model_dir(base_model: dict, store, cache_dir: Path, *, fetch: bool = True) -> Path:
    """A local directory holding the base model: file:// as is, s3:// downloaded into the cache (kept
    while whole and current, see `node_cache`), hf:// through huggingface_hub (which honours
    HF_HUB_OFFLINE and HF_ENDPOINT mirrors). `fetch=False`: the copy already in the cache, no network
    (what the other ranks of a pod read once its local rank 0 has fetched)."""
    uri, revision = base_model["uri"], base_model.get("revision", "main")
    scheme, _, rest = uri.partition("://")
    if scheme == "file":
        path = Path("/" + rest.lstrip("/"))
        if not (path / "config.json").is_file():
            raise BadInput(f"baseModel.uri {uri}: no config.json in {path}")
        return path
    if scheme == "s3":
        from . import node_cache

        prefix = uri.rstrip("/") + "/"
        target = node_cache.cache_dir_for(cache_dir, "models", prefix)
        if not fetch:
            node_cache.require_complete(target, f"baseModel.uri {uri}")
        elif node_cache.fetch_prefix(store, prefix, target, f"baseModel.uri {uri}") is None:
            raise BadInput(f"baseModel.uri {uri}: no objects under that prefix")
        return target
    if scheme == "hf":
        from huggingface_hub import snapshot_download

        try:  # the hub's cache writes each file under a temporary name and renames it when whole
            return Path(snapshot_download(rest, revision=revision, token=os.environ.get("HF_TOKEN") or None,
                                          cache_dir=str(cache_dir / "hf"), local_files_only=not fetch))
        except Exception as exc:  # offline, private, missing: all need a spec or mirror fix
            raise BadInput(f"baseModel.uri {uri}@{revision}: {exc}") from exc
    raise BadInput(f"baseModel.uri {uri}: unsupported scheme")


_SHA256_NAME = re.compile(r"^[a-f0-9]{64}$")


def weight_hashes(model_dir: Path) -> dict[str, str] | None:
    """The safetensors files' sha256 where cheap: the hub cache's blob names (an LFS blob is named by its
    sha256), the node cache's marker (computed while downloading), else the files hashed when small."""
    files = sorted(p for p in model_dir.glob(f"*{base_identity.WEIGHT_SUFFIX}"))
    if not files:
        return None
    blob_names = {p.name: p.resolve().name for p in files}
    if all(_SHA256_NAME.match(name) for name in blob_names.values()):
        return blob_names
    from . import node_cache

    marker = {f.path: f.sha256 for f in node_cache.read_marker(model_dir) or []}
    if all(p.name in marker for p in files):
        return {p.name: marker[p.name] for p in files}
    if sum(p.stat().st_size for p in files) > base_identity.HASHED_WEIGHTS_LIMIT:
        return None
    return {p.name: _sha256(p) for p in files}


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def model_identity(model_dir: Path, base_model: dict) -> dict:
    """The base model's identity (kubetune.api.base_identity) for the manifest."""
    config = base_identity.parse_config((model_dir / "config.json").read_bytes(), base_model["uri"])
    return base_identity.identity(config, base_identity.revision_of(base_model), weight_hashes(model_dir))


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
               device: torch.device, pooling: str | None = None):
    """The base model for the task, loaded as the method asks (QLoRA: quantized); a classifier pooling
    as `pooling` says (a mode of `pooling.MODES`; None or ARCHITECTURE: the architecture's head)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs: dict = {"trust_remote_code": bool(spec["baseModel"].get("trustRemoteCode", False))}
    # Weights stay fp32 for fp16 training (the loss scaler needs fp32 masters); bf16 weights are fine.
    kwargs["dtype"] = torch.bfloat16 if precision == "bf16" else torch.float32
    kwargs |= method_of(spec).load_options(spec, dtype=kwargs["dtype"], device=device)
    if spec["task"] == "SequenceClassification":
        id2label = {i: name for name, i in label_ids.items()}
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=num_labels, id2label=id2label, label2id=label_ids, **kwargs)
        if pooling is not None:
            from .pooling import apply_pooling

            apply_pooling(model, pooling)
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


def is_head_parameter(name: str, heads: list[str]) -> bool:
    """Whether a parameter (by its name, peft's wrapping included) belongs to an output head."""
    return any(part in heads for part in name.split("."))


def optimizer_groups(model: nn.Module, parameters: list, learning_rate: float, head_learning_rate: float | None):
    """AdamW parameter groups: a new classification head at its own rate, everything else at the base rate."""
    if head_learning_rate is None or head_learning_rate == learning_rate:
        return [{"params": parameters, "lr": learning_rate}]
    heads = head_module_names(model.get_base_model() if hasattr(model, "get_base_model") else model)
    head_ids = {id(p) for name, p in model.named_parameters() if is_head_parameter(name, heads)}
    head = [p for p in parameters if id(p) in head_ids]
    rest = [p for p in parameters if id(p) not in head_ids]
    groups = [{"params": rest, "lr": learning_rate, "name": "weights"}] if rest else []
    return groups + ([{"params": head, "lr": head_learning_rate, "name": "head"}] if head else [])


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def adapted_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The LoRA-adapted modules (peft's `lora_A`/`lora_B` around a `base_layer`), by name."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and "default" in module.lora_A]


def lora_to_base_ratio(module: nn.Module) -> float | None:
    """||B·A·scale|| / ||W|| of one adapted module: how far the adapter has moved it. None when a weight
    is not on this rank (ZeRO-3 partitioned, not gathered) or has no cheap norm (4-bit packed)."""
    a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
    base = module.base_layer.weight
    if a.numel() == 0 or b.numel() == 0 or base.numel() == 0:
        return None
    if base.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    with torch.no_grad():
        delta = (b.float() @ a.float()) * module.scaling["default"]
        return float(delta.norm() / base.float().norm().clamp_min(1e-12))


def lora_to_base_ratios(model: nn.Module) -> dict[str, float]:
    """Per adapted module: `lora_to_base_ratio`, for weights that are whole on this rank."""
    ratios = {}
    for name, module in adapted_modules(model):
        ratio = lora_to_base_ratio(module)
        if ratio is not None:
            ratios[name] = ratio
    return ratios


def layer_of(parameter_name: str) -> str:
    """The layer a parameter's gradient norm is counted under: an adapted layer (its LoRA A and B
    together), else the module that owns the parameter."""
    return parameter_name.split(".lora_")[0] if ".lora_" in parameter_name else parameter_name.rsplit(".", 1)[0]


def layer_grad_norms(model: nn.Module) -> dict[str, float]:
    """Gradient norm per `layer_of`, from the gradients on this rank's parameters (plain or DDP: whole
    and already averaged); missing gradients are left out. DeepSpeed: `zero_state.layer_grad_norms`."""
    squares: dict[str, float] = {}
    for name, parameter in model.named_parameters():
        grad = parameter.grad
        if grad is None or grad.numel() == 0:
            continue
        layer = layer_of(name)
        squares[layer] = squares.get(layer, 0.0) + float(grad.detach().float().norm()) ** 2
    return {layer: value ** 0.5 for layer, value in squares.items()}

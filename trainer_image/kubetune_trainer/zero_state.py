"""Monitors and early stopping's best weights under DeepSpeed, where ZeRO partitions what they read.

Per-layer gradient norms from the reduced gradients, LoRA-to-base ratios from all-gathered weights (in
bounded chunks), and the best weights kept as each rank's own fp32 partition. Every function here that
says "a collective" must be called by every rank, in the same order. Why this way: docs/trainer.md,
"Monitors and best weights under DeepSpeed".
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import modeling
from .distributed import GATHER_CHUNK_NUMEL


def _zero3(engine: Any) -> bool:
    return engine.zero_optimization_stage() == 3


def layer_grad_norms(engine: Any, parameters: dict[str, nn.Parameter]) -> dict[str, float]:
    """Gradient norm per layer (as `modeling.layer_grad_norms`) of the reduced, accumulated gradients,
    before clipping. Call between `engine.backward` and `engine.step` at an accumulation boundary. A
    collective: ZeRO-3 sums each rank's squared gradient partition in one all-reduce; ZeRO-0/1/2 assemble
    each gradient with DeepSpeed's `safe_get_full_grad` (one all-reduce per tensor)."""
    from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

    names = sorted(parameters)  # the same order on every rank
    squares = torch.zeros(len(names), dtype=torch.float64)
    for i, name in enumerate(names):
        param = parameters[name]
        grad = safe_get_local_grad(param) if _zero3(engine) else safe_get_full_grad(param)
        if grad is not None:
            squares[i] = float(grad.detach().float().pow(2).sum())
    if _zero3(engine) and dist.is_initialized() and dist.get_world_size() > 1:
        device = squares.device if dist.get_backend() != "nccl" else torch.device("cuda", torch.cuda.current_device())
        reduced = squares.to(device)
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        squares = reduced.cpu()
    per_layer: dict[str, float] = {}
    for name, square in zip(names, squares.tolist(), strict=True):
        layer = modeling.layer_of(name)
        per_layer[layer] = per_layer.get(layer, 0.0) + square
    return {layer: value ** 0.5 for layer, value in per_layer.items()}


def _module_chunks(model: nn.Module) -> Iterator[list[tuple[str, nn.Module, list[nn.Parameter]]]]:
    """The adapted modules with the weights a ratio needs, grouped so that no group gathers more than
    GATHER_CHUNK_NUMEL elements (a 70B layer gathered at once would not fit)."""
    chunk: list[tuple[str, nn.Module, list[nn.Parameter]]] = []
    size = 0
    for name, module in modeling.adapted_modules(model):
        weights = [module.lora_A["default"].weight, module.lora_B["default"].weight, module.base_layer.weight]
        numel = sum(getattr(w, "ds_numel", w.numel()) for w in weights)
        if chunk and size + numel > GATHER_CHUNK_NUMEL:
            yield chunk
            chunk, size = [], 0
        chunk.append((name, module, weights))
        size += numel
    if chunk:
        yield chunk


def lora_to_base_ratios(engine: Any) -> dict[str, float]:
    """`modeling.lora_to_base_ratios` of a ZeRO-3 model, on every rank: each adapted module's LoRA A, B
    and base weight all-gathered (read-only) in bounded chunks. A collective. Below ZeRO-3 the weights
    are whole on every rank and no gathering is needed."""
    model = engine.module
    if not _zero3(engine):
        return modeling.lora_to_base_ratios(model)
    import deepspeed

    ratios: dict[str, float] = {}
    # An evaluation's forward passes can leave parameters prefetched and still in flight (seen with a
    # classification head): gathering those fails ("Cannot partition a param in flight"). Release every
    # one first and re-gather the persistent ones after, as DeepSpeed does around a checkpoint.
    engine.optimizer.checkpoint_event_prologue()
    for chunk in _module_chunks(model):
        gathered = [w for _, _, weights in chunk for w in weights if hasattr(w, "ds_id")]
        with deepspeed.zero.GatheredParameters(gathered, modifier_rank=None):
            for name, module, _ in chunk:
                ratio = modeling.lora_to_base_ratio(module)
                if ratio is not None:
                    ratios[name] = ratio
    engine.optimizer.checkpoint_event_epilogue()
    return ratios


# --- early stopping's best weights ----------------------------------------------------------------------


def remember_best(engine: Any, parameters: dict[str, nn.Parameter]) -> dict[str, dict[str, torch.Tensor]]:
    """This rank's share of the trainable weights, CPU copies; no communication.

    ZeRO-3: the fp32 master partition of each parameter (`safe_get_local_fp32_param`), 1/world of the
    trainable weights per rank. ZeRO-0/1/2: the working (16- or 32-bit) weights are whole on every rank,
    so they are copied whole, with this rank's fragment of the fp32 masters (the optimizer's copy)."""
    best: dict[str, dict[str, torch.Tensor]] = {}
    if _zero3(engine):
        from deepspeed.utils import safe_get_local_fp32_param

        for name, param in parameters.items():
            master = safe_get_local_fp32_param(param)
            if master is not None:
                best[name] = {"master": master.detach().to("cpu", copy=True)}
        return best
    for name, param in parameters.items():
        entry = {"working": param.detach().to("cpu", copy=True)}
        fragment = _master_fragment(param)
        if fragment is not None:
            entry["master"] = fragment.detach().to("cpu", copy=True)
        best[name] = entry
    return best


def restore_best(engine: Any, parameters: dict[str, nn.Parameter], best: dict[str, dict[str, torch.Tensor]]) -> None:
    """Put `remember_best`'s copies back into the optimizer's fp32 masters and into the working weights
    that the forward pass and the published adapter read. A collective under ZeRO-3 (the persistent,
    never re-gathered small parameters are all-gathered again)."""
    missing = sorted(set(best) - set(parameters))
    if missing:
        raise RuntimeError(f"the best weights do not fit the model: unknown {missing[:5]}")
    with torch.no_grad():
        if _zero3(engine):
            from deepspeed.utils import safe_set_local_fp32_param

            # Gathered copies outlive a forward pass (the reuse distance keeps them) and would shadow the
            # restored partitions: release every one first, as DeepSpeed does around a checkpoint load.
            engine.optimizer.checkpoint_event_prologue()
            for name, entry in best.items():
                param = parameters[name]
                master = entry["master"].to(param.ds_tensor.device)
                safe_set_local_fp32_param(param, master)
                param.ds_tensor.data.copy_(master.view_as(param.ds_tensor).to(param.ds_tensor.dtype))
            # Parameters under the persistence threshold are used gathered, never re-gathered per forward:
            # gather them again from the restored partitions (DeepSpeed's own step after a load).
            engine.optimizer.checkpoint_event_epilogue()
            return
        for name, entry in best.items():
            param = parameters[name]
            param.data.copy_(entry["working"].to(param.device))
            fragment = _master_fragment(param)
            if fragment is not None and "master" in entry:
                fragment.data.copy_(entry["master"].to(fragment.device))


def _master_fragment(param: nn.Parameter) -> torch.Tensor | None:
    """ZeRO-1/2: the slice of this parameter's fp32 master that this rank's optimizer owns (None when it
    owns none), the mapping `deepspeed.utils.safe_get_full_fp32_param` itself reads."""
    mapping = getattr(param, "_hp_mapping", None)
    return mapping.get_hp_fragment() if mapping is not None else None

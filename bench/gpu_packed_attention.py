"""Packed (padding-free) attention on the GPU: each sequence of a packed row gets the logits it gets alone.

    python bench/gpu_packed_attention.py --attn sdpa --json /tmp/packed.json
    python bench/gpu_packed_attention.py --attn flash_attention_2     # flash-attn's varlen path
Exits 1 on a mismatch, a non-finite gradient or a check too weak to see cross-sequence attention.
Method and tolerances: bench/README.md ("gpu_packed_attention.py")."""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for _src in (REPO_ROOT / "operator", REPO_ROOT / "trainer_image", REPO_ROOT / "testing"):
    if str(_src) not in sys.path:
        sys.path.insert(0, str(_src))

SHAPES = {
    "gpu": {"hidden": 1024, "layers": 4, "heads": 16, "kv_heads": 4, "intermediate": 2816, "vocab": 32000,
            "lengths": [97, 512, 33, 301, 170]},
    "cpu": {"hidden": 256, "layers": 2, "heads": 4, "kv_heads": 1, "intermediate": 512, "vocab": 4096,
            "lengths": [17, 64, 9, 40]},
}
# Largest relative logit error (||packed - alone|| / ||alone||, per sequence) taken as a match. In bf16 the
# packed row and the single sequences run different kernel shapes: up to 1.2e-2 was seen on CPU (sdpa,
# the GPU shape), ~1e-6 in fp32; a leak across sequences gives ~1 (the control below).
TOLERANCE = {"bfloat16": 5e-2, "float32": 1e-4}
# The control (the same row with no position ids: one causal sequence, attending across the boundaries)
# must differ by this many tolerances, or the check could not see a leak at all.
CONTROL_MARGIN = 10.0
# Larger than Llama's 0.02 so that attention changes the logits visibly (random weights at 0.02 leave
# the residual stream almost equal to the embeddings, which would hide a cross-sequence leak).
INITIALIZER_RANGE = 0.1


class CheckFailed(Exception):
    """The packed path broke: the script exits 1 with this message."""


def relative_error(candidate, reference) -> float:
    difference = (candidate.float() - reference.float()).norm()
    return float(difference / reference.float().norm().clamp_min(1e-12))


def build_model(shape: dict, *, attn: str, device, dtype):
    import torch
    from transformers import LlamaForCausalLM

    from kubetune_testing.tiny import llama_config

    config = llama_config(shape["vocab"], hidden=shape["hidden"], layers=shape["layers"], heads=shape["heads"],
                          intermediate=shape["intermediate"], kv_heads=shape["kv_heads"])
    config.initializer_range = INITIALIZER_RANGE
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation=attn)
    model.config.use_cache = False  # as modeling.load_model does
    return model


def packed_row(lengths: list[int], vocab: int, seed: int, torch):
    """The trainer's padding-free row (`text.packed_batch`) of random sequences of the given lengths."""
    from kubetune_trainer import text

    rng = random.Random(seed)
    examples = []
    for length in lengths:
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        examples.append(text.Example(input_ids=ids, labels=list(ids)))
    return examples, text.packed_batch(examples, torch)


def compare(model, examples: list, batch, device, torch) -> dict:
    """Logits of the packed row vs each sequence alone, and of the control row (no position ids)."""
    ids = batch.tensors["input_ids"].to(device)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=batch.tensors["position_ids"].to(device)).logits[0]
        control = model(input_ids=ids).logits[0]
        errors, control_errors, start = [], [], 0
        for example in examples:
            alone = model(input_ids=torch.tensor([example.input_ids], device=device)).logits[0]
            end = start + len(example.input_ids)
            errors.append(relative_error(packed[start:end], alone))
            if start:  # the first sequence sees nothing before it, in the control too
                control_errors.append(relative_error(control[start:end], alone))
            start = end
    return {"errors": errors, "control_errors": control_errors}


def packed_gradients_finite(model, batch, device, torch) -> float:
    """One backward through the packed row (the varlen backward under flash-attn): its loss, if finite."""
    model.train()
    tensors = {key: value.to(device) for key, value in batch.tensors.items()}
    loss = model(**tensors).loss
    loss.backward()
    value = float(loss.detach())
    bad = [name for name, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    if bad or not math.isfinite(value):
        raise CheckFailed(f"packed backward: loss {value}, non-finite gradients in {bad[:5]}")
    return value


def measure(args: argparse.Namespace) -> dict:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32  # the trainer: bf16 on a bf16 GPU, fp32 on CPU
    shape = SHAPES["gpu" if cuda else "cpu"]
    torch.manual_seed(args.seed)
    model = build_model(shape, attn=args.attn, device=device, dtype=dtype)
    model.eval()
    examples, batch = packed_row(shape["lengths"], shape["vocab"], args.seed, torch)
    found = compare(model, examples, batch, device, torch)
    tolerance = TOLERANCE[str(dtype).removeprefix("torch.")]
    result = {
        "attn_implementation": model.config._attn_implementation, "device": torch.cuda.get_device_name(device)
        if cuda else "cpu", "dtype": str(dtype).removeprefix("torch."), "lengths": shape["lengths"],
        "tolerance": tolerance, "max_error": max(found["errors"]), "errors": found["errors"],
        "control_min_error": min(found["control_errors"]), "control_errors": found["control_errors"],
    }
    if result["attn_implementation"] != args.attn:
        raise CheckFailed(f"asked for attention {args.attn}, transformers used {result['attn_implementation']}")
    if result["max_error"] > tolerance:
        raise CheckFailed(f"{args.attn}: packed logits differ from the sequences run alone: relative error "
                          f"{result['max_error']:.3g} > {tolerance:g} (per sequence {found['errors']})")
    if result["control_min_error"] < CONTROL_MARGIN * tolerance:
        raise CheckFailed(f"{args.attn}: the control row (no position ids) differs by only "
                          f"{result['control_min_error']:.3g}: the check cannot see a cross-sequence leak")
    result["packed_loss"] = packed_gradients_finite(model, batch, device, torch)
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attn", choices=["sdpa", "flash_attention_2", "eager"], default="sdpa")
    parser.add_argument("--cpu-smoke", action="store_true", help="the small CPU shape (automatic without CUDA)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = measure(args)
    except CheckFailed as failure:
        print(f"gpu_packed_attention: FAILED: {failure}", file=sys.stderr)
        return 1
    print(f"packed {result['attn_implementation']} ({result['dtype']}, {result['device']}): max relative logit "
          f"error {result['max_error']:.2e} <= {result['tolerance']:g}; control without position ids "
          f"{result['control_min_error']:.2e}; packed backward finite (loss {result['packed_loss']:.3f})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The trainer's LoRA or QLoRA step on one GPU: tokens/s, MFU, peak memory for Llama-8B / 1B shapes (random weights).

    .venv/bin/python bench/gpu_lora_llama.py --shape 8b --layers 8 --json /tmp/lora8b.json   # on a GPU
    .venv/bin/python bench/gpu_lora_llama.py --shape 1b --method QLoRA     # NF4 base through modeling.load_model
    .venv/bin/python bench/gpu_lora_llama.py --cpu-smoke                   # mechanics, < 30 s
Exits 1 on a non-finite loss or a base that bitsandbytes did not quantize. Method: BENCHMARKS.md ("GPU LoRA step")."""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for _src in (REPO_ROOT / "operator", REPO_ROOT / "trainer_image", REPO_ROOT / "testing"):
    if str(_src) not in sys.path:
        sys.path.insert(0, str(_src))

SHAPES = {
    "8b": {"hidden": 4096, "layers": 32, "heads": 32, "kv_heads": 8, "intermediate": 14336, "vocab": 128256},
    "1b": {"hidden": 2048, "layers": 16, "heads": 32, "kv_heads": 8, "intermediate": 8192, "vocab": 128256},
    "cpu-smoke": {"hidden": 256, "layers": 2, "heads": 4, "kv_heads": 1, "intermediate": 1024, "vocab": 4096},
}

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s. First match on the device name wins (specific first).
PEAK_BF16 = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("GH200", 989.4e12),
    ("H200", 989.4e12),
    ("H100", 989.4e12),
    ("H800", 989.4e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
]

LORA = {"rank": 16, "alpha": 32, "dropout": 0.05, "targetModules": ["all-linear"]}
QUANTIZATION = {"bits": 4, "quantType": "nf4", "doubleQuant": True, "computeDtype": "bfloat16"}  # the CRD defaults


class CheckFailed(Exception):
    """A CUDA path that broke: the script exits 1 with this message."""


def peak_flops(device_name: str) -> float | None:
    for key, value in PEAK_BF16:
        if key.lower() in device_name.lower():
            return value
    return None


def synthetic_rows(count: int, *, seq: int, vocab: int, min_len: int, max_len: int, seed: int, torch) -> list:
    """`count` packed rows of exactly `seq` tokens, each built by the trainer's `text.packed_batch`."""
    from kubetune_trainer import text

    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        examples, used = [], 0
        while used < seq:
            length = min(rng.randint(min_len, max_len), seq - used)
            ids = [rng.randrange(3, vocab) for _ in range(length)]
            examples.append(text.Example(input_ids=ids, labels=list(ids)))
            used += length
        rows.append(text.packed_batch(examples, torch))
    return rows


def method_spec(method: str, *, cuda: bool) -> dict:
    spec = {"task": "CausalLM", "baseModel": {}, "method": {"type": method, "lora": dict(LORA)}}
    if method == "QLoRA":
        spec["method"]["quantization"] = dict(QUANTIZATION, computeDtype="bfloat16" if cuda else "float32")
    return spec


def random_base(shape: dict, *, device, dtype, seq: int):
    """A randomly initialised Llama of `shape`, built directly on the device: (model, params, matmul params)."""
    import torch
    from transformers import LlamaForCausalLM

    from kubetune_testing.tiny import llama_config

    config = llama_config(shape["vocab"], hidden=shape["hidden"], layers=shape["layers"], heads=shape["heads"],
                          intermediate=shape["intermediate"], kv_heads=shape["kv_heads"], max_positions=max(seq, 4096))
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.config.use_cache = False  # as modeling.load_model does
    params = sum(p.numel() for p in model.parameters())
    return model, params, params - model.get_input_embeddings().weight.numel()


def saved_random_base(shape: dict, *, device, dtype, seq: int, workdir: Path) -> tuple[int, int]:
    """The random base saved to `workdir` and freed: (params, matmul params) of the unquantized model."""
    import torch

    model, params, matmul = random_base(shape, device=device, dtype=dtype, seq=seq)
    model.save_pretrained(workdir, safe_serialization=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return params, matmul


def quantized_base(spec: dict, *, device, workdir: Path):
    """The saved base loaded as the trainer loads a QLoRA base (`modeling.load_model`, 4-bit), checked."""
    from kubetune_trainer import modeling

    precision = "bf16" if device.type == "cuda" else "fp32"
    quantized = modeling.load_model(workdir, spec, precision=precision, num_labels=None, label_ids=None,
                                    device=device)
    layers = [(name, module) for name, module in quantized.named_modules()
              if type(module).__name__ == "Linear4bit"]
    if not layers:
        raise CheckFailed("QLoRA: bitsandbytes left every linear layer unquantized (no Linear4bit module)")
    name, module = layers[0]
    quant_type = getattr(module.weight, "quant_type", None)
    if quant_type != QUANTIZATION["quantType"] or module.weight.device.type != device.type:
        raise CheckFailed(f"QLoRA: {name} is {quant_type} on {module.weight.device}, "
                          f"not {QUANTIZATION['quantType']} on {device.type}")
    return quantized, len(layers)


def build(shape: dict, *, device, dtype, gradient_checkpointing: bool, seq: int, method: str = "LoRA",
          workdir: Path | None = None):
    """Random-init base on the device (QLoRA: quantized through the trainer's loader), then the trainer's
    method preparation (checkpointing + LoRA): (model, params, matmul params, trainable, 4-bit layers)."""
    from kubetune_trainer import modeling
    from kubetune_trainer.methods import METHODS

    spec = method_spec(method, cuda=device.type == "cuda")
    quantized_layers = 0
    if method == "QLoRA":
        params, matmul = saved_random_base(shape, device=device, dtype=dtype, seq=seq, workdir=workdir)
        model, quantized_layers = quantized_base(spec, device=device, workdir=workdir)
    else:
        model, params, matmul = random_base(shape, device=device, dtype=dtype, seq=seq)
    model, _ = METHODS[method].prepare(model, spec, gradient_checkpointing=gradient_checkpointing)
    if method != "QLoRA":  # as train.py: a quantized base was placed on its device while it loaded
        model.to(device)
    trainable, _ = modeling.trainable_parameters(model)
    return model, params, matmul, trainable, quantized_layers


def engine_for(model, *, device, autocast_dtype, lr: float):
    import torch

    from kubetune_trainer import distributed
    from kubetune_trainer.step_runner import StepRunner

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    dist = distributed.DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1,
                                backend="nccl" if device.type == "cuda" else "gloo", device=device)
    return StepRunner(model, optimizer, scheduler, dist, None, 1.0, 1, None, autocast_dtype)


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["8b", "1b"], default="8b")
    parser.add_argument("--layers", type=int, help="fewer decoder layers than the shape has (same layer shapes)")
    parser.add_argument("--method", choices=["LoRA", "QLoRA"], default="LoRA",
                        help="QLoRA: the base saved, then loaded 4-bit NF4 by the trainer's modeling.load_model")
    parser.add_argument("--cpu-smoke", action="store_true", help="scaled-down 1B shape on CPU (automatic without CUDA)")
    parser.add_argument("--seq", type=int, help="tokens per packed row (default 2048; 512 for the CPU smoke)")
    parser.add_argument("--min-len", type=int, help="shortest synthetic sequence (default 128; 32 on CPU)")
    parser.add_argument("--max-len", type=int, help="longest synthetic sequence (default 1024; 256 on CPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps (default 3; 1 on CPU)")
    parser.add_argument("--steps", type=int, help="timed steps (default 10; 3 on CPU)")
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's peak dense bf16 TFLOP/s (overrides the table)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser.parse_args(argv)


def run_settings(args, torch) -> dict:
    """Shape, sizes, device and dtype: the GPU shape with CUDA, the scaled-down one on CPU."""
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    small = not cuda
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if not cuda and not args.cpu_smoke:
        print("no CUDA device: running the scaled-down CPU smoke shape", file=sys.stderr)
    shape = dict(SHAPES["cpu-smoke"] if small else SHAPES[args.shape])
    name = "1b-cpu-smoke" if small else args.shape
    if args.layers and args.layers < shape["layers"]:
        name = f"{name}-shaped ({args.layers} of {shape['layers']} layers)"
        shape["layers"] = args.layers
    if args.method == "QLoRA":
        name = f"{name} QLoRA {QUANTIZATION['quantType']}"
    return {"cuda": cuda, "shape_name": name, "shape": shape,
            "seq": args.seq or (512 if small else 2048), "min_len": args.min_len or (32 if small else 128),
            "max_len": args.max_len or (256 if small else 1024),
            "warmup": args.warmup if args.warmup is not None else (1 if small else 3),
            "steps": args.steps or (3 if small else 10), "device": device,
            "dtype": torch.bfloat16 if cuda else torch.float32,  # the trainer: bf16 on a bf16 GPU, fp32 on CPU
            "device_name": torch.cuda.get_device_name(device) if cuda else "cpu"}


def timed_steps(engine, rows: list, warmup: int, cuda: bool, device, torch) -> tuple[list[float], float]:
    """The warm-up steps, then the timed ones between synchronisations: (losses, seconds)."""
    def step(batch) -> float:
        loss = engine.forward(batch.tensors).loss
        value = float(loss.detach().float())  # the trainer reads the loss every micro-step (a sync) too
        engine.backward(loss)
        engine.micro_step(True)
        return value

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    engine.train(True)
    for batch in rows[:warmup]:
        step(batch)
    if cuda:
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    losses = [step(batch) for batch in rows[warmup:]]
    if cuda:
        torch.cuda.synchronize(device)
    return losses, time.perf_counter() - started


def print_summary(result: dict, gradient_checkpointing: bool) -> None:
    r = result
    header = ("shape", "params", "N (flops)", "trainable", "tokens/step", "tokens/s/GPU", "MFU (4N)",
              "HFU", "peak mem GiB", "device")
    row = (r["shape"], f"{r['params'] / 1e9:.3f}B", f"{r['flops_params_N'] / 1e9:.3f}B",
           f"{r['trainable_params'] / 1e6:.1f}M", f"{r['tokens_per_step']:,}", f"{r['tokens_per_second']:,.0f}",
           pct(r["mfu"]), pct(r["hfu"]), fmt(r["peak_memory_gib"], ".1f"), r["device"])
    widths = [max(len(a), len(b)) for a, b in zip(header, row, strict=True)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    recompute = ("on: the forward is recomputed in backward, so the hardware does ~6·N per token (HFU)"
                 if gradient_checkpointing else "off: hardware FLOPs = model FLOPs = 4·N per token")
    peak = r["peak_flops"]
    print(f"gradient checkpointing {recompute}; {r['warmup_steps']} warm-up + {r['timed_steps']} timed steps, "
          f"{r['seconds'] / r['timed_steps'] * 1000:.0f} ms/step; peak {fmt(peak and peak / 1e12, '.1f')} TFLOP/s")


def measure(args: argparse.Namespace) -> dict:
    """Build, step, time; raises CheckFailed when a loss is not finite."""
    import tempfile

    import torch
    from transformers.utils import logging as hf_logging

    s = run_settings(args, torch)
    cuda, device, shape, seq, warmup, steps = s["cuda"], s["device"], s["shape"], s["seq"], s["warmup"], s["steps"]
    hf_logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    loaded = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kubetune-gpu-base-") as workdir:
        model, params, matmul, trainable, quantized_layers = build(
            shape, device=device, dtype=s["dtype"], gradient_checkpointing=args.gradient_checkpointing, seq=seq,
            method=args.method, workdir=Path(workdir))
    quantized = args.method == "QLoRA"
    # as the trainer: bf16 autocast on a bf16 GPU; a quantized base computes in its own dtype, no autocast
    engine = engine_for(model, device=device, autocast_dtype=torch.bfloat16 if cuda and not quantized else None,
                        lr=args.lr)
    load_seconds = time.perf_counter() - loaded
    rows = synthetic_rows(warmup + steps, seq=seq, vocab=shape["vocab"], min_len=s["min_len"],
                          max_len=s["max_len"], seed=args.seed, torch=torch)
    losses, seconds = timed_steps(engine, rows, warmup, cuda, device, torch)
    if not all(math.isfinite(value) for value in losses):
        raise CheckFailed(f"non-finite loss in the timed steps of {s['shape_name']}: {losses}")
    tokens = sum(batch.real_tokens for batch in rows[warmup:])
    tokens_per_second = tokens / seconds
    peak = (args.peak_tflops * 1e12) if args.peak_tflops else (peak_flops(s["device_name"]) if cuda else None)
    hardware_factor = 6 if args.gradient_checkpointing else 4
    return {
        "shape": s["shape_name"], "model": shape, "device": s["device_name"], "method": args.method,
        "dtype": str(s["dtype"]).removeprefix("torch."), "quantization": QUANTIZATION if quantized else None,
        "quantized_layers": quantized_layers, "attn_implementation": model.config._attn_implementation,
        "gradient_checkpointing": args.gradient_checkpointing, "lora": LORA, "params": params,
        "flops_params_N": matmul, "trainable_params": trainable, "seq": seq,
        "sequence_lengths": [s["min_len"], s["max_len"]],
        "tokens_per_step": tokens // steps, "warmup_steps": warmup, "timed_steps": steps, "seconds": seconds,
        "seconds_per_step": seconds / steps, "tokens_per_second": tokens_per_second,
        "model_flops_per_token": 4 * matmul, "hardware_flops_per_token": hardware_factor * matmul,
        "peak_flops": peak, "mfu": 4 * matmul * tokens_per_second / peak if peak else None,
        "hfu": hardware_factor * matmul * tokens_per_second / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "load_seconds": load_seconds, "losses": losses,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = measure(args)
    except CheckFailed as failure:
        print(f"gpu_lora_llama: FAILED: {failure}", file=sys.stderr)
        return 1
    print_summary(result, args.gradient_checkpointing)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The trainer's LoRA step on one GPU: tokens/s, MFU and peak memory for Llama-8B / 1B shapes (random weights).

    .venv/bin/python bench/gpu_lora_llama.py --shape 8b --json /tmp/lora8b.json     # on a GPU
    .venv/bin/python bench/gpu_lora_llama.py --shape 1b --no-gradient-checkpointing
    .venv/bin/python bench/gpu_lora_llama.py --cpu-smoke                            # mechanics, < 30 s
What runs, how MFU and HFU are counted, the CPU smoke shape: BENCHMARKS.md ("GPU LoRA step")."""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for _src in (REPO_ROOT / "operator", REPO_ROOT / "trainer_image"):
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


def build(shape: dict, *, device, dtype, gradient_checkpointing: bool, seq: int):
    """Random-init base on the device, then the trainer's method preparation (checkpointing + LoRA)."""
    import torch
    from transformers import LlamaForCausalLM

    from kubetune_testing.tiny import llama_config
    from kubetune_trainer import modeling
    from kubetune_trainer.methods import METHODS

    config = llama_config(shape["vocab"], hidden=shape["hidden"], layers=shape["layers"], heads=shape["heads"],
                          intermediate=shape["intermediate"], kv_heads=shape["kv_heads"], max_positions=max(seq, 4096))
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.config.use_cache = False  # as modeling.load_model does
    params = sum(p.numel() for p in model.parameters())
    matmul = params - model.get_input_embeddings().weight.numel()
    spec = {"task": "CausalLM", "method": {"type": "LoRA", "lora": dict(LORA)}}
    model, _ = METHODS["LoRA"].prepare(model, spec, gradient_checkpointing=gradient_checkpointing)
    model.to(device)
    trainable, _ = modeling.trainable_parameters(model)
    return model, params, matmul, trainable


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
    return {"cuda": cuda, "shape_name": "1b-cpu-smoke" if small else args.shape,
            "shape": SHAPES["cpu-smoke"] if small else SHAPES[args.shape],
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    import torch
    from transformers.utils import logging as hf_logging

    s = run_settings(args, torch)
    cuda, device, shape, seq, warmup, steps = s["cuda"], s["device"], s["shape"], s["seq"], s["warmup"], s["steps"]
    hf_logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    loaded = time.perf_counter()
    model, params, matmul, trainable = build(shape, device=device, dtype=s["dtype"],
                                             gradient_checkpointing=args.gradient_checkpointing, seq=seq)
    engine = engine_for(model, device=device, autocast_dtype=torch.bfloat16 if cuda else None, lr=args.lr)
    load_seconds = time.perf_counter() - loaded
    rows = synthetic_rows(warmup + steps, seq=seq, vocab=shape["vocab"], min_len=s["min_len"],
                          max_len=s["max_len"], seed=args.seed, torch=torch)
    losses, seconds = timed_steps(engine, rows, warmup, cuda, device, torch)
    tokens = sum(batch.real_tokens for batch in rows[warmup:])
    tokens_per_second = tokens / seconds
    peak = (args.peak_tflops * 1e12) if args.peak_tflops else (peak_flops(s["device_name"]) if cuda else None)
    mfu = 4 * matmul * tokens_per_second / peak if peak else None
    hfu = (6 if args.gradient_checkpointing else 4) * matmul * tokens_per_second / peak if peak else None
    peak_memory = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    if not all(math.isfinite(value) for value in losses):
        print(f"warning: non-finite losses {losses}", file=sys.stderr)

    result = {
        "shape": s["shape_name"], "model": shape, "device": s["device_name"],
        "dtype": str(s["dtype"]).removeprefix("torch."),
        "gradient_checkpointing": args.gradient_checkpointing, "lora": LORA, "params": params,
        "flops_params_N": matmul, "trainable_params": trainable, "seq": seq,
        "sequence_lengths": [s["min_len"], s["max_len"]],
        "tokens_per_step": tokens // steps, "warmup_steps": warmup, "timed_steps": steps, "seconds": seconds,
        "seconds_per_step": seconds / steps, "tokens_per_second": tokens_per_second,
        "model_flops_per_token": 4 * matmul,
        "hardware_flops_per_token": (6 if args.gradient_checkpointing else 4) * matmul,
        "peak_flops": peak, "mfu": mfu, "hfu": hfu, "peak_memory_gib": peak_memory, "load_seconds": load_seconds,
        "losses": losses,
    }
    print_summary(result, args.gradient_checkpointing)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

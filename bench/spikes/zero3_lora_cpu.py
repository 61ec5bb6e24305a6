"""Spike: DeepSpeed ZeRO-3 + peft LoRA on CPU (gloo), the recipe kubetune_trainer.distributed encodes.

    .venv/bin/torchrun --nproc_per_node 2 bench/spikes/zero3_lora_cpu.py --out /tmp/z3   # 2 ranks
    .venv/bin/python bench/spikes/zero3_lora_cpu.py --out /tmp/z3-py                    # no torchrun

What it checks and its options: bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

T0 = time.perf_counter()

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "trainer_image"))

from kubetune_trainer import distributed as kd  # noqa: E402  (needs the sys.path entry above)
from kubetune_trainer.ds_config import deepspeed_config  # noqa: E402

# Step 1 of the recipe: process group + DS_ACCELERATOR before deepspeed (or peft/transformers) is imported.
INFO = kd.init_process_group()

import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

SEQ, ROWS = 32, 16


def log(*args: object) -> None:
    if INFO.is_main:
        print(f"[{time.perf_counter() - T0:6.1f}s]", *args, flush=True)


def model_config() -> LlamaConfig:
    return LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                       vocab_size=256, intermediate_size=128, max_position_embeddings=SEQ)


def lora_config() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def build_model(args: argparse.Namespace, ds: dict, lora_seed: int) -> torch.nn.Module:
    # The base stands for the pretrained model: the same weights in every build and on every rank (ZeRO-3
    # also broadcasts rank 0's when it partitions). Checkpoints leave it out; a resume reloads it.
    torch.manual_seed(0)
    if args.zero_init == "config":
        with kd.zero3_init(ds):
            base = LlamaForCausalLM(model_config())
    elif args.zero_init == "pretrained":
        keep = kd.hf_deepspeed_config(ds)  # transformers holds it by weakref: keep it alive while loading
        base = LlamaForCausalLM.from_pretrained(args.out / "base")
        del keep
    else:
        base = LlamaForCausalLM(model_config())
    log(f"base built ({args.zero_init}): partitioned before initialize: "
        f"{all(hasattr(p, 'ds_id') for p in base.parameters())}")
    torch.manual_seed(lora_seed)
    return get_peft_model(base, lora_config())


def build_engine(args: argparse.Namespace, ds: dict, lora_seed: int):
    model = build_model(args, ds, lora_seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    # Warm up over 2 optimizer steps; DeepSpeed steps it at each accumulation boundary.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 2))
    return kd.wrap_deepspeed(model, optimizer, scheduler, ds)


def micro_batches(micro: int) -> list[dict[str, torch.Tensor]]:
    """This rank's shard of a fixed global set of random rows, cut into micro-batches (cycled)."""
    rows = torch.randint(0, 256, (ROWS * INFO.world_size, SEQ), generator=torch.Generator().manual_seed(1234))
    mine = rows[INFO.rank :: INFO.world_size]
    return [{"input_ids": mine[i : i + micro], "labels": mine[i : i + micro]} for i in range(0, len(mine), micro)]


def train(engine, batches, start: int, steps: int, grad_accum: int) -> tuple[list[float], int]:
    """`steps` optimizer steps from data position `start`; returns the mean loss per step and the new position."""
    losses, window, pos = [], [], start
    while len(losses) < steps:
        result = kd.train_micro_step(engine, batches[pos % len(batches)])
        pos += 1
        window.append(result.loss)
        if result.optimizer_stepped:
            losses.append(kd.all_reduce_mean(torch.stack(window).mean()).item())
            window = []
    assert len(window) == 0 and engine.global_steps == (start + steps * grad_accum) // grad_accum, engine.global_steps
    return losses, pos


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps before the checkpoint")
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--zero-stage", type=int, default=3)
    parser.add_argument("--offload-optimizer", action="store_true")
    parser.add_argument("--offload-params", action="store_true")
    parser.add_argument("--zero-init", choices=["none", "config", "pretrained"], default="none")
    return parser.parse_args()


def spike_ds_config(args: argparse.Namespace) -> dict:
    ds = deepspeed_config(world_size=INFO.world_size, per_device_batch=args.micro_batch, grad_accum=args.grad_accum,
                          zero_stage=args.zero_stage, precision=args.precision, method="LoRA",
                          offload_optimizer=args.offload_optimizer, offload_params=args.offload_params,
                          max_grad_norm=1.0, hidden_size=model_config().hidden_size, accelerator=INFO.device.type)
    if args.zero_stage == 3:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even the tiny LoRA tensors
    return ds


def checkpoint_and_resume(engine, args: argparse.Namespace, ds: dict, batches: list, pos: int):
    """Save a checkpoint, reload it into a fresh engine and check that everything came back; the resumed
    engine."""
    ckpt_dir, tag = args.out / "checkpoints", f"step{engine.global_steps}"
    before = kd.gathered_trainable_state_dict(engine)
    client_state = {"step": engine.global_steps, "epoch": 0, "data_position": pos}  # the same on every rank
    torch.manual_seed(1000 + INFO.rank)  # a rank-specific RNG state, as dropout or sampling would leave
    path = kd.save_checkpoint(engine, ckpt_dir, tag, client_state)
    expected_draw = torch.rand(3)  # what the restored RNG must reproduce
    if INFO.is_main:
        for f in sorted(p for p in ckpt_dir.rglob("*") if p.is_file()):
            log(f"  wrote {f.relative_to(ckpt_dir)} ({f.stat().st_size} bytes)")

    resumed = build_engine(args, ds, lora_seed=99)  # other LoRA init: the adapter must come from the checkpoint
    state = kd.load_checkpoint(resumed, ckpt_dir)  # tag from `latest`
    assert torch.equal(torch.rand(3), expected_draw), "this rank's RNG state not restored"
    assert {k: state[k] for k in client_state} == client_state, state
    assert resumed.global_steps == engine.global_steps, (resumed.global_steps, engine.global_steps)
    assert resumed.lr_scheduler.get_last_lr() == engine.lr_scheduler.get_last_lr()
    after = kd.gathered_trainable_state_dict(resumed)
    if INFO.is_main:
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), "weights differ"
    # One more optimizer step on both engines from the same data: equal only if Adam's moments came back.
    cont_old, _ = train(engine, batches, pos, 1, args.grad_accum)
    cont_new, _ = train(resumed, batches, state["data_position"], 1, args.grad_accum)
    old_sd, new_sd = kd.gathered_trainable_state_dict(engine), kd.gathered_trainable_state_dict(resumed)
    if INFO.is_main:
        assert cont_old == cont_new, (cont_old, cont_new)
        assert all(torch.equal(old_sd[k], new_sd[k]) for k in old_sd), "optimizer state not restored"
    log(f"checkpoint {path.name} reloaded into a fresh engine: weights, RNG, counters, LR and next-step loss "
        f"{cont_new[0]:.4f} identical")
    return resumed


def export_adapter(resumed, args: argparse.Namespace) -> None:
    """Gather the adapter (every rank takes part), write it on rank 0 and check peft reads it back."""
    adapter = kd.gathered_trainable_state_dict(resumed)
    module_keyed = kd.gathered_trainable_state_dict(resumed, peft_keys=False)
    if not INFO.is_main:
        return
    # The other way to write it: PeftModel.save_pretrained with the module-keyed dict, on rank 0 only.
    resumed.module.save_pretrained(str(args.out / "via_save_pretrained"), state_dict=module_keyed)
    via = load_file(str(args.out / "via_save_pretrained" / "adapter_model.safetensors"))
    assert via.keys() == adapter.keys() and all(torch.equal(via[k], adapter[k]) for k in via), "save_pretrained"
    save_file({k: v.contiguous() for k, v in adapter.items()}, str(args.out / "adapter_model.safetensors"))
    resumed.module.peft_config["default"].save_pretrained(str(args.out))
    shapes = {k: list(v.shape) for k, v in adapter.items()}
    for name, shape in shapes.items():
        print(f"  {name} {shape} {adapter[name].dtype}", flush=True)
    (args.out / "adapter_shapes.json").write_text(json.dumps(shapes, indent=1))
    # The same keys and shapes as a plain single-process peft model, and loadable by peft.
    torch.manual_seed(0)
    plain = get_peft_model(LlamaForCausalLM(model_config()), lora_config())
    ref = get_peft_model_state_dict(plain)
    assert {k: list(v.shape) for k, v in ref.items()} == shapes, "keys/shapes differ from single process"
    assert all(v.numel() > 0 for v in adapter.values())
    loaded = PeftModel.from_pretrained(LlamaForCausalLM(model_config()), str(args.out))
    got = get_peft_model_state_dict(loaded)
    disk = load_file(str(args.out / "adapter_model.safetensors"))
    assert all(torch.equal(got[k].to(disk[k].dtype), disk[k]) for k in disk), "PeftModel reload differs"
    log(f"adapter: {len(adapter)} tensors written to {args.out}/adapter_model.safetensors, reloaded by PeftModel")


def main() -> None:
    args = parse_args()
    hf_logging.set_verbosity_error()
    log(f"world_size={INFO.world_size} backend={INFO.backend} device={INFO.device} args={vars(args)}")
    ds = spike_ds_config(args)
    if args.zero_init == "pretrained" and INFO.is_main:
        torch.manual_seed(0)
        LlamaForCausalLM(model_config()).save_pretrained(args.out / "base")
    kd.barrier()

    engine = build_engine(args, ds, lora_seed=0)
    lora = [p for n, p in engine.module.named_parameters() if "lora_" in n]
    log(f"engine ready: zero stage {engine.zero_optimization_stage()}, bf16={engine.bfloat16_enabled()}, "
        f"LoRA tensors partitioned: {all(hasattr(p, 'ds_id') and p.numel() == 0 for p in lora)}, "
        f"slice numels on this rank: {sorted({p.ds_tensor.numel() for p in lora if hasattr(p, 'ds_tensor')})}")

    batches = micro_batches(args.micro_batch)
    t_train = time.perf_counter()
    losses, pos = train(engine, batches, 0, args.steps, args.grad_accum)
    log(f"trained {args.steps} steps in {time.perf_counter() - t_train:.1f}s; loss per step:",
        " ".join(f"{x:.4f}" for x in losses))
    assert losses[-1] < losses[0], "loss did not go down"

    resumed = checkpoint_and_resume(engine, args, ds, batches, pos)
    export_adapter(resumed, args)
    kd.barrier()
    log(f"OK total {time.perf_counter() - T0:.1f}s")
    kd.cleanup()


if __name__ == "__main__":
    main()

"""The causal-LM baseline of bench/quality_causal.py: a plain TRL `SFTTrainer` script, as a TRL user
starts one (packing off, LoRA through `peft_config`, completion-only loss: TRL's default for
prompt-completion data). Runs on its own too:

    .venv/bin/python bench/trl_baseline.py --model DIR --train train.jsonl --eval heldout.jsonl \
        --out DIR --steps 300 --batch 16 --lr 2e-3 --max-length 128 --rank 8 --alpha 16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("--model", "--train", "--eval", "--out"):
        parser.add_argument(name, type=Path, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--max-length", type=int, required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--alpha", type=int, required=True)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)

    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    data = load_dataset("json", data_files={"train": str(args.train), "eval": str(args.eval)})
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    peft_config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout,
                             target_modules=args.targets.split(","), task_type="CAUSAL_LM")
    config = SFTConfig(
        output_dir=str(args.out), max_steps=args.steps, per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=args.batch, gradient_accumulation_steps=1, learning_rate=args.lr,
        lr_scheduler_type="linear", warmup_steps=args.warmup_ratio,  # below 1: a share of max_steps
        max_length=args.max_length, packing=False,
        bf16=False, eval_strategy="no", save_strategy="no", report_to=[], seed=args.seed, logging_steps=50,
        use_cpu=True, dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=data["train"], eval_dataset=data["eval"],
                         processing_class=tokenizer, peft_config=peft_config)
    train_started = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - train_started
    evaluated = trainer.evaluate()
    trainer.save_model(str(args.out / "adapter"))
    logged = [entry for entry in trainer.state.log_history if "num_tokens" in entry]
    report = {"steps": trainer.state.global_step, "train_seconds": train_seconds,
              "train_runtime": result.metrics["train_runtime"],
              "real_tokens": int(logged[-1]["num_tokens"]) if logged else None,
              "eval_loss": evaluated["eval_loss"], "train_loss": result.training_loss,
              "wall_seconds": time.perf_counter() - started}
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Effective training throughput: kubetune's trainer vs a "seed-style" Hugging Face pipeline, on CPU.

    .venv/bin/python bench/trainer_throughput.py                  # defaults, about 1-3 minutes on 2 cores
    .venv/bin/python bench/trainer_throughput.py --smoke --json /tmp/tp.json   # CI-sized, < 40 s

What is measured, and how the two pipelines differ: bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for _src in (REPO_ROOT / "operator", REPO_ROOT / "trainer_image"):
    if str(_src) not in sys.path:
        sys.path.insert(0, str(_src))

SHARED = Path(os.environ.get("KUBETUNE_SHARED", REPO_ROOT.parent / "shared"))
CLINC = Path("datasets") / "clinc150" / "data_full.json"
SEED_MAX_LENGTH = 512

DEFAULTS = {"steps": 60, "batch": 8, "examples": 2000, "hidden": 256, "layers": 4, "heads": 4,
            "intermediate": 688}
SMOKE = {"steps": 3, "batch": 4, "examples": 200, "hidden": 64, "layers": 2, "heads": 4, "intermediate": 128}


def clinc_path() -> Path:
    path = SHARED / CLINC
    if not path.is_file():
        sys.exit(f"CLINC150 not found at {path}: the benchmark reads ../shared in place (or set KUBETUNE_SHARED)")
    return path


def load_pairs(n: int, seed: int) -> tuple[list[dict], list[str]]:
    """First `n` CLINC150 train utterances after a seeded shuffle, as prompt-completion pairs, plus the texts
    the tokenizer is trained on (every train utterance and intent name, so nothing is out of vocabulary)."""
    rows = json.loads(clinc_path().read_text())["train"]
    texts = [utterance for utterance, _ in rows] + sorted({intent.replace("_", " ") for _, intent in rows})
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    pairs = [{"prompt": utterance, "completion": intent.replace("_", " ")} for utterance, intent in rows[:n]]
    return pairs, texts


def build_model(directory: Path, texts: list[str], *, hidden: int, layers: int, heads: int, intermediate: int,
                seed: int) -> dict:
    """A random Llama + word-level tokenizer saved to `directory` (offline; `kubetune_testing.tiny`)."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from kubetune_testing.tiny import llama_config, make_tokenizer

    hf_logging.disable_progress_bar()
    tokenizer = make_tokenizer(texts)
    config = llama_config(len(tokenizer), hidden=hidden, layers=layers, heads=heads, intermediate=intermediate,
                          max_positions=4096)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return {"vocab": len(tokenizer), "hidden": hidden, "layers": layers, "heads": heads,
            "intermediate": intermediate, "params": sum(p.numel() for p in model.parameters())}


# --- kubetune -----------------------------------------------------------------------------------------


def job_config(model_dir: Path, data: Path, out: Path, *, steps: int, batch: int, lr: float, seed: int,
               validation_split: float):
    """The JobConfig the trainer reads, through the operator's own validation and defaulting."""
    from kubetune.api import jobconfig
    from kubetune.api.validation import validate

    spec = {
        "baseModel": {"uri": f"file://{model_dir}"},
        "task": "CausalLM",
        "dataset": {"uri": f"file://{data}", "format": "prompt-completion", "validationSplit": validation_split,
                    "seed": seed},
        "method": {"type": "LoRA", "lora": {"rank": 16, "alpha": 32, "dropout": 0.05,
                                            "targetModules": ["q_proj", "v_proj"]}},
        "training": {"maxSteps": steps, "learningRate": lr, "perDeviceBatchSize": batch, "effectiveBatchSize": batch,
                     "maxSeqLength": SEED_MAX_LENGTH, "precision": "FP32", "gradientCheckpointing": False,
                     "packing": True, "evalSteps": steps, "checkpointSteps": 1_000_000, "seed": seed},
        "distributed": {"nodes": 1, "gpusPerNode": 0, "processesPerNode": 1, "deepspeed": {"enabled": False}},
        "output": {"uri": f"file://{out}"},
    }
    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": "throughput", "namespace": "bench", "uid": "uid-throughput", "generation": 1},
           "spec": spec}
    result = validate(doc, local=True)
    if not result.ok:
        raise SystemExit(f"the benchmark's FineTuneJob does not validate: {result.errors}")
    return jobconfig.job_config("bench", "throughput", "uid-throughput", result.defaulted["spec"])


@contextlib.contextmanager
def restored_environ():
    """The trainer sets RANK/WORLD_SIZE/... for its 1-rank process group; don't let them reach HF Trainer."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_kubetune(model_dir: Path, pairs: list[dict], tmp: Path, *, steps: int, batch: int, lr: float, seed: int,
                 validation_split: float) -> dict:
    from kubetune_trainer import train

    tmp.mkdir(parents=True, exist_ok=True)
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    config = job_config(model_dir, data, tmp / "out", steps=steps, batch=batch, lr=lr, seed=seed,
                        validation_split=validation_split)
    started = time.perf_counter()
    with restored_environ():
        manifest = train.run(config, work_dir=tmp / "work")
    wall = time.perf_counter() - started
    training = manifest["training"]
    real = int(training["realTokens"])
    padding = float(training["paddingFraction"])
    total = round(real / (1 - padding)) if padding < 1 else real
    seconds = float(training["trainSeconds"])
    return {"pipeline": "kubetune", "steps": int(training["steps"]), "examples": steps * batch,
            "real_tokens": real, "total_tokens": total, "padding_fraction": padding, "seconds": seconds,
            "real_tokens_per_second": real / max(seconds, 1e-9), "wall_seconds_incl_load_eval_publish": wall,
            "train_examples": manifest["dataset"]["trainExamples"],
            "validation_examples": manifest["dataset"]["validationExamples"]}


# --- seed-style -----------------------------------------------------------------------------------------


class CountingCollator:
    """Wraps a collator and records each batch's real (attention-mask) and total token counts."""

    def __init__(self, inner):
        self.inner = inner
        self.real: list[int] = []
        self.total: list[int] = []

    def __call__(self, features):
        batch = self.inner(features)
        mask = batch["attention_mask"]
        self.real.append(int(mask.sum()))
        self.total.append(int(mask.numel()))
        return batch


def run_seed(model_dir: Path, pairs: list[dict], tmp: Path, *, steps: int, batch: int, lr: float, seed: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for pair in pairs:
        encoded = tokenizer(pair["prompt"] + " " + pair["completion"], padding="max_length",
                            max_length=SEED_MAX_LENGTH, truncation=True)
        rows.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, index: int) -> dict:
            return rows[index]

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                             target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(tmp / "seed-out"), max_steps=steps, per_device_train_batch_size=batch,
                             learning_rate=lr, eval_strategy="no", save_strategy="no", logging_strategy="no",
                             report_to="none", dataloader_num_workers=0, use_cpu=True,
                             disable_tqdm=True, seed=seed)  # gradient checkpointing: off by default
    collator = CountingCollator(DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), data_collator=collator)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    trained = steps  # gradient accumulation 1: one collated batch per optimizer step
    real, total = sum(collator.real[:trained]), sum(collator.total[:trained])
    return {"pipeline": "seed", "steps": int(trainer.state.global_step), "examples": steps * batch,
            "real_tokens": real, "total_tokens": total, "padding_fraction": 1 - real / max(total, 1),
            "seconds": seconds, "real_tokens_per_second": real / max(seconds, 1e-9),
            "batches_collated": len(collator.real)}


# --- report ---------------------------------------------------------------------------------------------


def table(results: list[dict], ratio: float) -> str:
    header = ("pipeline", "steps", "real tokens", "total tokens", "padding", "seconds", "real tok/s")
    lines = [header]
    for r in results:
        lines.append((r["pipeline"], str(r["steps"]), f"{r['real_tokens']:,}", f"{r['total_tokens']:,}",
                      f"{r['padding_fraction']:.3f}", f"{r['seconds']:.2f}", f"{r['real_tokens_per_second']:,.0f}"))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths,
                                                                                                  strict=True)))
           for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    out.append(f"ratio kubetune/seed (real tokens/s): {ratio:.1f}x")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model and run for CI (< 40 s)")
    parser.add_argument("--steps", type=int, help=f"optimizer steps (default {DEFAULTS['steps']})")
    parser.add_argument("--batch", type=int, help=f"examples per optimizer step (default {DEFAULTS['batch']})")
    parser.add_argument("--examples", type=int, help=f"CLINC150 examples used (default {DEFAULTS['examples']})")
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--intermediate", type=int)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--validation-split", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, one per core)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    base = SMOKE if args.smoke else DEFAULTS
    settings = {key: getattr(args, key) if getattr(args, key) is not None else value for key, value in base.items()}

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    pairs, texts = load_pairs(settings["examples"], args.seed)
    with tempfile.TemporaryDirectory(prefix="kubetune-throughput-") as scratch:
        tmp = Path(scratch)
        model_dir = tmp / "model"
        model = build_model(model_dir, texts, hidden=settings["hidden"], layers=settings["layers"],
                            heads=settings["heads"], intermediate=settings["intermediate"], seed=args.seed)
        common = {"steps": settings["steps"], "batch": settings["batch"], "lr": args.lr, "seed": args.seed}
        kubetune = run_kubetune(model_dir, pairs, tmp / "kubetune", validation_split=args.validation_split, **common)
        seed = run_seed(model_dir, pairs, tmp / "seed", **common)
    ratio = kubetune["real_tokens_per_second"] / max(seed["real_tokens_per_second"], 1e-9)
    load_after = os.getloadavg()[0]
    print(f"model: random Llama {model}, torch threads {torch.get_num_threads()}; "
          f"{settings['examples']} CLINC150 pairs, batch {settings['batch']}, {settings['steps']} steps")
    print(table([kubetune, seed], ratio))
    if load_before > 1 or load_after > torch.get_num_threads() + 1:  # this run itself adds about its threads
        print(f"warning: 1-minute load average {load_before:.1f} before, {load_after:.1f} after on "
              f"{os.cpu_count()} CPUs: other processes competed for the cores (torch's threads spin-wait, so "
              "small steps suffer most); rerun on a quiet machine", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": {**settings, "lr": args.lr, "seed": args.seed,
                                                      "validation_split": args.validation_split,
                                                      "seed_max_length": SEED_MAX_LENGTH, "smoke": args.smoke},
                                         "model": model, "torch_threads": torch.get_num_threads(),
                                         "load_average": {"before": load_before, "after": load_after},
                                         "results": {"kubetune": kubetune, "seed": seed}, "ratio": ratio},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Causal-LM side-by-side: `kubetune local` (subprocess, a FineTuneJob YAML, CausalLM, LoRA) against a
plain TRL `SFTTrainer` script (bench/trl_baseline.py, packing off), at equal optimizer steps and batch,
on a support-desk corpus this script generates, with one tiny Llama both start from.

    .venv/bin/python bench/quality_causal.py --json /tmp/causal.json     # about 5-10 minutes on 2 cores
    .venv/bin/python bench/quality_causal.py --smoke --json /tmp/c.json  # CI-sized, < 60 s

Reported per pipeline: real (non-padding) tokens/s, held-out loss, wall from process start to end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

REPO_ROOT = Path(__file__).resolve().parents[1]
for _src in (REPO_ROOT / "operator", REPO_ROOT / "trainer_image", REPO_ROOT / "testing"):
    if str(_src) not in sys.path:
        sys.path.insert(0, str(_src))

DEFAULTS = {"steps": 200, "batch": 16, "train": 3000, "heldout": 300, "hidden": 128, "layers": 4}
SMOKE = {"steps": 4, "batch": 4, "train": 64, "heldout": 16, "hidden": 32, "layers": 1}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CITIES = ["oslo", "lima", "cairo", "quito", "perth", "dakar", "hanoi", "porto", "tunis", "riga", "sofia", "kyiv",
          "bern", "accra", "delhi", "seoul", "lagos", "minsk", "baku", "doha"]
ITEMS = ["kettle", "toaster", "blender", "lamp", "heater", "fan", "radio", "camera", "printer", "router", "monitor",
         "keyboard", "speaker", "charger", "drill", "mixer", "scale", "iron", "clock", "tablet"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
NAMES = ["ana", "ben", "chen", "dara", "eli", "fatima", "goran", "hana", "ivan", "jun", "kofi", "lena", "mario",
         "nadia", "omar", "priya", "quinn", "rosa", "sven", "tara", "umar", "vera", "wei", "ximena", "yusuf", "zoe"]


def support_corpus(n: int, seed: int) -> list[dict]:
    """Support-desk prompt/completion pairs: the answer greets the customer by name, copies the request's
    slots (order number, city, item, day) and recalls fixed facts a model must learn (each city's opening
    hour, each item's warranty); names and order numbers keep exact repeats rare."""
    rng = random.Random(seed)
    hours = {city: f"{7 + i % 5}am" for i, city in enumerate(CITIES)}
    warranty = {item: str(1 + i % 4) for i, item in enumerate(ITEMS)}
    rows = []
    for _ in range(n):
        order, city, item, day = rng.randint(100, 999), rng.choice(CITIES), rng.choice(ITEMS), rng.choice(DAYS)
        name, days = rng.choice(NAMES), rng.randint(2, 9)
        kind = rng.randrange(4)
        if kind == 0:
            ask = f"where is my order {order} ?"
            answer = f"order {order} left our {city} warehouse on {day} and arrives in {days} days ."
        elif kind == 1:
            ask = f"i want a refund for the {item} from order {order} ."
            answer = f"the refund for your {item} is approved and reaches your card in {days} days ."
        elif kind == 2:
            ask = f"when does the {city} store open on {day} ?"
            answer = f"on {day} the {city} store opens at {hours[city]} ."
        else:
            ask = f"how long is the warranty on the {item} from order {order} ?"
            answer = f"the {item} from order {order} has a {warranty[item]} year warranty ."
        # " " first: TRL joins prompt + completion as text
        rows.append({"prompt": f"customer {name} : {ask} agent :", "completion": f" hello {name} , {answer}"})
    return rows


def build_model(directory: Path, texts: list[str], *, hidden: int, layers: int, seed: int) -> None:
    """The tiny Llama both pipelines start from. Its tokenizer prepends BOS, as Llama's does: TRL's
    tokenization (prompt + completion + EOS, special tokens from the tokenizer) then yields exactly the
    token ids and loss mask kubetune builds (BOS + prompt, masked; completion + EOS, trained)."""
    import torch
    from tokenizers.processors import TemplateProcessing
    from transformers import LlamaForCausalLM

    from kubetune_testing.tiny import llama_config, make_tokenizer

    tokenizer = make_tokenizer(texts)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.bos_token_id)])
    torch.manual_seed(seed)
    config = llama_config(len(tokenizer), hidden=hidden, layers=layers, heads=4, intermediate=hidden * 2)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def check_same_tokens(model_dir: Path, rows: list[dict]) -> None:
    """kubetune's tokenization and TRL's agree on ids and on which tokens carry the loss."""
    from transformers import AutoTokenizer
    from trl.trainer.sft_trainer import common_prefix_length

    from kubetune_trainer import text

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = [type("Record", (), {"fields": row, "line": i})() for i, row in enumerate(rows)]
    ours, _ = text.tokenize(records, "prompt-completion", tokenizer, 10_000)
    for row, example in zip(rows, ours, strict=True):
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        full = tokenizer(row["prompt"] + row["completion"] + tokenizer.eos_token)["input_ids"]
        start = common_prefix_length(prompt_ids, full)
        trained = [token if i >= start else text.IGNORE for i, token in enumerate(full)]
        if full != example.input_ids or trained != example.labels:
            raise SystemExit(f"TRL and kubetune tokenize {row} differently:\n{full}\n{example.input_ids}")


def job_yaml(model_dir: Path, train: Path, heldout: Path, *, steps: int, batch: int, lr: float,
             max_length: int, rank: int, alpha: int, seed: int) -> str:
    import yaml

    spec = {"baseModel": {"uri": f"file://{model_dir}"}, "task": "CausalLM",
            "dataset": {"uri": f"file://{train}", "validationUri": f"file://{heldout}", "format": "prompt-completion"},
            "method": {"type": "LoRA",
                       "lora": {"rank": rank, "alpha": alpha, "dropout": 0.05, "targetModules": TARGETS}},
            "training": {"maxSteps": steps, "learningRate": lr, "perDeviceBatchSize": batch,
                         "maxSeqLength": max_length, "evalSteps": steps, "seed": seed,
                         "scheduler": {"type": "linear", "warmupRatio": 0.1}},
            "distributed": {"nodes": 1, "gpusPerNode": 0, "processesPerNode": 1, "deepspeed": {"enabled": False}},
            "output": {"uri": "file:///unused"}}
    return yaml.safe_dump({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
                           "metadata": {"name": "support-desk", "namespace": "bench"}, "spec": spec}, sort_keys=False)


def run_kubetune(tmp: Path, job: str, env: dict, overrides: list[str]) -> dict:
    (tmp / "job.yaml").write_text(job)
    kubetune = Path(sys.executable).parent / "kubetune"
    started = time.perf_counter()
    done = subprocess.run([str(kubetune), "local", "-f", str(tmp / "job.yaml"), "--run-dir", str(tmp / "run"),
                           *[f"--set={item}" for item in overrides]],
                          capture_output=True, text=True, check=False, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"kubetune local exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    (manifest_path,) = [p for p in (tmp / "run" / "storage").rglob("manifest.json") if "merged" not in p.parts]
    manifest = json.loads(manifest_path.read_text())
    training = manifest["training"]
    algorithm, _, hexdigest = manifest["digest"].partition(":")
    adapter = manifest_path.parent / "adapter" / f"{algorithm}-{hexdigest}"
    return {"pipeline": "kubetune local", "steps": int(training["steps"]), "real_tokens": int(training["realTokens"]),
            "train_seconds": float(training["trainSeconds"]), "own_eval_loss": manifest["metrics"]["eval_loss"],
            "wall_seconds": wall, "adapter": str(adapter)}


def run_trl(tmp: Path, model_dir: Path, train: Path, heldout: Path, env: dict, **settings) -> dict:
    args = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "trl_baseline.py"), "--model", str(model_dir),
                           "--train", str(train), "--eval", str(heldout), "--out", str(tmp / "trl"),
                           "--targets", ",".join(TARGETS), *args],
                          capture_output=True, text=True, check=False, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"trl_baseline.py exited {done.returncode}:\n{done.stderr[-4000:]}")
    report = json.loads((tmp / "trl" / "report.json").read_text())
    return {"pipeline": "TRL SFTTrainer", "steps": report["steps"], "real_tokens": report["real_tokens"],
            "train_seconds": report["train_seconds"], "own_eval_loss": report["eval_loss"], "wall_seconds": wall,
            "adapter": str(tmp / "trl" / "adapter")}


def heldout_loss(model_dir: Path, adapter: Path, rows: list[dict]) -> float:
    """Mean loss per trained token (completion + EOS) over the held-out file, the same arithmetic for
    both adapters: each pipeline's own evaluation averages differently (TRL per batch)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune_trainer import text

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).eval()
    records = [type("Record", (), {"fields": row, "line": i})() for i, row in enumerate(rows)]
    examples, _ = text.tokenize(records, "prompt-completion", tokenizer, 10_000)
    total, count = 0.0, 0
    with torch.inference_mode():
        for example in examples:
            ids = torch.tensor([example.input_ids])
            logits = model(input_ids=ids).logits[0, :-1]
            labels = torch.tensor(example.labels[1:])
            trained = labels != text.IGNORE
            total += torch.nn.functional.cross_entropy(logits[trained], labels[trained], reduction="sum").item()
            count += int(trained.sum())
    return total / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes for CI (< 60 s)")
    for name in ("steps", "batch", "train", "heldout", "hidden", "layers"):
        parser.add_argument(f"--{name}", type=int)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of both pipelines (default 1)")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                        help="passed to `kubetune local --set` (e.g. training.packing=false)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    sizes = {k: getattr(args, k) or v for k, v in (SMOKE if args.smoke else DEFAULTS).items()}
    load_before = common.load_average()
    with tempfile.TemporaryDirectory(prefix="kubetune-causal-bench-") as tmp_name:
        tmp = Path(tmp_name)
        rows = support_corpus(sizes["train"] + sizes["heldout"], args.seed)
        train_rows = rows[: sizes["train"]]
        seen = {(r["prompt"], r["completion"]) for r in train_rows}  # held out means unseen: kubetune drops copies
        heldout_rows = [r for r in rows[sizes["train"]:] if (r["prompt"], r["completion"]) not in seen]
        train = tmp / "train.jsonl"
        heldout = tmp / "heldout.jsonl"
        train.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
        heldout.write_text("".join(json.dumps(r) + "\n" for r in heldout_rows))
        model_dir = tmp / "model"
        build_model(model_dir, [r["prompt"] + r["completion"] for r in rows], hidden=sizes["hidden"],
                    layers=sizes["layers"], seed=args.seed)
        check_same_tokens(model_dir, rows[:200])
        shared = {"steps": sizes["steps"], "batch": sizes["batch"], "lr": args.lr, "max_length": args.max_length,
                  "rank": args.rank, "alpha": args.alpha, "seed": args.seed}
        # The same threads for both: this machine is shared, and OpenMP threads past the free cores spin-wait
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WANDB_DISABLED": "true"}
        kubetune = run_kubetune(tmp, job_yaml(model_dir, train, heldout, **shared), env, args.set)
        trl = run_trl(tmp, model_dir, train, heldout, env, **shared)
        for result in (kubetune, trl):
            result["heldout_loss"] = heldout_loss(model_dir, Path(result.pop("adapter")), heldout_rows)
            result["real_tokens_per_second"] = result["real_tokens"] / result["train_seconds"]
    report = {"settings": {**sizes, **{k: v for k, v in shared.items() if k not in sizes},
                           "heldout_unseen": len(heldout_rows), "threads": args.threads,
                           "kubetune_set": args.set},
              "load_before": load_before, "load_after": common.load_average(),
              "results": {"kubetune": kubetune, "trl": trl},
              "tokens_per_second_ratio": kubetune["real_tokens_per_second"] / trl["real_tokens_per_second"],
              "wall_ratio": kubetune["wall_seconds"] / trl["wall_seconds"]}
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def table(report: dict) -> str:
    lines = ["| pipeline | steps | real tokens | real tokens/s | held-out loss | own eval loss | wall s |",
             "|---|---|---|---|---|---|---|"]
    for result in report["results"].values():
        lines.append(f"| {result['pipeline']} | {result['steps']} | {result['real_tokens']:,} | "
                     f"{result['real_tokens_per_second']:,.0f} | {result['heldout_loss']:.4f} | "
                     f"{result['own_eval_loss']:.4f} | {result['wall_seconds']:.1f} |")
    lines.append(f"\nkubetune / TRL: tokens/s x{report['tokens_per_second_ratio']:.2f}, "
                 f"wall x{report['wall_ratio']:.2f}; load {report['load_before']} -> {report['load_after']}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

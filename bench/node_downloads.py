"""Bytes the trainer downloads per pod (node), before and after once-per-node downloads.

    .venv/bin/python bench/node_downloads.py                      # about 10 minutes on 2 cores
    .venv/bin/python bench/node_downloads.py --smoke --json /tmp/nd.json   # CI-sized: this tree only

Each pod is launched as the operator renders it (`python -m kubetune_trainer.launch`) against SeaweedFS
behind `kubetune_testing.counting_proxy`; what runs and how "before" is measured: bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from common import free_port  # noqa: E402
from kubetune.api import jobconfig  # noqa: E402
from kubetune.api.validation import validate  # noqa: E402
from kubetune_testing import seaweedfs  # noqa: E402
from kubetune_testing.counting_proxy import CountingProxy  # noqa: E402
from kubetune_testing.tiny import make_tiny_llama  # noqa: E402

MODEL = f"s3://{seaweedfs.BUCKET}/bench/model/"
DATA = f"s3://{seaweedfs.BUCKET}/bench/train.jsonl"
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu",
         "nu", "xi", "omicron", "pi", "rho", "sigma", "tau"]


def corpus(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        words = [WORDS[(i + k) % len(WORDS)] for k in range(8)]
        # the row number keeps rows distinct: copies of training rows would be dropped from validation
        rows.append({"prompt": " ".join(words[:3]), "completion": " ".join(words[3:]) + f" {i}"})
    return rows


def job_config(endpoint: str, pods: int, procs: int) -> jobconfig.JobConfig:
    spec = {
        "baseModel": {"uri": MODEL.rstrip("/")},
        "task": "CausalLM",
        "dataset": {"uri": DATA, "format": "prompt-completion", "validationSplit": 0.2},
        "method": {"type": "LoRA", "lora": {"rank": 4, "alpha": 16, "targetModules": ["q_proj", "v_proj"]}},
        "training": {"maxSteps": 1, "learningRate": 0.01, "perDeviceBatchSize": 2, "maxSeqLength": 32,
                     "precision": "FP32", "gradientCheckpointing": False, "evalSteps": 1, "checkpointSteps": 1000},
        "distributed": {"nodes": pods, "gpusPerNode": 0, "processesPerNode": procs, "deepspeed": {"enabled": False}},
        "output": {"uri": f"s3://{seaweedfs.BUCKET}/bench/jobs", "endpoint": endpoint},
    }
    name = f"nd-{pods}x{procs}"
    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": name, "namespace": "bench", "uid": f"uid-{name}", "generation": 1}, "spec": spec}
    result = validate(doc, local=True)
    assert result.ok, result.errors
    return jobconfig.job_config("bench", name, f"uid-{name}", result.defaulted["spec"], None)


def source_tree(revision: str, root: Path) -> Path:
    """`revision`'s operator/ and trainer_image/ unpacked (git archive: the repository is not touched)."""
    tree = root / f"tree-{revision}"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "operator", "trainer_image"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def launch(config: jobconfig.JobConfig, pods: int, procs: int, work: Path, tree: Path | None,
           shared_work_dir: bool) -> None:
    """`pods` pods of `procs` processes, each pod launched as rendered, all at once (one torchrun each)."""
    config_path = work / "config.json"
    config_path.write_text(config.to_json())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(work),
           "AWS_ACCESS_KEY_ID": seaweedfs.ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": seaweedfs.SECRET_KEY}
    if tree is not None:  # the old code first on the path (the editable install's finder comes after it)
        env["PYTHONPATH"] = f"{tree / 'operator'}:{tree / 'trainer_image'}"
    port = free_port()
    running = []
    for pod in range(pods):
        pod_env = dict(env)
        if shared_work_dir:
            pod_env["KUBETUNE_WORK_DIR"] = str(work / f"pod-{pod}")
        command = [sys.executable, "-m", "kubetune_trainer.launch", "--nnodes", str(pods), "--node-rank", str(pod),
                   "--nproc-per-node", str(procs), "--master-addr", "127.0.0.1", "--master-port", str(port),
                   "--module", "kubetune_trainer", "--config", str(config_path)]
        log = open(work / f"pod-{pod}.log", "w")  # noqa: SIM115 (closed below)
        running.append((subprocess.Popen(command, env=pod_env, stdout=log, stderr=subprocess.STDOUT), log))
    for process, log in running:
        code = process.wait(timeout=900)
        log.close()
        if code != 0:
            raise SystemExit(f"a pod exited {code}: {(work / 'pod-0.log').read_text()[-3000:]}")


def measure(proxy: CountingProxy, pods: int, procs: int, root: Path, tree: Path | None, label: str) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"{label}-{pods}x{procs}-", dir=root))
    proxy.traffic.reset()
    # before: the pod as the old operator rendered it, no work dir (each process made its own temp dir)
    launch(job_config(proxy.endpoint, pods, procs), pods, procs, work, tree, shared_work_dir=tree is None)
    model = proxy.traffic.downloaded(f"/{seaweedfs.BUCKET}/bench/model/")
    data = proxy.traffic.downloaded(f"/{seaweedfs.BUCKET}/bench/train.jsonl")
    return {"tree": label, "pods": pods, "processes_per_pod": procs, "model_bytes": model, "data_bytes": data}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="4718b31", help="the revision measured as 'before'")
    parser.add_argument("--layouts", nargs="+", default=["1x1", "1x2", "1x4", "2x2"], help="PODSxPROCESSES")
    parser.add_argument("--smoke", action="store_true", help="1 pod x 1 process, this tree only")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    layouts = [(1, 1)] if args.smoke else [tuple(int(n) for n in layout.split("x")) for layout in args.layouts]
    with tempfile.TemporaryDirectory(prefix="node-downloads-") as tmp:
        root = Path(tmp)
        (root / "weed").mkdir()
        weed = seaweedfs.start(root / "weed")
        try:
            store = weed.server.store()
            model_dir = make_tiny_llama(root / "model", [" ".join(r.values()) for r in corpus(40)])
            model_files = sorted(p for p in model_dir.rglob("*") if p.is_file())
            for path in model_files:
                store.upload_file(path, MODEL + str(path.relative_to(model_dir)))
            data = "".join(json.dumps(r) + "\n" for r in corpus(64)).encode()
            store.write(DATA, data)
            model_size = sum(p.stat().st_size for p in model_files)
            trees = [("after", None)] if args.smoke else [("before", source_tree(args.before, root)), ("after", None)]
            results = []
            with CountingProxy(weed.server.endpoint) as proxy:
                for pods, procs in layouts:
                    for label, tree in trees:
                        row = measure(proxy, pods, procs, root, tree, label)
                        row["model_copies_per_pod"] = row["model_bytes"] / model_size / pods
                        row["data_copies_per_pod"] = row["data_bytes"] / len(data) / pods
                        results.append(row)
                        print(json.dumps(row), flush=True)
        finally:
            weed.stop()
    report = {"model_bytes": model_size, "data_bytes": len(data), "before": args.before, "results": results}
    print("| tree | pods x processes | model bytes fetched | per pod | data bytes fetched | per pod |")
    print("|---|---|---|---|---|---|")
    for row in results:
        print(f"| {row['tree']} | {row['pods']} x {row['processes_per_pod']} | {row['model_bytes']:,} | "
              f"{row['model_copies_per_pod']:g} copies | {row['data_bytes']:,} | "
              f"{row['data_copies_per_pod']:g} copies |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

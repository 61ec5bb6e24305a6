"""Real training on CPU with tiny models: fixtures that build jobs the way the operator would.

Jobs are resolved through the same validation/defaulting as the operator (`validate(..., local=True)`)
and handed to the trainer as a `JobConfig`, exactly what the ConfigMap carries in a cluster. Outputs
go to a `file://` directory; the S3 path is covered by the integration tests.
"""

from __future__ import annotations

import copy
import json
import random
import subprocess
from pathlib import Path

from kubetune.api import jobconfig, storage_layout
from kubetune.api.validation import validate
from kubetune.clients.storage import ObjectStore

_WORD_TEXT = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
              "upsilon phi chi psi omega red green blue yellow black white one two three four five six")
WORDS = tuple(_WORD_TEXT.split())


def lm_corpus(n: int = 96, seed: int = 0) -> list[dict]:
    """Prompt-completion pairs with a rule a tiny model can learn fast: words follow a fixed cycle, so
    every next word is determined by the current one (loss can fall far below the unigram entropy)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start = rng.randrange(len(WORDS))
        words = [WORDS[(start + i) % len(WORDS)] for i in range(rng.randint(6, 10))]
        rows.append({"prompt": " ".join(words[:3]), "completion": " ".join(words[3:])})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def job_spec(model_dir: Path, data: Path, out: Path, **overrides) -> dict:
    spec = {
        "baseModel": {"uri": f"file://{model_dir}"},
        "task": "CausalLM",
        "dataset": {"uri": f"file://{data}", "format": "prompt-completion", "validationSplit": 0.2},
        "method": {"type": "LoRA", "lora": {"rank": 4, "alpha": 16, "dropout": 0.0,
                                            "targetModules": ["q_proj", "v_proj"]}},
        "training": {"maxSteps": 30, "learningRate": 0.01, "perDeviceBatchSize": 8, "maxSeqLength": 64,
                     "precision": "FP32", "gradientCheckpointing": False, "evalSteps": 10, "checkpointSteps": 1000},
        "distributed": {"nodes": 1, "gpusPerNode": 0, "processesPerNode": 1, "deepspeed": {"enabled": False}},
        "output": {"uri": f"file://{out}"},
    }
    for path, value in overrides.items():
        node = spec
        parts = path.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = copy.deepcopy(value)
    return spec


def make_config(spec: dict, *, name: str = "job", allow_cpu_qlora: bool = False,
                stage: jobconfig.Stage | None = None) -> jobconfig.JobConfig:
    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": name, "namespace": "test", "uid": f"uid-{name}", "generation": 1}, "spec": spec}
    if allow_cpu_qlora:
        # The API refuses QLoRA without GPUs (pointless in production); the trainer itself runs it on
        # CPU (bitsandbytes NF4 works there), which is what this test exercises.
        doc = copy.deepcopy(doc)
        doc["spec"]["distributed"]["gpusPerNode"] = 1
    result = validate(doc, local=True)
    assert result.ok, result.errors
    resolved = result.defaulted["spec"]
    if allow_cpu_qlora:
        resolved["distributed"]["gpusPerNode"] = 0
    return jobconfig.job_config("test", name, f"uid-{name}", resolved, stage)


def run_in_process(config: jobconfig.JobConfig, work_dir: Path) -> dict:
    from kubetune_trainer import train

    return train.run(config, work_dir=work_dir)


def run_pods(config: jobconfig.JobConfig, tmp_path: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """The job's rendered PyTorchJob, its pods run as the training operator would (processes per pod and
    nodes from spec.distributed); the master's exit code, and every pod's output as stdout and stderr."""
    from .rendered import run_from_config

    run = run_from_config(config, tmp_path / f"pods-{config.job.name}")
    run.start()
    run.wait(timeout)
    master = run.pod()
    output = "\n".join(p.log.read_text(errors="replace") for p in run.history if p.log.exists())
    return subprocess.CompletedProcess(["pods"], master.exit_code if master.exit_code is not None else -1,
                                       output, output)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def manifest_of(config: jobconfig.JobConfig) -> dict | None:
    raw = ObjectStore().read(config.storage.manifest_uri)
    return json.loads(raw) if raw else None


def adapter_dir(config: jobconfig.JobConfig, manifest: dict) -> Path:
    prefix = storage_layout.adapter_prefix(config.storage.job_prefix, manifest["digest"])
    return Path(storage_layout.split_uri(prefix)[2])


def losses(manifest: dict) -> list[float]:
    return [h["trainLoss"] for h in manifest["training"]["history"] if "trainLoss" in h]

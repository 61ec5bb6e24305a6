"""A FineTuneJob rendered by the operator's own code, and run as the training operator would run it."""

from __future__ import annotations

import json
from pathlib import Path

from kubetune.api import jobconfig
from kubetune.api.validation import validate
from kubetune_operator import backends
from kubetune_operator.render.training import RenderSettings
from kubetune_testing.training_operator import PyTorchJobRun


def defaulted_job(spec: dict, name: str, namespace: str = "test") -> dict:
    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "generation": 1}, "spec": spec}
    result = validate(doc, local=True)  # file:// outputs, as the trainer tests use
    assert result.ok, result.errors
    return result.defaulted


def render_run(spec: dict, name: str, root: Path, stage: jobconfig.Stage | None = None,
               secrets: dict | None = None) -> tuple[PyTorchJobRun, jobconfig.JobConfig]:
    """The stage's ConfigMap and PyTorchJob exactly as the operator renders them, ready to start."""
    config_map, pytorchjob = backends.render_children(defaulted_job(spec, name), RenderSettings(), stage)
    config = jobconfig.JobConfig.from_json(config_map["data"][jobconfig.CONFIG_FILE])
    run = PyTorchJobRun(pytorchjob, root, config_maps={config_map["metadata"]["name"]: config_map["data"]},
                        secrets=secrets or {})
    return run, config


def json_lines(log: Path) -> list[dict]:
    lines = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
    return lines

"""Builders of valid kubetune objects for tests; each test mutates a fresh copy."""

from __future__ import annotations

import copy


def finetunejob(**spec_overrides) -> dict:
    doc = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "llama-lora", "namespace": "team-a", "uid": "0b7f-uid", "generation": 1},
        "spec": {
            "baseModel": {"uri": "hf://meta-llama/Llama-2-7b-hf", "revision": "abc123"},
            "dataset": {"uri": "s3://data/train.jsonl", "format": "chat"},
            "method": {"type": "LoRA", "lora": {"rank": 16}},
            "training": {"epochs": 3},
            "distributed": {"nodes": 2, "gpusPerNode": 8},
            "output": {
                "uri": "s3://adapters/team-a",
                "endpoint": "http://127.0.0.1:8333",
                "credentials": {"secretName": "s3-creds"},
            },
        },
    }
    doc["spec"].update(copy.deepcopy(spec_overrides))
    return doc


# What the data stage reports for a small clean dataset (the result contract's `data` document).
DATA_REPORT = {
    "digest": "sha256:" + "a" * 64,
    "examples": {"train": 180, "validation": 20},
    "invalidLines": 0,
    "labels": [],
    "tokens": {"train": {"p50": 24, "p95": 41, "max": 80}, "validation": {"p50": 23, "p95": 40, "max": 66}},
    "truncated": {"train": 0.0, "validation": 0.0},
    "duplicates": {"withinTrain": 0, "withinValidation": 0, "acrossSplits": 0},
    "leakage": {"policy": "Drop", "matched": 0, "dropped": 0},
}


def data_result(job: dict, report: dict | None = None) -> dict:
    """The result.json a data stage writes at its prefix (the trainer's `finish_stage` document)."""
    meta = job["metadata"]
    return {"api": "kubetune.io/stage-result/v1", "kind": "data",
            "job": {"namespace": meta["namespace"], "name": meta["name"], "uid": meta["uid"]},
            "createdAt": "2026-11-28T10:59:00Z", "data": copy.deepcopy(report or DATA_REPORT)}


def data_validated(job: dict, report: dict | None = None) -> dict:
    """`job` as it is once its data stage has succeeded: status.data filled, the GPU stages next."""
    name = job["metadata"]["name"]
    status = job.setdefault("status", {})
    status["data"] = {"job": f"{name}-data", "state": "Succeeded", **copy.deepcopy(report or DATA_REPORT)}
    return job


def adapterdeployment() -> dict:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": "support", "namespace": "team-a"},
        "spec": {
            "baseModel": {"uri": "hf://meta-llama/Llama-2-7b-hf"},
            "runtime": {"managed": {"replicas": 2}},
            "adapters": [{"name": "support-bot", "source": {"fineTuneJobRef": {"name": "llama-lora"}}}],
            "strategy": {
                "type": "Canary",
                "canary": {"steps": [{"setWeight": 10}, {"analysis": {}}, {"setWeight": 100}]},
            },
        },
    }


def set_path(doc: dict, path: str, value) -> dict:
    """Return a copy of doc with a dotted path set (value None deletes)."""
    doc = copy.deepcopy(doc)
    node = doc
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    if value is None:
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = value
    return doc


# GitOps tracking metadata (Argo CD, Flux) as it appears on synced objects: the operator must never copy
# it onto children (tests/unit/test_gitops_hygiene.py, tests/integration/test_gitops_hygiene.py).
TRACKING_LABELS = {
    "app.kubernetes.io/instance": "team-a-apps",
    "argocd.argoproj.io/instance": "team-a-apps",
    "kustomize.toolkit.fluxcd.io/name": "team-a",
    "kustomize.toolkit.fluxcd.io/namespace": "flux-system",
    "helm.toolkit.fluxcd.io/name": "team-a",
    "helm.toolkit.fluxcd.io/namespace": "flux-system",
}
TRACKING_ANNOTATIONS = {
    "argocd.argoproj.io/tracking-id": "team-a-apps:kubetune.io/FineTuneJob:team-a/llama-lora",
    "argocd.argoproj.io/sync-options": "Prune=false",
    "argocd.argoproj.io/compare-options": "IgnoreExtraneous",
    "kustomize.toolkit.fluxcd.io/checksum": "flux-checksum-5f1d",
    "helm.toolkit.fluxcd.io/driftDetection": "flux-drift-disabled",
}


def sweep_row(rank: int, state: str, metric: float | None, *, rung: int, lr: float = 2e-4, **extra) -> dict:
    """One config's row of status.sweep as the sweep's trainer writes it (alpha 2 x rank, as the factory's
    LoRA alpha/rank ratio; 10 steps at rung 0, doubling per rung)."""
    out = {"name": f"r{rank}-lr{lr:.3g}", "rank": rank, "alpha": 2 * rank, "learningRate": lr, "state": state,
           "steps": 10 * 2 ** rung, "rung": rung, **extra}
    if metric is not None:
        out["metric"] = metric
    return out

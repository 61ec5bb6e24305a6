"""GitOps hygiene: no object the operator creates carries its parent's GitOps tracking metadata.

Argo CD claims objects by the label `app.kubernetes.io/instance` (default) or the annotation
`argocd.argoproj.io/tracking-id`; Flux by `kustomize.toolkit.fluxcd.io/*` and `helm.toolkit.fluxcd.io/*`
labels. A child carrying them would be shown out of sync with, and pruned by, the parent's Application or
Kustomization. Every kind of child is rendered here through the real pure functions from parents that
carry all of those keys (in metadata, and in the drift retrain template's metadata)."""

from __future__ import annotations

import copy
import json

import pytest

from kubetune.api import serving
from kubetune.api.validation import validate
from kubetune_operator.reconcile import driftloop as dl
from kubetune_operator.reconcile import finetunejob as ftj
from kubetune_operator.render import gitops
from kubetune_operator.render import serving as serving_render
from kubetune_testing.factories import (
    TRACKING_ANNOTATIONS,
    TRACKING_LABELS,
    adapterdeployment,
    data_validated,
    finetunejob,
)

NOW = "2026-11-28T12:00:00Z"

USER_LABELS = {"team": "a", "cost-center": "ml"}
USER_ANNOTATIONS = {"owner": "alice@example.com"}


def tracked(doc: dict) -> dict:
    doc = copy.deepcopy(doc)
    doc["metadata"]["labels"] = {**TRACKING_LABELS, **USER_LABELS}
    doc["metadata"]["annotations"] = {**TRACKING_ANNOTATIONS, **USER_ANNOTATIONS}
    doc["metadata"].setdefault("uid", "uid-parent")
    return doc


def metadata_maps(obj) -> list[dict]:
    """Every labels / annotations map anywhere in an object (metadata, pod templates, ...)."""
    found = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("labels", "annotations") and isinstance(value, dict):
                found.append(value)
            found += metadata_maps(value)
    elif isinstance(obj, list):
        for value in obj:
            found += metadata_maps(value)
    return found


def assert_clean(child: dict, parent: dict) -> None:
    where = f"{child['kind']} {child['metadata']['name']}"
    for mapping in metadata_maps(child):
        leaked = sorted(k for k in mapping if gitops.is_tracking_key(k))
        assert not leaked, f"{where} carries GitOps tracking keys {leaked}"
    for value in (v for v in TRACKING_ANNOTATIONS.values() if len(v) > 12):
        assert value not in json.dumps(child), f"{where} carries the parent's tracking id"
    assert (child["kind"], child["metadata"]["name"]) != (parent["kind"], parent["metadata"]["name"]), \
        f"{where} is its parent"
    assert child["metadata"]["ownerReferences"][0]["uid"] == parent["metadata"]["uid"]


def decide_children(job: dict) -> list[dict]:
    plan = ftj.decide(ftj.Observed(job=job, now=NOW), ftj.Settings())
    assert plan.create, plan.status
    return plan.create


def test_the_helper_strips_exactly_the_tracking_keys():
    mixed = {**TRACKING_LABELS, **TRACKING_ANNOTATIONS, **USER_LABELS, **USER_ANNOTATIONS,
             "app.kubernetes.io/name": "x", "argocd.argoproj.io": "not a prefix match"}
    assert gitops.without_tracking(mixed) == {**USER_LABELS, **USER_ANNOTATIONS, "app.kubernetes.io/name": "x",
                                              "argocd.argoproj.io": "not a prefix match"}
    assert gitops.without_tracking(None) == {}


@pytest.mark.parametrize("stage, spec, kinds", [
    ("data", {}, {"ConfigMap", "PyTorchJob"}),
    ("training", {}, {"ConfigMap", "PyTorchJob"}),
    ("baseline", {"baseline": {"target": {"metric": "eval_loss", "value": 1.0}}}, {"ConfigMap", "PyTorchJob"}),
    ("sweep", {"rankSweep": {"ranks": [4, 8, 16]}}, {"ConfigMap", "PyTorchJob"}),
])
def test_finetunejob_children_of_every_stage_carry_no_tracking_keys(stage, spec, kinds):
    job = tracked(finetunejob(**spec))
    if stage != "data":  # the GPU stages come once the data stage has succeeded
        job = data_validated(job)
    children = decide_children(job)
    assert {c["kind"] for c in children} == kinds
    if stage == "sweep":
        assert [c["metadata"]["name"] for c in children] == ["llama-lora-rank-sweep-config", "llama-lora-rank-sweep"]
    for child in children:
        assert_clean(child, job)


def test_training_after_the_sweep_carries_no_tracking_keys():
    job = data_validated(tracked(finetunejob(rankSweep={"ranks": [4, 8]})))
    job["status"] |= {"phase": "Sweeping", "sweep": {"job": "llama-lora-rank-sweep", "state": "Succeeded", "trials": [
        {"rank": 4, "alpha": 8, "learningRate": 2e-4, "state": "Succeeded", "metric": 0.5, "rung": 0},
        {"rank": 8, "alpha": 16, "learningRate": 2e-4, "state": "Stopped", "metric": 0.6, "rung": 0}]}}
    children = decide_children(job)
    assert [c["metadata"]["name"] for c in children] == ["llama-lora-config", "llama-lora"]
    for child in children:
        assert_clean(child, job)


def test_adapterdeployment_children_carry_no_tracking_keys():
    doc = tracked(adapterdeployment())
    result = validate(doc)
    assert result.ok, result.errors
    adep = {**doc, "spec": result.defaulted["spec"]}
    desired = serving.DesiredState(generation=1)
    children = serving_render.render_children(adep, serving_render.ServingSettings(), desired, max_lora_rank=16)
    assert [c["kind"] for c in children] == ["ConfigMap", "ServiceAccount", "Role", "RoleBinding", "Deployment",
                                             "Service"]
    for child in children:
        assert_clean(child, adep)


def drift_adep() -> dict:
    doc = tracked(adapterdeployment())
    doc["spec"]["trafficSampling"] = {"rate": 1.0, "uri": "s3://samples/support"}
    doc["spec"]["adapters"][0]["drift"] = {
        "retrain": {"labelledData": {"uri": "s3://labels/support/", "minExamples": 50},
                    "template": {"metadata": {"labels": {**TRACKING_LABELS, **USER_LABELS},
                                              "annotations": {**TRACKING_ANNOTATIONS, **USER_ANNOTATIONS}},
                                 "spec": {"baseModel": {"uri": "hf://meta-llama/Llama-2-7b-hf"},
                                          "task": "SequenceClassification", "training": {"epochs": 2},
                                          "output": {"uri": "s3://adapters/retrains"}}}},
    }
    result = validate(doc)
    assert result.ok, result.errors
    return {**doc, "spec": result.defaulted["spec"]}


def test_drift_retrain_finetunejob_keeps_user_metadata_but_no_tracking_keys():
    adep = drift_adep()
    adapter = adep["spec"]["adapters"][0]
    data = dl.RetrainData("s3://data/train.jsonl", "s3://data/val.jsonl", "s3://data/orig.jsonl", "s3://data/new.jsonl",
                          "text-label")
    job = dl.retrain_job(adep, adapter, dl.retrain_job_name("support", "support-bot", 1), data,
                         "s3://archive/manifest.json")
    assert_clean(job, adep)
    assert job["metadata"]["labels"] == {**USER_LABELS, dl.LABEL_RETRAIN_OF: "support",
                                         dl.LABEL_RETRAIN_ADAPTER: "support-bot"}
    assert job["metadata"]["annotations"] == USER_ANNOTATIONS
    assert validate(job).ok
    # ... and the retrain FineTuneJob's own children are clean too
    job = {**job, "metadata": {**job["metadata"], "uid": "uid-retrain", "generation": 1}}
    for child in decide_children(job):
        assert_clean(child, job)

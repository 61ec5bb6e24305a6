"""Rendering of a FineTuneJob's children: shape, schemas, secrets, determinism."""

from __future__ import annotations

import functools
import json

import jsonschema
import kubernetes_validate
import pytest
import yaml

from kubetune.api.schema import strict_json_schema
from kubetune.api.validation import validate
from kubetune_operator.backends import render_children
from kubetune_operator.render import training as render
from kubetune_testing.factories import finetunejob
from tests.conftest import shared_file

SETTINGS = render.RenderSettings(trainer_image="registry.local/kubetune/trainer:test")


@functools.cache
def pytorchjob_validator() -> jsonschema.Draft4Validator:
    crd = yaml.safe_load(shared_file("schemas", "kubeflow.org_pytorchjobs.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = strict_json_schema(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft4Validator(schema)


def children(doc: dict) -> tuple[dict, dict]:
    result = validate(doc)
    assert result.ok, result.errors
    config_map, pytorchjob = render_children(result.defaulted, SETTINGS)
    return config_map, pytorchjob


EXAMPLES = {
    "lora-2x8-zero3": finetunejob(),
    "single-node": finetunejob(distributed={"nodes": 1, "gpusPerNode": 1}),
    "qlora": finetunejob(method={"type": "QLoRA", "quantization": {}, "lora": {"rank": 64}},
                         distributed={"nodes": 1, "gpusPerNode": 1, "deepspeed": {"enabled": False}}),
    "cpu": finetunejob(distributed={"nodes": 1, "gpusPerNode": 0, "processesPerNode": 2,
                                    "deepspeed": {"enabled": False}}, training={"epochs": 1, "precision": "FP32"}),
    "scheduled": finetunejob(
        scheduling={"nodeSelector": {"gpu": "h100"}, "tolerations": [{"key": "gpu", "operator": "Exists"}],
                    "priorityClassName": "batch", "queueName": "team-a"},
        runPolicy={"backoffLimit": 1, "activeDeadlineSeconds": 3600, "ttlSecondsAfterFinished": 60,
                   "suspend": True},
        resources={"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"memory": "64Gi"}},
        baseModel={"uri": "hf://org/model", "credentials": {"secretName": "hf"}},
        dataset={"uri": "s3://data/x.jsonl", "format": "chat", "s3": {"credentials": {"secretName": "data"}}},
        tracking={"mlflow": {"trackingUri": "https://mlflow.example.com", "credentials": {"secretName": "mlflow"}},
                  "wandb": {"project": "p", "credentials": {"secretName": "wandb"}}}),
}


@pytest.mark.parametrize("name", EXAMPLES)
def test_pytorchjob_matches_the_kubeflow_crd_schema(name):
    _, pytorchjob = children(EXAMPLES[name])
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in pytorchjob_validator().iter_errors(pytorchjob)]
    assert errors == []


@pytest.mark.parametrize("name", EXAMPLES)
def test_config_map_and_pod_template_match_kubernetes_schemas(name):
    config_map, pytorchjob = children(EXAMPLES[name])
    kubernetes_validate.validate(config_map, "1.34", strict=True)
    template = pytorchjob["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", **template["metadata"]},
           "spec": template["spec"]}
    kubernetes_validate.validate(pod, "1.34", strict=True)


def test_master_and_workers_follow_nodes_and_gpus():
    _, pytorchjob = children(finetunejob())
    spec = pytorchjob["spec"]
    assert spec["nprocPerNode"] == "8"
    assert spec["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
    assert spec["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    container = spec["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 8
    assert container["command"][:5] == ["python", "-m", "kubetune_trainer.launch", "--module", "kubetune_trainer"]
    _, single = children(EXAMPLES["single-node"])
    assert set(single["spec"]["pytorchReplicaSpecs"]) == {"Master"}
    _, cpu = children(EXAMPLES["cpu"])
    assert cpu["spec"]["nprocPerNode"] == "2"
    assert "resources" not in cpu["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0] or \
        "nvidia.com/gpu" not in json.dumps(cpu)


def test_shm_volume_security_context_and_config_mount():
    _, pytorchjob = children(finetunejob(resources={"sharedMemory": "32Gi"}))
    pod = pytorchjob["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
    assert volumes["job-config"]["configMap"]["name"] == "llama-lora-config"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = pod["containers"][0]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/dev/shm", "/etc/kubetune/job", "/tmp"} <= mounts


def test_credentials_only_through_secret_key_refs():
    config_map, pytorchjob = children(EXAMPLES["scheduled"])
    env = pytorchjob["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]
    by_name = {e["name"]: e for e in env}
    for var, secret in [("AWS_ACCESS_KEY_ID", "s3-creds"), ("AWS_SECRET_ACCESS_KEY", "s3-creds"),
                        ("HF_TOKEN", "hf"), ("KUBETUNE_DATA_AWS_ACCESS_KEY_ID", "data"),
                        ("MLFLOW_TRACKING_TOKEN", "mlflow"), ("WANDB_API_KEY", "wandb")]:
        assert "value" not in by_name[var]
        assert by_name[var]["valueFrom"]["secretKeyRef"]["name"] == secret
    # the job config names Secrets, never carries values, and no env var carries a literal credential
    assert all("valueFrom" in e for e in env if "KEY" in e["name"] or "TOKEN" in e["name"])
    assert "secretKeyRef" not in config_map["data"]["config.json"]


def test_run_policy_scheduling_and_queue_pass_through():
    _, pytorchjob = children(EXAMPLES["scheduled"])
    run_policy = pytorchjob["spec"]["runPolicy"]
    assert run_policy["suspend"] is True
    assert run_policy["backoffLimit"] == 1
    assert run_policy["activeDeadlineSeconds"] == 3600
    assert run_policy["ttlSecondsAfterFinished"] == 60
    assert run_policy["schedulingPolicy"] == {"priorityClass": "batch"}  # a Kueue queue is no Volcano field
    assert pytorchjob["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    pod = pytorchjob["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    assert pod["priorityClassName"] == "batch"
    container = pod["containers"][0]
    assert container["resources"]["requests"]["memory"] == "64Gi"


def test_children_are_owned_labelled_and_deterministic():
    first = children(finetunejob())
    second = children(finetunejob())
    assert first == second
    for child in first:
        owner = child["metadata"]["ownerReferences"][0]
        assert owner == {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "name": "llama-lora",
                         "uid": "0b7f-uid", "controller": True, "blockOwnerDeletion": True}
        assert child["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kubetune-operator"
        assert child["metadata"]["labels"]["kubetune.io/finetunejob"] == "llama-lora"


def test_user_labels_are_not_copied_to_children():
    doc = finetunejob()
    doc["metadata"]["labels"] = {"argocd.argoproj.io/instance": "team-a-jobs", "app.kubernetes.io/instance": "x"}
    for child in children(doc):
        assert "argocd.argoproj.io/instance" not in json.dumps(child)
        assert "app.kubernetes.io/instance" not in child["metadata"]["labels"]  # Argo CD's tracking label
        assert child["metadata"]["labels"]["kubetune.io/finetunejob"] == "llama-lora"


def test_job_config_is_the_resolved_spec_with_storage_layout():
    config_map, _ = children(finetunejob())
    config = json.loads(config_map["data"]["config.json"])
    assert config["api"] == "kubetune.io/jobconfig/v1"
    assert config["job"] == {"namespace": "team-a", "name": "llama-lora", "uid": "0b7f-uid"}
    # dropout: derived by the trainer once the data is loaded (training_defaults.lora_dropout)
    assert config["spec"]["method"]["lora"] == {"rank": 16, "alpha": 32,
                                                "targetModules": ["all-linear"], "useRslora": False}
    assert config["spec"]["training"]["scheduler"] == {"type": "linear"}  # warmupRatio: derived by the trainer
    assert config["storage"]["job_prefix"] == "s3://adapters/team-a/team-a/llama-lora/0b7f-uid/"
    assert config["storage"]["manifest_uri"].endswith("/0b7f-uid/manifest.json")

"""What every stage's children share: names, labels, the job-config ConfigMap, the trainer pod.

Pure. The workload around the pod is its training backend's (kubetune_operator.backends). Names are
deterministic (`<job>`, `<job>-data`, `<job>-baseline`, `<job>-rank-sweep`): reconciles converge on one
of each. The data stage's pod is CPU-only (`DATA_STAGE_RESOURCES`, docs/operations.md says why).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from kubetune.api import jobconfig, storage_location
from kubetune.api import v1alpha1 as api

TRAINER_MODULE = "kubetune_trainer"
CACHE_DIR = "/var/cache/kubetune"
WORK_DIR = f"{CACHE_DIR}/work"  # the trainer's scratch, shared by the pod's processes (KUBETUNE_WORK_DIR)
RUN_AS_USER = 1000

LABEL_JOB = "kubetune.io/finetunejob"
LABEL_STAGE = "kubetune.io/stage"
# Workload names are DNS-1035 labels, and the training operator names a headless Service after each replica
# (`<job>-worker-<index>`, index < distributed.nodes <= 1024): those must be DNS-1035 labels too.
MAX_WORKLOAD_NAME = 63 - len("-worker-1023")
ANNOTATION_CONFIG_HASH = "kubetune.io/config-hash"
# The data stage reads the dataset and the tokenizer's files (no weights) and tokenizes every line on one
# core: a fast tokenizer over ~1M lines fits in a few GiB. No GPU, and no CPU limit (a limit only throttles a
# pod that ends in minutes); the memory limit stops a runaway dataset from starving the node.
DATA_STAGE_RESOURCES = {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "8Gi"}}


@dataclass(frozen=True)
class RenderSettings:
    """Operator-wide settings that shape children (from the operator's flags / Helm values)."""

    trainer_image: str = "ghcr.io/kubetune/trainer:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    default_service_account: str | None = None
    # The operator's storage setting (chart storage.endpoint/region): where a spec names none
    storage: storage_location.StorageLocation = storage_location.AWS


def config_map_name(job_name: str) -> str:
    return f"{job_name}-config"


def workload_name(job_name: str) -> str:
    return job_name


def _suffixed(job_name: str, suffix: str) -> str:
    """`<job>-<suffix>`, shortened with a hash of the job name when it would pass 63 characters."""
    name = f"{job_name}-{suffix}"
    if len(name) <= MAX_WORKLOAD_NAME:
        return name
    digest = hashlib.sha256(job_name.encode()).hexdigest()[:8]
    keep = MAX_WORKLOAD_NAME - len(suffix) - len(digest) - 2
    return f"{job_name[:keep].rstrip('-')}-{digest}-{suffix}"


def stage_job_name(job_name: str, stage: jobconfig.Stage) -> str:
    """The workload of a stage (the training stage keeps the job's own name)."""
    if stage.kind == jobconfig.STAGE_BASELINE:
        return _suffixed(job_name, "baseline")
    if stage.kind == jobconfig.STAGE_SWEEP:
        return _suffixed(job_name, "rank-sweep")
    if stage.kind == jobconfig.STAGE_DATA:
        return _suffixed(job_name, "data")
    return workload_name(job_name)


def stage_config_map_name(job_name: str, stage: jobconfig.Stage) -> str:
    if stage.kind == jobconfig.STAGE_TRAIN:
        return config_map_name(job_name)
    return f"{stage_job_name(job_name, stage)}-config"


def labels(job_name: str, component: str = "training") -> dict[str, str]:
    """Recommended labels, less `app.kubernetes.io/instance` (Argo CD's default tracking label: a child
    carrying it would be claimed by the Application of that name; see render.gitops). User labels are
    deliberately not copied; LABEL_JOB names the FineTuneJob."""
    return {
        "app.kubernetes.io/name": "kubetune-trainer",
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "kubetune",
        "app.kubernetes.io/managed-by": "kubetune-operator",
        LABEL_JOB: job_name,
    }


def owner_reference(job: dict) -> dict:
    return {
        "apiVersion": api.API_VERSION,
        "kind": "FineTuneJob",
        "name": job["metadata"]["name"],
        "uid": job["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def render_job_config(job: dict, stage: jobconfig.Stage | None = None) -> jobconfig.JobConfig:
    meta = job["metadata"]
    # The trainer does not care which workload runs it; leaving spec.backend out keeps every job config
    # (and its config hash) as it was before backends were selectable.
    spec = {key: value for key, value in job["spec"].items() if key != "backend"}
    return jobconfig.job_config(meta["namespace"], meta["name"], meta["uid"], spec, stage)


def config_map_data(job: dict, stage: jobconfig.Stage | None = None) -> dict[str, str]:
    return {jobconfig.CONFIG_FILE: render_job_config(job, stage).to_json()}


def _stage_labels(job_name: str, component: str, stage: jobconfig.Stage) -> dict[str, str]:
    out = labels(job_name, component)
    out[LABEL_STAGE] = stage.kind
    return out


def render_config_map(job: dict, data: dict[str, str] | None = None, stage: jobconfig.Stage | None = None) -> dict:
    meta = job["metadata"]
    stage = stage or jobconfig.Stage()
    data = data if data is not None else config_map_data(job, stage)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": stage_config_map_name(meta["name"], stage),
            "namespace": meta["namespace"],
            "labels": _stage_labels(meta["name"], "job-config", stage),
            "annotations": {ANNOTATION_CONFIG_HASH: config_hash(data)},
            "ownerReferences": [owner_reference(job)],
        },
        "data": data,
    }


def config_hash(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _secret_env(name: str, secret: str, key: str) -> dict:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _s3_env(credentials: dict | None, access_var: str, secret_var: str) -> list[dict]:
    if not credentials:
        return []
    return [
        _secret_env(access_var, credentials["secretName"], credentials["accessKeyIdKey"]),
        _secret_env(secret_var, credentials["secretName"], credentials["secretAccessKeyKey"]),
    ]


def trainer_env(spec: dict, storage: storage_location.StorageLocation = storage_location.AWS) -> list[dict]:
    """Environment of the trainer: credentials only as secretKeyRef, never values; the output's endpoint
    and region as resolved against the operator's `storage` setting (the trainer's stores fall back to
    them where the spec names none, kubetune_trainer.storage)."""
    output = spec["output"]
    env = [
        {"name": "KUBETUNE_JOB_CONFIG", "value": jobconfig.CONFIG_PATH},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "KUBETUNE_WORK_DIR", "value": WORK_DIR},
        {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "TMPDIR", "value": "/tmp"},
        *storage_location.location_env(storage_location.resolve(output, fallback=storage)),
    ]
    env += _s3_env(output.get("credentials"), jobconfig.ENV_S3_ACCESS_KEY, jobconfig.ENV_S3_SECRET_KEY)
    data_creds = spec["dataset"].get("s3", {}).get("credentials")
    env += _s3_env(data_creds, jobconfig.ENV_DATA_S3_ACCESS_KEY, jobconfig.ENV_DATA_S3_SECRET_KEY)
    model = spec["baseModel"]
    if model.get("credentials"):
        env.append(_secret_env(jobconfig.ENV_HF_TOKEN, model["credentials"]["secretName"],
                               model["credentials"]["tokenKey"]))
    env += _s3_env(model.get("s3", {}).get("credentials"), jobconfig.ENV_MODEL_S3_ACCESS_KEY,
                   jobconfig.ENV_MODEL_S3_SECRET_KEY)
    tracking = spec.get("tracking") or {}
    mlflow_creds = (tracking.get("mlflow") or {}).get("credentials")
    if mlflow_creds:
        env.append(_secret_env(jobconfig.ENV_MLFLOW_TOKEN, mlflow_creds["secretName"], mlflow_creds["tokenKey"]))
    wandb_creds = (tracking.get("wandb") or {}).get("credentials")
    if wandb_creds:
        env.append(_secret_env(jobconfig.ENV_WANDB_API_KEY, wandb_creds["secretName"], wandb_creds["apiKeyKey"]))
    return env


def node_layout(spec: dict, stage: jobconfig.Stage) -> tuple[int, int]:
    """(pods, processes per pod) of a stage's workload, whatever its backend."""
    if stage.kind == jobconfig.STAGE_DATA:
        return 1, 1  # one CPU process reads the whole dataset
    distributed = spec["distributed"]
    return distributed["nodes"], distributed["gpusPerNode"] or distributed.get("processesPerNode", 1)


def _resources(spec: dict, stage: jobconfig.Stage) -> dict:
    if stage.kind == jobconfig.STAGE_DATA:
        return {kind: dict(values) for kind, values in DATA_STAGE_RESOURCES.items()}
    resources = spec.get("resources", {})
    gpus = spec["distributed"]["gpusPerNode"]
    requests = dict(resources.get("requests", {}))
    limits = dict(resources.get("limits", {}))
    if gpus:
        # extended resources must have requests == limits
        requests[resources.get("gpuResourceName", "nvidia.com/gpu")] = gpus
        limits[resources.get("gpuResourceName", "nvidia.com/gpu")] = gpus
    out = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def pod_template(job: dict, settings: RenderSettings, stage: jobconfig.Stage, container_name: str) -> dict:
    """The trainer pod of a stage, in the container its backend names."""
    meta, spec = job["metadata"], job["spec"]
    scheduling = spec.get("scheduling", {})
    container = {
        "name": container_name,
        "image": spec.get("image") or settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        # torchrun takes --nnodes/--nproc-per-node/--node-rank/--master-* from the PET_* variables
        # and MASTER_ADDR/PORT that the training operator sets in every replica.
        # kubetune_trainer.launch is torchrun (same arguments, same PET_* variables) but exits with the
        # failing worker's code: torchrun's own 1 would defeat restartPolicy ExitCode (2 vs 143).
        "command": ["python", "-m", f"{TRAINER_MODULE}.launch", "--module", TRAINER_MODULE,
                    "--config", jobconfig.CONFIG_PATH],
        "env": trainer_env(spec, settings.storage),
        "resources": _resources(spec, stage),
        "volumeMounts": [
            {"name": "job-config", "mountPath": jobconfig.CONFIG_MOUNT, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "cache", "mountPath": CACHE_DIR},
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict = {
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "job-config", "configMap": {"name": stage_config_map_name(meta["name"], stage)}},
            {"name": "dshm", "emptyDir": {"medium": "Memory",
                                          "sizeLimit": str(spec.get("resources", {}).get("sharedMemory", "16Gi"))}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "cache", "emptyDir": {}},
        ],
        "automountServiceAccountToken": False,
    }
    service_account = spec.get("serviceAccountName") or settings.default_service_account
    if service_account:
        pod_spec["serviceAccountName"] = service_account
    if scheduling.get("nodeSelector"):
        pod_spec["nodeSelector"] = dict(scheduling["nodeSelector"])
    if scheduling.get("tolerations"):
        pod_spec["tolerations"] = list(scheduling["tolerations"])
    if scheduling.get("affinity"):
        pod_spec["affinity"] = scheduling["affinity"]
    if scheduling.get("priorityClassName"):
        pod_spec["priorityClassName"] = scheduling["priorityClassName"]
    return {"metadata": {"labels": _stage_labels(meta["name"], _component(stage), stage)}, "spec": pod_spec}


def _component(stage: jobconfig.Stage) -> str:
    return {jobconfig.STAGE_BASELINE: "baseline", jobconfig.STAGE_SWEEP: "sweep",
            jobconfig.STAGE_DATA: "data"}.get(stage.kind, "training")


def workload_metadata(job: dict, stage: jobconfig.Stage, config_data: dict[str, str]) -> dict:
    """Metadata of a stage's workload, whatever its backend: name, labels, config hash, owner (a queue's
    label is added by its backend, from backends.kueue)."""
    meta = job["metadata"]
    job_labels = _stage_labels(meta["name"], _component(stage), stage)
    return {
        "name": stage_job_name(meta["name"], stage),
        "namespace": meta["namespace"],
        "labels": job_labels,
        "annotations": {ANNOTATION_CONFIG_HASH: config_hash(config_data)},
        "ownerReferences": [owner_reference(job)],
    }

"""The operator -> trainer contract: the job config file and the trainer's exit codes.

The operator renders a `JobConfig` into a ConfigMap mounted in every training pod; the trainer
(`kubetune_trainer`) reads it with `JobConfig.from_json`. Both sides import this module, and it
imports nothing heavy, so the operator never installs torch. Secrets are never part of it: the
config names Secrets, and their values reach the pod only through `secretKeyRef` env vars.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from . import storage_layout

JOB_CONFIG_API = "kubetune.io/jobconfig/v1"
STAGE_RESULT_API = "kubetune.io/stage-result/v1"
CONFIG_FILE = "config.json"
CONFIG_MOUNT = "/etc/kubetune/job"
CONFIG_PATH = f"{CONFIG_MOUNT}/{CONFIG_FILE}"

# Exit codes. Kubeflow's `restartPolicy: ExitCode` retries 128-255 and never retries 1-127,
# so bad input (which no retry can fix) and transient failures are told apart by the code alone.
EXIT_OK = 0
EXIT_FAILED = 1  # a bug or an unrecoverable training failure (NaN loss, OOM that no retry fixes)
EXIT_BAD_INPUT = 2  # invalid dataset, unknown target module, unreadable model: fix the spec or the data
EXIT_RETRYABLE = 143  # storage or network unavailable, preemption (same as SIGTERM): retried

# Environment variables the operator sets from Secrets (via secretKeyRef), read by the trainer.
ENV_S3_ACCESS_KEY = "AWS_ACCESS_KEY_ID"
ENV_S3_SECRET_KEY = "AWS_SECRET_ACCESS_KEY"
ENV_HF_TOKEN = "HF_TOKEN"
ENV_DATA_S3_ACCESS_KEY = "KUBETUNE_DATA_AWS_ACCESS_KEY_ID"
ENV_DATA_S3_SECRET_KEY = "KUBETUNE_DATA_AWS_SECRET_ACCESS_KEY"
ENV_MODEL_S3_ACCESS_KEY = "KUBETUNE_MODEL_AWS_ACCESS_KEY_ID"
ENV_MODEL_S3_SECRET_KEY = "KUBETUNE_MODEL_AWS_SECRET_ACCESS_KEY"
ENV_MLFLOW_TOKEN = "MLFLOW_TRACKING_TOKEN"
ENV_WANDB_API_KEY = "WANDB_API_KEY"


@dataclass(frozen=True)
class JobIdentity:
    namespace: str
    name: str
    uid: str


STAGE_TRAIN = "train"  # train and publish the adapter
STAGE_BASELINE = "baseline"  # evaluate the base model on the validation split, write result.json, stop
# the rank sweep: every rank (x learning rate) config in one process, successive halving on a holdout of
# the training split, the table written to result.json
STAGE_SWEEP = "sweep"
# the data stage: a CPU-only pod (tokenizer files only, no weights) that parses, validates, splits,
# tokenizes and measures the dataset, writes result.json {"data": DataReport} and stops; bad data exits 2
STAGE_DATA = "data"


@dataclass(frozen=True)
class Stage:
    """Which of a FineTuneJob's stages this PyTorchJob runs (all stages share one trainer image)."""

    kind: str = STAGE_TRAIN
    holdout_fraction: float | None = None  # sweep: share of the training split held out for scoring
    # train: the separate baseline job's metrics, so training does not evaluate the base model again
    baseline_metrics: dict | None = None


@dataclass(frozen=True)
class JobStorage:
    job_prefix: str  # s3://bucket/prefix/<namespace>/<name>/<uid>/ (a stage's own prefix under it)
    checkpoints_prefix: str
    manifest_uri: str  # written last: its presence means "published"
    result_uri: str = ""  # baseline, data and sweep stages: their result.json, written last


@dataclass(frozen=True)
class JobConfig:
    job: JobIdentity
    spec: dict  # the FineTuneJob spec with every default applied (the resolved config)
    storage: JobStorage
    stage: Stage = field(default_factory=Stage)
    api: str = JOB_CONFIG_API

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> JobConfig:
        raw = json.loads(text)
        if raw.get("api") != JOB_CONFIG_API:
            raise ValueError(f"job config api {raw.get('api')!r} is not {JOB_CONFIG_API!r}")
        return cls(
            job=JobIdentity(**raw["job"]),
            spec=raw["spec"],
            storage=JobStorage(**raw["storage"]),
            stage=Stage(**raw.get("stage", {})),
        )


def stage_prefix(job_prefix: str, stage: Stage) -> str:
    """Where a stage writes progress, checkpoints and its result: each stage has its own prefix."""
    if stage.kind == STAGE_BASELINE:
        return storage_layout.baseline_prefix(job_prefix)
    if stage.kind == STAGE_SWEEP:
        return storage_layout.sweep_prefix(job_prefix)
    if stage.kind == STAGE_DATA:
        return storage_layout.data_stage_prefix(job_prefix)
    return job_prefix


def job_config(namespace: str, name: str, uid: str, spec: dict, stage: Stage | None = None) -> JobConfig:
    stage = stage or Stage()
    root = storage_layout.job_prefix(spec["output"]["uri"], namespace, name, uid)
    prefix = stage_prefix(root, stage)
    return JobConfig(
        job=JobIdentity(namespace=namespace, name=name, uid=uid),
        spec=spec,
        storage=JobStorage(
            job_prefix=prefix,
            checkpoints_prefix=storage_layout.checkpoints_prefix(prefix),
            manifest_uri=storage_layout.manifest_uri(root),
            result_uri=storage_layout.result_uri(prefix) if stage.kind != STAGE_TRAIN else "",
        ),
        stage=stage,
    )

"""Where a job's files live in object storage (the trainer -> storage contract).

One prefix per job, `<output.uri>/<namespace>/<name>/<uid>/`, with `manifest.json` written last;
the whole tree is drawn in docs/concepts.md (Storage layout).
"""

from __future__ import annotations

from urllib.parse import urlparse

MANIFEST_FILE = "manifest.json"
PROGRESS_FILE = "progress.json"
LATEST_CHECKPOINT_FILE = "latest.json"
RESULT_FILE = "result.json"
TRACKING_FILE = "tracking.json"


def _join(prefix: str, *parts: str) -> str:
    return "/".join([prefix.rstrip("/"), *[p.strip("/") for p in parts]])


def job_prefix(output_uri: str, namespace: str, name: str, uid: str) -> str:
    return _join(output_uri, namespace, name, uid) + "/"


def checkpoints_prefix(job_prefix_uri: str) -> str:
    return _join(job_prefix_uri, "checkpoints") + "/"


def manifest_uri(job_prefix_uri: str) -> str:
    return _join(job_prefix_uri, MANIFEST_FILE)


def progress_uri(job_prefix_uri: str) -> str:
    return _join(job_prefix_uri, PROGRESS_FILE)


def checkpoint_prefix(job_prefix_uri: str, step: int) -> str:
    return _join(checkpoints_prefix(job_prefix_uri), f"step-{step:08d}") + "/"


def latest_checkpoint_uri(job_prefix_uri: str) -> str:
    return _join(checkpoints_prefix(job_prefix_uri), LATEST_CHECKPOINT_FILE)


def baseline_prefix(job_prefix_uri: str) -> str:
    return _join(job_prefix_uri, "baseline") + "/"


def data_stage_prefix(job_prefix_uri: str) -> str:
    return _join(job_prefix_uri, "data") + "/"


def sweep_prefix(job_prefix_uri: str) -> str:
    return _join(job_prefix_uri, "sweep") + "/"


def result_uri(stage_prefix_uri: str) -> str:
    """A stage's outcome (baseline metrics, the sweep's table): written last by the trainer."""
    return _join(stage_prefix_uri, RESULT_FILE)


def adapter_prefix(job_prefix_uri: str, digest: str) -> str:
    algorithm, _, hexdigest = digest.partition(":")
    return _join(job_prefix_uri, "adapter", f"{algorithm}-{hexdigest}") + "/"


def merged_prefix(job_prefix_uri: str, digest: str) -> str:
    """`output.mergeAdapter`: the merged model's files, beside the adapter and named by their own digest."""
    algorithm, _, hexdigest = digest.partition(":")
    return _join(job_prefix_uri, "merged", f"{algorithm}-{hexdigest}") + "/"


def merged_manifest_uri(job_prefix_uri: str) -> str:
    """The merged model's own manifest: written after its files, before the adapter's manifest."""
    return _join(job_prefix_uri, "merged", MANIFEST_FILE)


def tracking_uri(stage_prefix_uri: str) -> str:
    """A stage's experiment-tracking run ids (MLflow, W&B): how a restarted pod continues the same run."""
    return _join(stage_prefix_uri, TRACKING_FILE)


def split_uri(uri: str) -> tuple[str, str, str]:
    """``s3://bucket/key`` -> ("s3", "bucket", "key"); ``file:///p`` -> ("file", "", "/p")."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return "s3", parsed.netloc, parsed.path.lstrip("/")
    if parsed.scheme == "file":
        return "file", "", parsed.path
    raise ValueError(f"unsupported storage uri {uri!r} (use s3:// or file://)")

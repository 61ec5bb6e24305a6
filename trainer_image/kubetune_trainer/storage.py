"""The trainer's storage: credentials from the environment, progress.json, checkpoints up and down.

Credentials arrive only as environment variables set from Secrets (see `kubetune.api.jobconfig`);
they are never logged (`S3Settings.__repr__` hides them).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from pathlib import Path

from kubetune.api import jobconfig, storage_layout, storage_location
from kubetune.api import progress as progress_api
from kubetune.clients.storage import ObjectStore, S3Settings, output_store_from_env

log = logging.getLogger(__name__)


def _scoped_store(spec: dict, section: dict, access_env: str, secret_env: str) -> ObjectStore:
    """The data or model store: its own endpoint/credentials when given, else the output's, else the
    environment's (the operator's setting, rendered into the pod)."""
    s3 = section.get("s3") or {}
    if not s3:
        return output_store_from_env(spec)
    has_own = bool(s3.get("credentials"))
    location = storage_location.resolve(s3, spec["output"], fallback=storage_location.from_environment(os.environ))
    return ObjectStore(S3Settings(
        endpoint=location.endpoint, region=location.region,
        access_key=os.environ.get(access_env if has_own else jobconfig.ENV_S3_ACCESS_KEY),
        secret_key=os.environ.get(secret_env if has_own else jobconfig.ENV_S3_SECRET_KEY)))


def data_store(spec: dict) -> ObjectStore:
    return _scoped_store(spec, spec["dataset"], jobconfig.ENV_DATA_S3_ACCESS_KEY, jobconfig.ENV_DATA_S3_SECRET_KEY)


def model_store(spec: dict) -> ObjectStore:
    return _scoped_store(spec, spec["baseModel"], jobconfig.ENV_MODEL_S3_ACCESS_KEY, jobconfig.ENV_MODEL_S3_SECRET_KEY)


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class ProgressWriter:
    """Writes progress.json at most every `interval` seconds, unless forced (evaluations, the end)."""

    def __init__(self, store: ObjectStore, job_prefix: str, enabled: bool,
                 interval: float = progress_api.WRITE_INTERVAL_SECONDS):
        self.store, self.enabled, self.interval = store, enabled, interval
        self.uri = storage_layout.progress_uri(job_prefix)
        self.last_write = 0.0
        self.state: dict = {"api": progress_api.PROGRESS_API}

    def update(self, force: bool = False, **fields) -> None:
        self.state.update({k: v for k, v in fields.items() if v is not None})
        if not self.enabled or (not force and time.monotonic() - self.last_write < self.interval):
            return
        self.state["updateTime"] = now_rfc3339()
        try:
            self.store.write(self.uri, json.dumps(self.state, sort_keys=True).encode())
            self.last_write = time.monotonic()
        except Exception as exc:  # progress is best effort: never fail a run because a status write failed
            log.warning("could not write progress", extra={"error": str(exc)})


# --- checkpoints -------------------------------------------------------------------------------------


def upload_dir(store: ObjectStore, local: Path, prefix_uri: str) -> int:
    files = sorted(p for p in local.rglob("*") if p.is_file())
    for path in files:
        store.upload_file(path, prefix_uri + str(path.relative_to(local)))
    return len(files)


def download_prefix(store: ObjectStore, prefix_uri: str, local: Path) -> int:
    objects = store.list(prefix_uri)
    for count, uri in enumerate(objects, 1):
        store.download_file(uri, local / uri[len(prefix_uri):])
        log.info("downloaded", extra={"file": uri[len(prefix_uri):], "n": count, "of": len(objects)})
    return len(objects)


def latest_checkpoint(store: ObjectStore, job_prefix: str) -> dict | None:
    raw = store.read(storage_layout.latest_checkpoint_uri(job_prefix))
    return json.loads(raw) if raw else None


def mark_latest_checkpoint(store: ObjectStore, job_prefix: str, step: int) -> None:
    """Written after every file of the checkpoint: a half-uploaded checkpoint is never resumed from."""
    pointer = {"step": step, "path": storage_layout.checkpoint_prefix(job_prefix, step), "time": now_rfc3339()}
    store.write(storage_layout.latest_checkpoint_uri(job_prefix), json.dumps(pointer).encode())

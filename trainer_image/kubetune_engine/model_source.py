"""The base model's directory, fetched first when it is remote: a directory or file:// as it is,
s3:// copied whole into the download dir (credentials and endpoint from the AWS_* environment, as
vLLM's loaders read them), hf:// through huggingface_hub. Why and how: docs/serving-runtimes.md."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from kubetune.api import storage_location
from kubetune.clients.storage import ObjectStore, S3Settings

log = logging.getLogger(__name__)

PARTIAL_PREFIX = ".partial-"


class ModelSourceError(RuntimeError):
    """The base model cannot be had from where the command line says (the message says why)."""


def local_model_dir(model: str, download_dir: str | None, revision: str | None = None) -> Path:
    """A local directory holding `model` (config.json, weights, tokenizer), fetched when remote."""
    scheme, sep, rest = model.partition("://")
    if not sep:
        return _checked(Path(model), model)
    if scheme == "file":
        return _checked(Path("/" + rest.lstrip("/")), model)
    if scheme not in ("s3", "hf"):
        raise ModelSourceError(f"model {model}: unsupported scheme {scheme}:// (a directory, file://, s3:// or hf://)")
    if not download_dir:
        raise ModelSourceError(f"model {model}: --download-dir is required to fetch an {scheme}:// model")
    if scheme == "hf":
        return _checked(_from_hub(rest, revision or "main", Path(download_dir) / "huggingface"), model)
    return _checked(fetch_prefix(s3_store_from_env(), model, Path(download_dir)), model)


def _checked(path: Path, model: str) -> Path:
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"model {model}: no config.json in {path}")
    return path


def s3_store_from_env() -> ObjectStore:
    """The store the AWS_* variables describe (the engine container's env: spec.baseModel.s3, else the
    operator's setting, as the operator resolved it)."""
    location = storage_location.from_environment(os.environ)
    return ObjectStore(S3Settings(endpoint=location.endpoint, region=location.region,
                                  access_key=os.environ.get("AWS_ACCESS_KEY_ID") or None,
                                  secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY") or None))


def copy_dir_for(download_dir: Path, uri: str) -> Path:
    """Where the copy of one prefix lives: readable and unique per source."""
    return download_dir / re.sub(r"[^A-Za-z0-9._-]", "_", uri.rstrip("/"))


def fetch_prefix(store: ObjectStore, uri: str, download_dir: Path) -> Path:
    """Every object under `uri`, copied into a temporary directory renamed into place when whole: the
    copy's directory exists only complete, so a later start reuses it without asking the store."""
    target = copy_dir_for(download_dir, uri)
    if target.is_dir():
        log.info("base model already in the download dir", extra={"model": uri, "path": str(target)})
        return target
    download_dir.mkdir(parents=True, exist_ok=True)
    for stale in download_dir.glob(f"{PARTIAL_PREFIX}{target.name}-*"):  # a start killed mid-copy
        shutil.rmtree(stale, ignore_errors=True)
    prefix = uri.rstrip("/") + "/"
    try:
        objects = store.list(prefix)
    except Exception as exc:  # botocore's errors share no base class worth naming; the message is the user's clue
        raise ModelSourceError(f"model {uri}: cannot list the prefix: {exc}") from exc
    if not objects:
        raise ModelSourceError(f"model {uri}: no objects under that prefix")
    partial = Path(tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}{target.name}-", dir=download_dir))
    try:
        for count, object_uri in enumerate(objects, 1):
            store.download_file(object_uri, partial / object_uri[len(prefix):])
            log.info("downloaded", extra={"file": object_uri[len(prefix):], "n": count, "of": len(objects)})
        partial.rename(target)
    except Exception as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise ModelSourceError(f"model {uri}: download failed: {exc}") from exc
    return target


def _from_hub(repo: str, revision: str, cache_dir: Path) -> Path:
    """huggingface_hub's snapshot (its cache renames each file into place when whole); HF_TOKEN is read
    by huggingface_hub itself. Untested without network: the tests run offline."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise ModelSourceError(f"model hf://{repo}: huggingface_hub is not installed") from exc
    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=str(cache_dir)))
    except Exception as exc:  # offline, gated, missing: each needs a spec or network fix
        raise ModelSourceError(f"model hf://{repo}@{revision}: {exc}") from exc

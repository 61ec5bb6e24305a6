"""The served base model's identity (kubetune.api.base_identity), read where `spec.baseModel.uri` points:
config.json and the safetensors files' sha256 (hashed when they are small) from s3:// or file:// with
the AdapterDeployment's store; config.json and the files' LFS sha256 from the hub for hf://. Cached per
(uri, revision)."""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.error
import urllib.request

from kubetune.api import base_identity
from kubetune.clients import storage

KNOWN_SECONDS = 600.0  # a model replaced at the same URI is noticed within this
UNKNOWN_SECONDS = 60.0  # an unreachable hub or store is asked again after this, not on every pass
HUB_TIMEOUT_SECONDS = 10.0


def _hub() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")  # the trainer honours it too


def hub_config_url(repo: str, revision: str | None) -> str:
    """Where the hub serves a revision's config.json."""
    return f"{_hub()}/{repo}/resolve/{revision or 'main'}/config.json"


def hub_files_url(repo: str, revision: str | None) -> str:
    """The hub's listing of a revision's files, with each LFS file's sha256 (`siblings[].lfs.sha256`)."""
    return f"{_hub()}/api/models/{repo}/revision/{revision or 'main'}?blobs=true"


def _get(url: str) -> bytes | None:
    # No token: the operator holds no Hugging Face credentials, so a gated model's identity is unknown.
    try:
        with urllib.request.urlopen(url, timeout=HUB_TIMEOUT_SECONDS) as answer:
            return answer.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def hub_weights(listing: bytes | None) -> dict[str, str] | None:
    """The top-level safetensors files' sha256 from the hub's listing (None when it has none)."""
    try:
        siblings = json.loads(listing or b"{}").get("siblings") or []
        found = {s["rfilename"]: s["lfs"]["sha256"] for s in siblings
                 if s["rfilename"].endswith(base_identity.WEIGHT_SUFFIX) and "/" not in s["rfilename"]}
    except (ValueError, AttributeError, KeyError, TypeError):
        return None
    return found or None


def _hub_model(repo: str, revision: str | None) -> tuple[bytes | None, dict[str, str] | None]:
    raw = _get(hub_config_url(repo, revision))
    return raw, (hub_weights(_get(hub_files_url(repo, revision))) if raw is not None else None)


def _stored_weights(store: storage.ObjectStore, prefix: str) -> dict[str, str] | None:
    """The safetensors files' sha256, read when their total size is small enough to hash each pass."""
    weights = [info for info in store.list_objects(prefix)
               if "/" not in info.uri[len(prefix):] and info.uri.endswith(base_identity.WEIGHT_SUFFIX)]
    if not weights or sum(info.size for info in weights) > base_identity.HASHED_WEIGHTS_LIMIT:
        return None
    return {info.uri[len(prefix):]: store.sha256(info.uri) or "" for info in weights}


def read_identity(store: storage.ObjectStore, base: dict) -> tuple[dict | None, str]:
    """(identity, why): the identity of the model at base.uri, or None with the reason it is unknown."""
    uri, revision = base["uri"], base.get("revision")
    scheme, _, rest = uri.partition("://")
    if scheme == "hf":
        raw, weights = _hub_model(rest.strip("/"), revision)
    elif scheme in ("s3", "file"):
        prefix = uri.rstrip("/") + "/"
        raw = store.read(prefix + "config.json")
        weights = _stored_weights(store, prefix) if raw is not None else None
    else:
        return None, f"baseModel.uri {uri}: no way to read a {scheme}:// model's config.json"
    if raw is None:
        return None, f"baseModel.uri {uri}: no config.json there"
    try:
        config = base_identity.parse_config(raw, f"baseModel.uri {uri}")
    except ValueError as exc:
        return None, str(exc)
    return base_identity.identity(config, base_identity.revision_of(base), weights), f"read from {uri}"


async def served_identity(store: storage.ObjectStore, base: dict, cache: dict) -> tuple[dict | None, str]:
    """`read_identity`, cached per (uri, revision): known identities for KNOWN_SECONDS, failures for
    UNKNOWN_SECONDS (a storage outage or an unreachable hub is not asked again on every pass)."""
    key = (base["uri"], base.get("revision"))
    cached = cache.get(key)
    if cached is not None and time.monotonic() < cached[0]:
        return cached[1]
    try:
        found = await asyncio.to_thread(read_identity, store, base)
    except Exception as exc:  # storage down, hub unreachable, credentials refused
        found = None, f"baseModel.uri {base['uri']}: config.json could not be read: {exc}"
    cache[key] = (time.monotonic() + (KNOWN_SECONDS if found[0] else UNKNOWN_SECONDS), found)
    return found

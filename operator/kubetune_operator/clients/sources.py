"""An adapter source as a verified manifest, shared by the operator and `kubetune local`."""

from __future__ import annotations

import asyncio
import hashlib
import json

from kubetune.api import methods
from kubetune.clients import storage
from kubetune_operator.reconcile import adapterdeployment as adp

ADAPTER_CONFIG = "adapter_config.json"  # peft's name, which vLLM and peft read when loading


def manifest_location(uri: str) -> str:
    """A source uri names the manifest.json or the directory holding it."""
    return uri if uri.endswith("/manifest.json") else uri.rstrip("/") + "/manifest.json"


class AdapterConfigProblem(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def read_adapter_config(store: storage.ObjectStore, adapter_uri: str, document: dict) -> dict | None:
    """The adapter's adapter_config.json, checked against its sha256 in the manifest (what the runtime will
    read when it loads the adapter); None for whole weights (a method that publishes no adapter)."""
    entry = next((f for f in document["files"] if f["path"] == ADAPTER_CONFIG), None)
    method = methods.METHODS.get(document.get("method") or "")
    if entry is None:
        if method is not None and not method.publishes_adapter:
            return None  # pre-flight refuses it by its method
        raise AdapterConfigProblem("NotAnAdapter", f"no {ADAPTER_CONFIG} among the manifest's files")
    raw = store.read(adapter_uri + ADAPTER_CONFIG)
    if raw is None or hashlib.sha256(raw).hexdigest() != entry["sha256"]:
        raise AdapterConfigProblem("AdapterFileCorrupt", f"{ADAPTER_CONFIG} does not match its sha256 in the manifest")
    try:
        config = json.loads(raw)
    except ValueError as exc:
        raise AdapterConfigProblem("NotAnAdapter", f"{ADAPTER_CONFIG} is not JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterConfigProblem("NotAnAdapter", f"{ADAPTER_CONFIG} is not a JSON object")
    return config


async def verified_source(store: storage.ObjectStore, manifest_uri: str, expected: str | None, name: str,
                          cache: dict) -> adp.Source:
    """Every file's size and sha256 checked, once per (manifest uri, expected digest): `cache` keeps the
    verified ones (a mismatch is checked again next time, it may have been a partial upload)."""
    cached = cache.get((manifest_uri, expected))
    if cached is not None:
        return cached
    prefix = manifest_uri.rsplit("/", 1)[0] + "/"
    try:
        check = await asyncio.to_thread(storage.check_published, store, prefix, True)
    except Exception as exc:  # storage down: try again next pass
        return adp.Source(manifest_uri=manifest_uri, problems=(("StorageUnavailable", f"adapters[{name}]: {exc}"),))
    if not check.found:
        return adp.Source(manifest_uri=manifest_uri,
                          problems=(("ManifestMissing", f"adapters[{name}]: no manifest at {manifest_uri}"),))
    if check.problems:
        return adp.Source(manifest_uri=manifest_uri, problems=tuple(
            (p.reason, f"adapters[{name}]: {manifest_uri}: {p.message}") for p in check.problems))
    document = check.document
    try:
        adapter_config = await asyncio.to_thread(read_adapter_config, store, check.adapter_uri, document)
    except AdapterConfigProblem as exc:
        return adp.Source(manifest_uri=manifest_uri, digest=document["digest"],
                          problems=((exc.reason, f"adapters[{name}]: {manifest_uri}: {exc}"),))
    except Exception as exc:  # storage down: try again next pass
        return adp.Source(manifest_uri=manifest_uri, problems=(("StorageUnavailable", f"adapters[{name}]: {exc}"),))
    source = adp.Source(manifest_uri=manifest_uri, digest=document["digest"], rank=document.get("rank"),
                        base_model=document.get("baseModel"), method=document.get("method"),
                        adapter_config=adapter_config)
    if expected is None or expected == document["digest"]:
        cache[(manifest_uri, expected)] = source
    return source

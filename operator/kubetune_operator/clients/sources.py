"""An adapter source as a verified manifest, shared by the operator and `kubetune local`."""

from __future__ import annotations

import asyncio

from kubetune.clients import storage
from kubetune_operator.reconcile import adapterdeployment as adp


def manifest_location(uri: str) -> str:
    """A source uri names the manifest.json or the directory holding it."""
    return uri if uri.endswith("/manifest.json") else uri.rstrip("/") + "/manifest.json"


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
    source = adp.Source(manifest_uri=manifest_uri, digest=document["digest"], rank=document.get("rank"),
                        base_model=document.get("baseModel"))
    if expected is None or expected == document["digest"]:
        cache[(manifest_uri, expected)] = source
    return source

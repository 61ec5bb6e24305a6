"""Downloads once per pod: local rank 0 fetches into the pod's cache, the other ranks wait and read it.

A cache directory is trusted only through its `.complete` marker (written last, after every file was
renamed into place) and only while the marker's listing still matches the source and every file still
has its recorded size; anything else is deleted and fetched again. Why and how: docs/trainer.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import torch.distributed as torch_dist

from kubetune.clients.storage import ObjectInfo, ObjectStore

from .failures import is_retryable
from .modeling import BadInput

log = logging.getLogger(__name__)

MARKER = ".complete"
PARTIAL_SUFFIX = ".partial"
T = TypeVar("T")


class PeerFailed(RuntimeError):
    """Another pod's (or this pod's) local rank 0 failed a download with an error no retry fixes."""


class PeerUnavailable(ConnectionError):
    """Another pod's (or this pod's) local rank 0 hit a storage or network failure: retry the pod."""


class CacheMissing(RuntimeError):
    """Local rank 0 finished, yet this rank finds no complete copy: the work dir is not shared."""


@dataclass(frozen=True)
class CachedFile:
    """One file of a cache directory, as its marker records it."""

    path: str  # relative to the cache directory
    size: int
    tag: str  # the source's version tag (S3 ETag, file mtime, manifest sha256): a change means re-download
    sha256: str


def cache_dir_for(root: Path, kind: str, uri: str) -> Path:
    """The cache directory of one source URI: readable, unique, and the same on every rank."""
    return root / kind / re.sub(r"[^A-Za-z0-9._-]", "_", uri.rstrip("/"))


def once_per_node(local_main: bool, fetch: Callable[[], T], read_local: Callable[[], T]) -> T:
    """`fetch` on this pod's local rank 0, then, once every pod's local rank 0 is done, `read_local` on
    the others. A failure on any local rank 0 reaches every rank of the job through one collective (no
    rank waits for a timeout): BadInput is raised with the same message everywhere."""
    result: T | None = None
    failure: BaseException | None = None
    if local_main:
        try:
            result = fetch()
        except Exception as exc:  # shared below with every rank, then raised here as it was
            failure = exc
    failures = _gather((failure_kind(failure), str(failure)) if failure else None)
    if failure is not None:
        raise failure
    first = next((f for f in failures if f), None)
    if first is not None:
        kind, message = first
        raise {"BadInput": BadInput, "Retryable": PeerUnavailable}.get(kind, PeerFailed)(message)
    return result if local_main else read_local()


def failure_kind(exc: BaseException) -> str:
    """How the other ranks re-raise a local rank 0's failure, so that every rank exits with the same code."""
    if isinstance(exc, BadInput):
        return "BadInput"
    return "Retryable" if is_retryable(exc) else "Failed"


def _gather(item: object) -> list:
    """Every rank's `item` (a collective: every rank calls it, the same number of times)."""
    if not torch_dist.is_initialized() or torch_dist.get_world_size() == 1:
        return [item]
    items: list = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(items, item)
    return items


# --- cache directories -------------------------------------------------------------------------------


def read_marker(target: Path) -> list[CachedFile] | None:
    try:
        document = json.loads((target / MARKER).read_text())
        return [CachedFile(**entry) for entry in document["files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def complete_copy(target: Path, expected: list[tuple[str, int, str]] | None = None) -> list[CachedFile] | None:
    """The marker's files when the copy is whole: marker present, every file there with its size and,
    when `expected` (path, size, tag) is given, the same listing as the source's now."""
    files = read_marker(target)
    if files is None:
        return None
    if expected is not None and sorted((f.path, f.size, f.tag) for f in files) != sorted(expected):
        return None
    for entry in files:
        local = target / entry.path
        if not local.is_file() or local.stat().st_size != entry.size:
            return None
    return files


def require_complete(target: Path, what: str) -> list[CachedFile]:
    """What a waiting rank reads: the copy local rank 0 just completed."""
    files = complete_copy(target)
    if files is None:
        raise CacheMissing(f"{what}: no complete copy in {target} after this pod's local rank 0 fetched it; "
                           "the pod's processes must share one work dir (KUBETUNE_WORK_DIR)")
    return files


def fetch_objects(store: ObjectStore, objects: list[tuple[str, ObjectInfo]], target: Path, what: str,
                  expected_sha256: dict[str, str] | None = None) -> list[CachedFile]:
    """`objects` ((relative path, listing entry) pairs) as whole files under `target`: reused when the
    cached copy is complete and matches the listing, else downloaded again from scratch.

    Each file is written under a temporary name, its size checked against the listing, its sha256
    computed (and compared with `expected_sha256[path]` when given), then renamed into place; the
    marker is written last. A file whose sha256 differs raises BadInput (the source is corrupt)."""
    expected = [(path, info.size, info.tag) for path, info in objects]
    cached = complete_copy(target, expected)
    if cached is not None:
        log.info("cache hit", extra={"what": what, "files": len(cached), "dir": str(target)})
        return cached
    shutil.rmtree(target, ignore_errors=True)  # a partial or stale copy is never trusted
    target.mkdir(parents=True)
    files = []
    for path, info in objects:
        local = target / path
        partial = local.with_name(local.name + PARTIAL_SUFFIX)
        store.download_file(info.uri, partial)
        size = partial.stat().st_size
        if size != info.size:
            raise IncompleteDownload(f"{what}: {path} arrived with {size} bytes, the listing says {info.size}")
        digest = _sha256(partial)
        if expected_sha256 is not None and expected_sha256.get(path) != digest:
            raise BadInput(f"{what}: {path} does not match its sha256 in the manifest")
        os.replace(partial, local)
        files.append(CachedFile(path, info.size, info.tag, digest))
    _write_marker(target, files)
    log.info("downloaded", extra={"what": what, "files": len(files), "bytes": sum(f.size for f in files),
                                  "dir": str(target)})
    return files


class IncompleteDownload(ConnectionError):
    """A download ended short of the listed size (connection cut, object replaced meanwhile): retryable."""


def _write_marker(target: Path, files: list[CachedFile]) -> None:
    temporary = target / (MARKER + PARTIAL_SUFFIX)
    temporary.write_text(json.dumps({"files": [asdict(f) for f in files]}, indent=1))
    os.replace(temporary, target / MARKER)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --- what the trainer fetches --------------------------------------------------------------------------


def fetch_prefix(store: ObjectStore, prefix_uri: str, target: Path, what: str) -> list[CachedFile] | None:
    """Every object under `prefix_uri` cached in `target`; None when there is none."""
    listing = store.list_objects(prefix_uri)
    if not listing:
        return None
    return fetch_objects(store, [(info.uri[len(prefix_uri):], info) for info in listing], target, what)


def fetch_object(store: ObjectStore, uri: str, target: Path, what: str) -> Path | None:
    """One object cached as `target/<its name>`; None when it does not exist."""
    info = next((i for i in store.list_objects(uri) if i.uri == uri), None)
    if info is None:
        return None
    name = uri.rsplit("/", 1)[-1]
    fetch_objects(store, [(name, info)], target, what)
    return target / name

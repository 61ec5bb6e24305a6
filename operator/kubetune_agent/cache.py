"""The verified adapter cache: every file of an adapter is checked against its manifest (and the
manifest against the desired digest) before the engine ever sees it (decisions in `plan`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

from kubetune.api import serving
from kubetune.clients.storage import ObjectStore
from kubetune_agent import plan

log = logging.getLogger(__name__)

_HEX_DIR = re.compile(r"^[a-f0-9]{64}$")
_CHUNK = 8 << 20
_S3_CLIENT_LOCK = threading.Lock()


def ensure_s3_client(store: ObjectStore, uri: str) -> None:
    """Create the store's boto3 client once, under a lock: `ObjectStore.s3` creates it lazily, and boto3's
    client creation is not thread-safe (the cache and the sampler reach the store from worker threads)."""
    if uri.startswith("s3://"):
        with _S3_CLIENT_LOCK:
            _ = store.s3


class Refused(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason, self.message = reason, message


class AdapterCache:
    """Verified adapter copies under `<root>/<digest hex>/` (what the engine is told to load), each with
    its manifest at `<root>/<digest hex>.manifest.json`. A copy is renamed into place only after every
    file matched the manifest, so a directory named by a digest always holds exactly those bytes.
    The root must be at the same path in the engine's container (a shared volume)."""

    def __init__(self, root: Path, store: ObjectStore):
        self.root = Path(root)
        self.store = store
        self.verified: set[str] = set()  # digests verified by this process
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".partial-*"):  # a download interrupted by a restart
            shutil.rmtree(stale, ignore_errors=True)

    def path(self, digest: str) -> Path:
        return self.root / digest.partition(":")[2]

    def fetch(self, version: serving.Version) -> Path:
        """The verified local copy of `version` (blocking: run it in a thread). Raises `Refused`."""
        target = self.path(version.digest)
        if version.digest in self.verified and target.is_dir():
            return target
        if self._reuse(version.digest):
            return target
        try:
            ensure_s3_client(self.store, version.manifest_uri)
            raw = self.store.read(version.manifest_uri)
        except Exception as exc:
            raise Refused(plan.DOWNLOAD_FAILED, f"reading {version.manifest_uri}: {type(exc).__name__}: {exc}") from exc
        if raw is None:
            raise Refused(plan.MANIFEST_MISSING, f"{version.manifest_uri} does not exist")
        try:
            document = json.loads(raw)
        except ValueError as exc:
            raise Refused(plan.MANIFEST_INVALID, f"{version.manifest_uri} is not JSON: {exc}") from exc
        problem = plan.check_manifest(document, version)
        if problem:
            raise Refused(*problem)
        prefix = plan.adapter_prefix_of(document, version.manifest_uri)
        partial = Path(tempfile.mkdtemp(prefix=f".partial-{target.name[:12]}-", dir=self.root))
        try:
            for entry in document["files"]:
                try:
                    self.store.download_file(prefix + entry["path"], partial / entry["path"])
                except FileNotFoundError as exc:
                    raise Refused(plan.DOWNLOAD_FAILED, f"{entry['path']} is missing from the store") from exc
                except Exception as exc:
                    raise Refused(plan.DOWNLOAD_FAILED, f"{entry['path']}: {type(exc).__name__}: {exc}") from exc
            problem = plan.check_files(document["files"], _local_files(partial, document["files"]))
            if problem:
                raise Refused(*problem)
            self._sidecar(version.digest).write_text(json.dumps(document, sort_keys=True))
            if target.exists():
                shutil.rmtree(target)
            os.replace(partial, target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        self.verified.add(version.digest)
        log.info("adapter downloaded and verified",
                 extra={"version": version.name, "digest": version.digest, "files": len(document["files"])})
        return target

    def _sidecar(self, digest: str) -> Path:
        return self.root / f"{digest.partition(':')[2]}.manifest.json"

    def _reuse(self, digest: str) -> bool:
        """A copy left by an earlier run of the agent: re-hash it against its manifest before trusting it."""
        target, sidecar = self.path(digest), self._sidecar(digest)
        if not (target.is_dir() and sidecar.is_file()):
            return False
        try:
            document = json.loads(sidecar.read_text())
            ok = (document.get("digest") == digest
                  and plan.check_files(document["files"], _local_files(target, document["files"])) is None)
        except (ValueError, KeyError, TypeError, OSError):
            ok = False
        if ok:
            self.verified.add(digest)
            return True
        shutil.rmtree(target, ignore_errors=True)
        sidecar.unlink(missing_ok=True)
        return False

    def evict(self, keep: set[str]) -> list[str]:
        """Delete the copies whose digests are not in `keep` (desired or still loaded)."""
        keep_hex = {digest.partition(":")[2] for digest in keep}
        removed = []
        for entry in self.root.iterdir():
            hexdigest = entry.name.removesuffix(".manifest.json")
            if _HEX_DIR.match(hexdigest) and hexdigest not in keep_hex:
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(hexdigest)
                else:
                    entry.unlink(missing_ok=True)
                self.verified.discard(f"sha256:{hexdigest}")
        return removed


def _local_files(root: Path, files: list[dict]) -> dict[str, tuple[int, str] | None]:
    out: dict[str, tuple[int, str] | None] = {}
    for entry in files:
        path = root / entry["path"]
        if not path.is_file():
            out[entry["path"]] = None
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        out[entry["path"]] = (path.stat().st_size, digest.hexdigest())
    return out

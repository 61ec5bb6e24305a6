"""The adapter manifest: what the trainer publishes and what the operator and agents verify.

`manifest.json` lists every adapter file with its sha256 and size. The adapter's digest is the
sha256 of the canonical file list, so it names the exact weights; the files live under a path
derived from it (see `storage_layout.adapter_prefix`). The manifest is written after every file,
so its presence means the whole adapter is there.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field

MANIFEST_API = "kubetune.io/manifest/v1"
_SHA256 = re.compile(r"^[a-f0-9]{64}$")
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")


def files_digest(files: list[dict]) -> str:
    """sha256 over the sorted (path, sha256, size) triples: the adapter's identity."""
    canonical = json.dumps(
        sorted(({"path": f["path"], "sha256": f["sha256"], "size": f["size"]} for f in files),
               key=lambda f: f["path"]),
        separators=(",", ":"),
        sort_keys=True,
    )
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class ManifestProblem:
    reason: str  # CamelCase, becomes a condition reason
    message: str


def check_document(doc: object) -> list[ManifestProblem]:
    """Structural and digest checks that need no storage access."""
    if not isinstance(doc, dict):
        return [ManifestProblem("ManifestInvalid", "manifest.json is not a JSON object")]
    problems = []
    if doc.get("api") != MANIFEST_API:
        problems.append(ManifestProblem("ManifestInvalid", f"api is {doc.get('api')!r}, expected {MANIFEST_API!r}"))
    files = doc.get("files")
    if not isinstance(files, list) or not files:
        return [*problems, ManifestProblem("ManifestInvalid", "files must be a non-empty list")]
    seen = set()
    for index, entry in enumerate(files):
        if not isinstance(entry, dict):
            problems.append(ManifestProblem("ManifestInvalid", f"files[{index}] is not an object"))
            continue
        path, sha, size = entry.get("path"), entry.get("sha256"), entry.get("size")
        if not isinstance(path, str) or not path or path.startswith("/") or ".." in path.split("/"):
            problems.append(ManifestProblem("ManifestInvalid", f"files[{index}].path {path!r} is not a relative path"))
        elif path in seen:
            problems.append(ManifestProblem("ManifestInvalid", f"files[{index}].path {path!r} is listed twice"))
        seen.add(path)
        if not isinstance(sha, str) or not _SHA256.match(sha):
            problems.append(ManifestProblem("ManifestInvalid", f"files[{index}].sha256 is not a sha256 hex digest"))
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            problems.append(ManifestProblem("ManifestInvalid", f"files[{index}].size must be a positive integer"))
    if problems:
        return problems
    digest = doc.get("digest")
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        return [ManifestProblem("ManifestInvalid", "digest must be sha256:<64 hex>")]
    actual = files_digest(files)
    if actual != digest:
        return [ManifestProblem("DigestMismatch", f"digest {digest} does not match the file list ({actual})")]
    if not isinstance(doc.get("adapterPath"), str):
        return [ManifestProblem("ManifestInvalid", "adapterPath is missing")]
    return []


def total_size(doc: dict) -> int:
    return sum(int(f["size"]) for f in doc["files"])


def numeric_metrics(metrics: object) -> dict[str, float]:
    """Only finite numbers go to status (the CRD types them as numbers)."""
    if not isinstance(metrics, dict):
        return {}
    out = {}
    for key, value in metrics.items():
        finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if finite:
            out[str(key)] = float(value)
    return out


@dataclass
class ManifestCheck:
    """What was found at a job's manifest location (filled by the storage client, judged by the
    reconcile logic)."""

    found: bool
    problems: list[ManifestProblem] = field(default_factory=list)
    document: dict | None = None
    adapter_uri: str | None = None

    @property
    def verified(self) -> bool:
        return self.found and not self.problems

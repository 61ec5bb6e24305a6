"""The adapter manifest: what the trainer publishes and what the operator and agents verify.

`manifest.json` lists every adapter file with its sha256 and size. The adapter's digest is the
sha256 of the canonical file list, so it names the exact weights; the files live under a path
derived from it (see `storage_layout.adapter_prefix`). The manifest is written after every file,
so its presence means the whole adapter is there. `output.mergeAdapter`'s merged model is its own
artifact (own manifest, digest and prefix) that the adapter manifest only references (`merged`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field

MANIFEST_API = "kubetune.io/manifest/v1"
MERGED_MANIFEST_API = "kubetune.io/merged-manifest/v1"
MERGED_REFERENCE_FIELDS = ("uri", "manifestUri", "digest")  # the adapter manifest's `merged` entry
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
    """Structural and digest checks of an adapter manifest that need no storage access."""
    problems = _check_listing(doc, MANIFEST_API, "adapterPath", "manifest.json")
    if not problems and "merged" in doc:  # type: ignore[operator]
        problems = check_merged_reference(doc["merged"])  # type: ignore[index]
    return problems


def check_merged_document(doc: object) -> list[ManifestProblem]:
    """The same checks for the merged model's own manifest (its files live under `modelPath`)."""
    return _check_listing(doc, MERGED_MANIFEST_API, "modelPath", "the merged model's manifest")


def check_merged_reference(reference: object) -> list[ManifestProblem]:
    if not isinstance(reference, dict):
        return [ManifestProblem("ManifestInvalid", "merged must be an object")]
    for key in MERGED_REFERENCE_FIELDS:
        if not isinstance(reference.get(key), str) or not reference[key]:
            return [ManifestProblem("ManifestInvalid", f"merged.{key} is missing")]
    if not _DIGEST.match(reference["digest"]):
        return [ManifestProblem("ManifestInvalid", "merged.digest must be sha256:<64 hex>")]
    return []


def _check_listing(doc: object, api: str, path_field: str, what: str) -> list[ManifestProblem]:
    if not isinstance(doc, dict):
        return [ManifestProblem("ManifestInvalid", f"{what} is not a JSON object")]
    problems = []
    if doc.get("api") != api:
        problems.append(ManifestProblem("ManifestInvalid", f"api is {doc.get('api')!r}, expected {api!r}"))
    files = doc.get("files")
    if not isinstance(files, list) or not files:
        return [*problems, ManifestProblem("ManifestInvalid", "files must be a non-empty list")]
    problems += _check_entries(files)
    if problems:
        return problems
    digest = doc.get("digest")
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        return [ManifestProblem("ManifestInvalid", "digest must be sha256:<64 hex>")]
    actual = files_digest(files)
    if actual != digest:
        return [ManifestProblem("DigestMismatch", f"digest {digest} does not match the file list ({actual})")]
    if not isinstance(doc.get(path_field), str):
        return [ManifestProblem("ManifestInvalid", f"{path_field} is missing")]
    return []


def _check_entries(files: list) -> list[ManifestProblem]:
    problems, seen = [], set()
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
    return problems


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
    merged: dict | None = None  # the verified merged model (uri, manifestUri, digest, sizeBytes), when published

    @property
    def verified(self) -> bool:
        return self.found and not self.problems

"""Object storage for checkpoints, adapters and manifests: S3 (boto3) or a local directory.

Used by the trainer to publish and by the operator to verify. Publishing uploads every file first
and `manifest.json` last, so a reader never sees a manifest whose files are not all there.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from kubetune.api import jobconfig, storage_layout, storage_location
from kubetune.api import manifest as manifest_api
from kubetune.api.manifest import ManifestProblem

log = logging.getLogger(__name__)
_CHUNK = 8 << 20


@dataclass(frozen=True)
class S3Settings:
    endpoint: str | None = None
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = None

    def __repr__(self) -> str:  # never print credentials
        credentials = "set" if self.access_key else "default chain"
        return f"S3Settings(endpoint={self.endpoint!r}, region={self.region!r}, credentials={credentials})"


def output_store_from_env(spec: dict) -> ObjectStore:
    """The job's output store with credentials from this process's environment: how the trainer (from
    its secretKeyRef variables) and `kubetune local` (from the user's shell) reach it. Where the spec
    names no endpoint or region, the environment's (the operator's setting, rendered into the pod)."""
    location = storage_location.resolve(spec["output"], fallback=storage_location.from_environment(os.environ))
    return ObjectStore(S3Settings(endpoint=location.endpoint, region=location.region,
                                  access_key=os.environ.get(jobconfig.ENV_S3_ACCESS_KEY),
                                  secret_key=os.environ.get(jobconfig.ENV_S3_SECRET_KEY)))


@dataclass(frozen=True, order=True)
class ObjectInfo:
    """One stored object as a listing shows it."""

    uri: str
    size: int
    tag: str


class ObjectStore:
    """Reads and writes `s3://` and `file://` URIs."""

    def __init__(self, s3: S3Settings | None = None):
        self.s3_settings = s3 or S3Settings()
        self._s3 = None
        self._s3_lock = threading.Lock()  # one store serves many threads (the operator's passes)

    @property
    def s3(self):
        with self._s3_lock:
            return self._s3 or self._new_client()

    def _new_client(self):
        if self._s3 is None:
            import boto3
            from botocore.config import Config

            self._s3 = boto3.client(
                "s3",
                endpoint_url=self.s3_settings.endpoint,
                # None lets botocore decide (AWS_DEFAULT_REGION, ~/.aws/config, else us-east-1 and S3's
                # redirects to the bucket's region): no region of ours overrides the environment's.
                region_name=self.s3_settings.region,
                aws_access_key_id=self.s3_settings.access_key,
                aws_secret_access_key=self.s3_settings.secret_key,
                config=Config(retries={"max_attempts": 5, "mode": "standard"}, s3={"addressing_style": "path"}),
            )
        return self._s3

    # --- primitives ----------------------------------------------------------------------------

    def read(self, uri: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        scheme, bucket, key = storage_layout.split_uri(uri)
        if scheme == "file":
            try:
                return Path(key).read_bytes()
            except FileNotFoundError:
                return None
        try:
            return self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        except self.s3.exceptions.NoSuchKey:
            return None
        except Exception as exc:  # botocore.ClientError without a typed subclass (404 on some stores)
            if _is_not_found(exc):
                return None
            raise

    def size(self, uri: str) -> int | None:
        scheme, bucket, key = storage_layout.split_uri(uri)
        if scheme == "file":
            try:
                return Path(key).stat().st_size
            except FileNotFoundError:
                return None
        try:
            return int(self.s3.head_object(Bucket=bucket, Key=key)["ContentLength"])
        except Exception as exc:
            if _is_not_found(exc):
                return None
            raise

    def sha256(self, uri: str) -> str | None:
        scheme, bucket, key = storage_layout.split_uri(uri)
        digest = hashlib.sha256()
        if scheme == "file":
            try:
                with open(key, "rb") as handle:
                    while chunk := handle.read(_CHUNK):
                        digest.update(chunk)
            except FileNotFoundError:
                return None
            return digest.hexdigest()
        try:
            body = self.s3.get_object(Bucket=bucket, Key=key)["Body"]
        except Exception as exc:
            if _is_not_found(exc):
                return None
            raise
        for chunk in body.iter_chunks(_CHUNK):
            digest.update(chunk)
        return digest.hexdigest()

    def write(self, uri: str, data: bytes) -> None:
        scheme, bucket, key = storage_layout.split_uri(uri)
        if scheme == "file":
            target = Path(key)
            target.parent.mkdir(parents=True, exist_ok=True)
            # write-then-rename: a reader sees the old file or the whole new one
            with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as handle:
                handle.write(data)
            os.replace(handle.name, target)
            return
        self.s3.put_object(Bucket=bucket, Key=key, Body=data)

    def upload_file(self, path: Path, uri: str) -> None:
        scheme, bucket, key = storage_layout.split_uri(uri)
        if scheme == "file":
            Path(key).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(key).with_name(Path(key).name + ".partial")
            shutil.copyfile(path, tmp)
            os.replace(tmp, key)
            return
        self.s3.upload_file(str(path), bucket, key)

    def download_file(self, uri: str, path: Path) -> None:
        """Stream an object to a local file (model shards are larger than memory should hold twice)."""
        scheme, bucket, key = storage_layout.split_uri(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        if scheme == "file":
            shutil.copyfile(key, path)
            return
        self.s3.download_file(bucket, key, str(path))

    def list(self, prefix_uri: str) -> list[str]:
        return [entry.uri for entry in self.list_objects(prefix_uri)]

    def list_objects(self, prefix_uri: str) -> list[ObjectInfo]:
        """Every object under the prefix with its size and version tag, sorted by URI; one LIST request
        per 1,000 objects on S3. The tag (the S3 ETag; a file's mtime) changes when the object does."""
        scheme, bucket, key = storage_layout.split_uri(prefix_uri)
        if scheme == "file":
            root = Path(key)
            if root.is_file():  # the object itself, named as asked
                return [ObjectInfo(prefix_uri, root.stat().st_size, str(root.stat().st_mtime_ns))]
            files = sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
            return [ObjectInfo(f"file://{p}", p.stat().st_size, str(p.stat().st_mtime_ns)) for p in files]
        objects = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            objects.extend(ObjectInfo(f"s3://{bucket}/{item['Key']}", int(item["Size"]),
                                      item.get("ETag", "").strip('"')) for item in page.get("Contents", []))
        return sorted(objects)


def _is_not_found(exc: Exception) -> bool:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --- publishing and verifying ------------------------------------------------------------------


def _listing(directory: Path) -> list[dict]:
    """Every file under `directory` with its sha256 and size; empty files and empty directories refused."""
    files = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        size = path.stat().st_size
        if size == 0:
            raise ValueError(f"refusing to publish empty file {path.relative_to(directory)}")
        files.append({"path": str(path.relative_to(directory)), "sha256": _file_sha256(path), "size": size})
    if not files:
        raise ValueError(f"no files to publish in {directory}")
    return files


def _upload(store: ObjectStore, directory: Path, files: list[dict], prefix: str, what: str) -> None:
    for index, entry in enumerate(files, 1):
        store.upload_file(directory / entry["path"], prefix + entry["path"])
        log.info(f"uploaded {what} file", extra={"file": entry["path"], "n": index, "of": len(files)})


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def publish_adapter(store: ObjectStore, adapter_dir: Path, job_prefix: str, fields: dict,
                    merged_dir: Path | None = None) -> dict:
    """Upload every file of `adapter_dir` under its content-addressed path, then `manifest.json`.

    `fields` carries the rest of the manifest (baseModel, dataset, config, metrics...). Empty files
    are refused: an adapter with an empty tensor file is a broken save, not something to serve.
    `merged_dir` (output.mergeAdapter) is published first as its own artifact, which the adapter
    manifest references under `merged`: its files are never in the adapter's file list.
    """
    adapter_dir = Path(adapter_dir)
    files = _listing(adapter_dir)
    digest = manifest_api.files_digest(files)
    created = fields.get("createdAt") or _now()
    merged = None
    if merged_dir is not None:
        provenance = {key: fields[key] for key in ("job", "task", "baseModel") if key in fields}
        merged = publish_merged(store, Path(merged_dir), job_prefix,
                                {**provenance, "adapterDigest": digest, "createdAt": created})
    prefix = storage_layout.adapter_prefix(job_prefix, digest)
    _upload(store, adapter_dir, files, prefix, "adapter")
    document = {
        **fields,
        "api": manifest_api.MANIFEST_API,
        "digest": digest,
        "adapterPath": prefix[len(job_prefix.rstrip("/")) + 1 :],
        "files": files,
        "createdAt": created,
    }
    if merged is not None:
        document["merged"] = merged
    store.write(storage_layout.manifest_uri(job_prefix), json.dumps(document, indent=2, sort_keys=True).encode())
    return document


def publish_merged(store: ObjectStore, merged_dir: Path, job_prefix: str, fields: dict) -> dict:
    """The merged model under its own digest's prefix, then its manifest; returns the reference the
    adapter manifest carries (uri, manifestUri, digest, sizeBytes)."""
    files = _listing(merged_dir)
    digest = manifest_api.files_digest(files)
    prefix = storage_layout.merged_prefix(job_prefix, digest)
    _upload(store, merged_dir, files, prefix, "merged model")
    manifest_uri = storage_layout.merged_manifest_uri(job_prefix)
    document = {**fields, "api": manifest_api.MERGED_MANIFEST_API, "digest": digest,
                "modelPath": prefix[len(job_prefix.rstrip("/")) + 1 :], "files": files,
                "createdAt": fields.get("createdAt") or _now()}
    store.write(manifest_uri, json.dumps(document, indent=2, sort_keys=True).encode())
    return {"uri": prefix, "manifestUri": manifest_uri, "digest": digest,
            "sizeBytes": manifest_api.total_size(document)}


def check_published(store: ObjectStore, job_prefix: str, verify_content: bool = True,
                    verify_merged: bool = False) -> manifest_api.ManifestCheck:
    """Read `manifest.json`, check its digest, and check every file's size (and sha256 when asked).

    `verify_merged`: also verify the merged model the manifest references (the FineTuneJob's publish
    check); readers that only use the adapter (agents, adapter sources, evaluation references) skip it.
    """
    raw = store.read(storage_layout.manifest_uri(job_prefix))
    if raw is None:
        return manifest_api.ManifestCheck(found=False)
    try:
        document = json.loads(raw)
    except ValueError as exc:
        return manifest_api.ManifestCheck(True, [ManifestProblem("ManifestInvalid", f"not JSON: {exc}")])
    problems = manifest_api.check_document(document)
    if problems:
        return manifest_api.ManifestCheck(True, problems, document)
    adapter_uri = job_prefix.rstrip("/") + "/" + document["adapterPath"].strip("/") + "/"
    expected_prefix = storage_layout.adapter_prefix(job_prefix, document["digest"])
    if adapter_uri != expected_prefix:
        problems.append(ManifestProblem(
            "DigestMismatch", f"adapterPath {document['adapterPath']!r} is not the digest's path"))
    problems += _adapter_file_problems(store, adapter_uri, document["files"], verify_content)
    merged = None
    if verify_merged and "merged" in document:
        merged_problems, merged = check_merged(store, job_prefix, document["merged"], document["digest"],
                                               verify_content)
        problems += merged_problems
    return manifest_api.ManifestCheck(True, problems, document, adapter_uri, merged)


def check_merged(store: ObjectStore, job_prefix: str, reference: dict, adapter_digest: str,
                 verify_content: bool) -> tuple[list[ManifestProblem], dict | None]:
    """The merged model an adapter manifest references: at its expected places, its own manifest
    well formed and matching the reference, every file there (sizes, sha256 when asked)."""
    manifest_uri = storage_layout.merged_manifest_uri(job_prefix)
    model_uri = storage_layout.merged_prefix(job_prefix, reference["digest"])
    if reference["manifestUri"] != manifest_uri or reference["uri"] != model_uri:
        return [ManifestProblem("MergedModelInvalid", f"merged {reference['uri']} ({reference['manifestUri']}) "
                                f"is not at the digest's path {model_uri} ({manifest_uri})")], None
    raw = store.read(manifest_uri)
    if raw is None:
        return [ManifestProblem("MergedModelMissing", f"{manifest_uri} is missing")], None
    try:
        document = json.loads(raw)
    except ValueError as exc:
        return [ManifestProblem("MergedModelInvalid", f"{manifest_uri} is not JSON: {exc}")], None
    problems = [ManifestProblem("MergedModelInvalid" if p.reason == "ManifestInvalid" else p.reason,
                                f"{manifest_uri}: {p.message}") for p in manifest_api.check_merged_document(document)]
    if problems:
        return problems, None
    if document["digest"] != reference["digest"]:
        return [ManifestProblem("DigestMismatch", f"{manifest_uri} has digest {document['digest']}, the adapter "
                                f"manifest references {reference['digest']}")], None
    if job_prefix.rstrip("/") + "/" + document["modelPath"].strip("/") + "/" != model_uri:
        return [ManifestProblem("DigestMismatch",
                                f"modelPath {document['modelPath']!r} is not the digest's path")], None
    if document.get("adapterDigest") != adapter_digest:
        return [ManifestProblem("MergedModelInvalid", f"{manifest_uri} was merged from adapter "
                                f"{document.get('adapterDigest')}, not {adapter_digest}")], None
    problems = _merged_file_problems(store, model_uri, document["files"], verify_content)
    verified = {"uri": model_uri, "manifestUri": manifest_uri, "digest": document["digest"],
                "sizeBytes": manifest_api.total_size(document)}
    return problems, None if problems else verified


def _file_findings(store: ObjectStore, prefix: str, files: list[dict],
                   verify_content: bool) -> list[tuple[str, dict, int | None]]:
    """(finding, entry, size found) for every listed file that is not as listed: "missing", "size"
    or "content" (the sha256, checked only when asked: it reads every byte)."""
    findings = []
    for entry in files:
        uri = prefix + entry["path"]
        size = store.size(uri)
        if size is None:
            findings.append(("missing", entry, None))
        elif size != entry["size"]:
            findings.append(("size", entry, size))
        elif verify_content and store.sha256(uri) != entry["sha256"]:
            findings.append(("content", entry, size))
    return findings


def _adapter_file_problems(store: ObjectStore, prefix: str, files: list[dict],
                           verify_content: bool) -> list[ManifestProblem]:
    problems = []
    for finding, entry, size in _file_findings(store, prefix, files, verify_content):
        path = entry["path"]
        if finding == "missing":
            problems.append(ManifestProblem("AdapterFileMissing", f"{path} is missing"))
        elif finding == "size":
            problems.append(ManifestProblem(
                "AdapterFileCorrupt", f"{path} has {size} bytes, manifest says {entry['size']}"))
        else:
            problems.append(ManifestProblem(
                "DigestMismatch", f"{path} does not match its sha256 in the manifest"))
    return problems


def _merged_file_problems(store: ObjectStore, prefix: str, files: list[dict],
                          verify_content: bool) -> list[ManifestProblem]:
    problems = []
    for finding, entry, size in _file_findings(store, prefix, files, verify_content):
        path = entry["path"]
        if finding == "missing":
            problems.append(ManifestProblem("MergedFileMissing", f"merged model: {path} is missing"))
        elif finding == "size":
            problems.append(ManifestProblem(
                "MergedFileCorrupt", f"merged model: {path} has {size} bytes, its manifest says {entry['size']}"))
        else:
            problems.append(ManifestProblem(
                "DigestMismatch", f"merged model: {path} does not match its sha256 in the manifest"))
    return problems

"""Publishing and verifying adapters on a local (file://) store; the same code talks to S3."""

from __future__ import annotations

import json

import pytest

from kubetune.api import manifest as manifest_api
from kubetune.api import storage_layout
from kubetune.clients.storage import ObjectStore, check_published, publish_adapter


@pytest.fixture
def adapter_dir(tmp_path):
    root = tmp_path / "adapter"
    root.mkdir()
    (root / "adapter_model.safetensors").write_bytes(b"\x01" * 4096)
    (root / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    (root / "head").mkdir()
    (root / "head" / "classifier.safetensors").write_bytes(b"\x02" * 512)
    return root


@pytest.fixture
def job_prefix(tmp_path):
    return f"file://{tmp_path}/store/team-a/job/uid-1/"


def test_publish_then_verify(adapter_dir, job_prefix):
    store = ObjectStore()
    doc = publish_adapter(store, adapter_dir, job_prefix, {"metrics": {"eval_loss": 0.5}})
    assert doc["digest"] == manifest_api.files_digest(doc["files"])
    assert doc["adapterPath"] == storage_layout.adapter_prefix(job_prefix, doc["digest"])[len(job_prefix):]
    assert sorted(f["path"] for f in doc["files"]) == [
        "adapter_config.json", "adapter_model.safetensors", "head/classifier.safetensors"]
    check = check_published(store, job_prefix)
    assert check.verified, check.problems
    assert check.adapter_uri == storage_layout.adapter_prefix(job_prefix, doc["digest"])


def test_digest_is_content_addressed(adapter_dir, tmp_path):
    a = publish_adapter(ObjectStore(), adapter_dir, f"file://{tmp_path}/a/", {})
    b = publish_adapter(ObjectStore(), adapter_dir, f"file://{tmp_path}/b/", {})
    assert a["digest"] == b["digest"]
    (adapter_dir / "adapter_model.safetensors").write_bytes(b"\x03" * 4096)
    c = publish_adapter(ObjectStore(), adapter_dir, f"file://{tmp_path}/c/", {})
    assert c["digest"] != a["digest"]


def test_missing_manifest(job_prefix):
    check = check_published(ObjectStore(), job_prefix)
    assert not check.found and not check.verified


def test_tampered_file_same_size_is_caught_by_sha256(adapter_dir, job_prefix):
    store = ObjectStore()
    doc = publish_adapter(store, adapter_dir, job_prefix, {})
    _, _, path = storage_layout.split_uri(job_prefix + doc["adapterPath"] + "adapter_model.safetensors")
    with open(path, "r+b") as handle:
        handle.write(b"\x09")
    check = check_published(store, job_prefix)
    assert [p.reason for p in check.problems] == ["DigestMismatch"]
    assert check_published(store, job_prefix, verify_content=False).verified  # size alone cannot see it


def test_truncated_and_missing_files(adapter_dir, job_prefix):
    store = ObjectStore()
    doc = publish_adapter(store, adapter_dir, job_prefix, {})
    base = storage_layout.split_uri(job_prefix + doc["adapterPath"])[2]
    with open(base + "adapter_model.safetensors", "r+b") as handle:
        handle.truncate(10)
    (adapter_dir.parent / "gone").mkdir()
    import os

    os.remove(base + "adapter_config.json")
    reasons = sorted(p.reason for p in check_published(store, job_prefix).problems)
    assert reasons == ["AdapterFileCorrupt", "AdapterFileMissing"]


def test_manifest_edited_after_publishing_fails_digest(adapter_dir, job_prefix):
    store = ObjectStore()
    publish_adapter(store, adapter_dir, job_prefix, {})
    uri = storage_layout.manifest_uri(job_prefix)
    doc = json.loads(store.read(uri))
    doc["files"][0]["sha256"] = "0" * 64
    store.write(uri, json.dumps(doc).encode())
    assert [p.reason for p in check_published(store, job_prefix).problems] == ["DigestMismatch"]


def test_empty_files_are_refused_and_nothing_is_published(adapter_dir, job_prefix):
    (adapter_dir / "adapter_model.safetensors").write_bytes(b"")
    store = ObjectStore()
    with pytest.raises(ValueError, match=r"empty file adapter_model\.safetensors"):
        publish_adapter(store, adapter_dir, job_prefix, {})
    assert store.list(job_prefix) == []


@pytest.mark.parametrize(("doc", "reason"), [
    ([], "ManifestInvalid"),
    ({"api": "other", "files": [{"path": "a", "sha256": "a" * 64, "size": 1}]}, "ManifestInvalid"),
    ({"api": manifest_api.MANIFEST_API, "files": []}, "ManifestInvalid"),
    ({"api": manifest_api.MANIFEST_API, "files": [{"path": "../x", "sha256": "a" * 64, "size": 1}]},
     "ManifestInvalid"),
    ({"api": manifest_api.MANIFEST_API, "files": [{"path": "a", "sha256": "zz", "size": 1}]}, "ManifestInvalid"),
    ({"api": manifest_api.MANIFEST_API, "files": [{"path": "a", "sha256": "a" * 64, "size": 1}],
      "digest": "sha256:" + "0" * 64, "adapterPath": "adapter/x/"}, "DigestMismatch"),
])
def test_document_checks(doc, reason):
    problems = manifest_api.check_document(doc)
    assert problems and problems[0].reason == reason

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


@pytest.fixture
def merged_dir(tmp_path):
    root = tmp_path / "merged"
    root.mkdir()
    (root / "model.safetensors").write_bytes(b"\x05" * 65536)
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return root


def test_a_merged_model_is_its_own_artifact(adapter_dir, merged_dir, job_prefix):
    store = ObjectStore()
    doc = publish_adapter(store, adapter_dir, job_prefix, {"baseModel": {"uri": "hf://x"}}, merged_dir=merged_dir)
    assert sorted(f["path"] for f in doc["files"]) == [
        "adapter_config.json", "adapter_model.safetensors", "head/classifier.safetensors"]
    reference = doc["merged"]
    merged_doc = json.loads(store.read(storage_layout.merged_manifest_uri(job_prefix)))
    assert manifest_api.check_merged_document(merged_doc) == []
    assert reference == {"uri": storage_layout.merged_prefix(job_prefix, merged_doc["digest"]),
                         "manifestUri": storage_layout.merged_manifest_uri(job_prefix),
                         "digest": merged_doc["digest"], "sizeBytes": manifest_api.total_size(merged_doc)}
    assert merged_doc["adapterDigest"] == doc["digest"] and merged_doc["baseModel"] == {"uri": "hf://x"}
    assert {f["path"] for f in merged_doc["files"]} == {"model.safetensors", "config.json"}
    check = check_published(store, job_prefix, verify_merged=True)
    assert check.verified, check.problems
    assert check.merged == reference
    assert check_published(store, job_prefix).merged is None  # adapter readers never look at it


def test_a_broken_merged_model_fails_only_the_merged_check(adapter_dir, merged_dir, job_prefix):
    store = ObjectStore()
    doc = publish_adapter(store, adapter_dir, job_prefix, {}, merged_dir=merged_dir)
    weights = storage_layout.split_uri(doc["merged"]["uri"] + "model.safetensors")[2]
    with open(weights, "r+b") as handle:
        handle.write(b"\x09")
    check = check_published(store, job_prefix, verify_merged=True)
    assert [p.reason for p in check.problems] == ["DigestMismatch"]
    assert check.problems[0].message == "merged model: model.safetensors does not match its sha256 in the manifest"
    assert check.merged is None
    assert check_published(store, job_prefix).verified  # the adapter itself is intact: agents may serve it
    with open(weights, "r+b") as handle:
        handle.truncate(100)
    assert [p.reason for p in check_published(store, job_prefix, verify_merged=True).problems] == [
        "MergedFileCorrupt"]
    import os

    os.remove(storage_layout.split_uri(storage_layout.merged_manifest_uri(job_prefix))[2])
    assert [p.reason for p in check_published(store, job_prefix, verify_merged=True).problems] == [
        "MergedModelMissing"]


def test_a_merged_reference_elsewhere_or_from_another_adapter_is_refused(adapter_dir, merged_dir, job_prefix,
                                                                        tmp_path):
    store = ObjectStore()
    publish_adapter(store, adapter_dir, job_prefix, {}, merged_dir=merged_dir)
    uri = storage_layout.manifest_uri(job_prefix)
    moved = json.loads(store.read(uri))
    moved["merged"]["uri"] = f"file://{tmp_path}/elsewhere/"
    store.write(uri, json.dumps(moved).encode())
    assert [p.reason for p in check_published(store, job_prefix, verify_merged=True).problems] == [
        "MergedModelInvalid"]
    # another adapter's manifest pointing at this merged model: merged from a different adapter
    (adapter_dir / "adapter_model.safetensors").write_bytes(b"\x07" * 4096)
    other = f"file://{tmp_path}/store/team-a/job/uid-2/"
    doc = publish_adapter(store, adapter_dir, other, {}, merged_dir=merged_dir)
    merged_doc = json.loads(store.read(doc["merged"]["manifestUri"]))
    merged_doc["adapterDigest"] = "sha256:" + "0" * 64
    store.write(doc["merged"]["manifestUri"], json.dumps(merged_doc).encode())
    problems = check_published(store, other, verify_merged=True).problems
    assert [p.reason for p in problems] == ["MergedModelInvalid"] and "merged from adapter" in problems[0].message


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


_FILES = [{"path": "a", "sha256": "a" * 64, "size": 1}]
VALID = {"api": manifest_api.MANIFEST_API, "files": _FILES, "digest": manifest_api.files_digest(_FILES),
         "adapterPath": "adapter/x/"}


@pytest.mark.parametrize(("doc", "reason"), [
    ([], "ManifestInvalid"),
    ({"api": "other", "files": [{"path": "a", "sha256": "a" * 64, "size": 1}]}, "ManifestInvalid"),
    ({"api": manifest_api.MANIFEST_API, "files": []}, "ManifestInvalid"),
    ({"api": manifest_api.MANIFEST_API, "files": [{"path": "../x", "sha256": "a" * 64, "size": 1}]},
     "ManifestInvalid"),
    ({"api": manifest_api.MANIFEST_API, "files": [{"path": "a", "sha256": "zz", "size": 1}]}, "ManifestInvalid"),
    ({"api": manifest_api.MANIFEST_API, "files": [{"path": "a", "sha256": "a" * 64, "size": 1}],
      "digest": "sha256:" + "0" * 64, "adapterPath": "adapter/x/"}, "DigestMismatch"),
    ({**VALID, "merged": {"uri": "s3://b/m/", "manifestUri": "s3://b/m.json"}}, "ManifestInvalid"),
    ({**VALID, "merged": {"uri": "s3://b/m/", "manifestUri": "s3://b/m.json", "digest": "md5:x"}}, "ManifestInvalid"),
])
def test_document_checks(doc, reason):
    problems = manifest_api.check_document(doc)
    assert problems and problems[0].reason == reason

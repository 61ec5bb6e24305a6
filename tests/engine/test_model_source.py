"""Where the CPU engine gets its base model (kubetune_engine.model_source): local directories as they are,
remote prefixes copied whole and atomically into the download dir, every refusal naming the model.
The copy goes through the same ObjectStore an s3:// prefix uses; a file:// prefix stands in for S3 here
(tests/integration/test_managed_cpu_engine.py fetches from a real S3 server)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kubetune.clients.storage import ObjectStore
from kubetune_engine import model_source
from kubetune_engine.model_source import ModelSourceError


def make_model(root: Path) -> Path:
    (root / "tokenizer").mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "llama"}')
    (root / "model.safetensors").write_bytes(b"\0" * 1024)
    (root / "tokenizer" / "tokenizer.json").write_text("{}")
    return root


def test_local_directories_are_used_in_place(tmp_path: Path):
    model = make_model(tmp_path / "m")
    assert model_source.local_model_dir(str(model), None) == model
    assert model_source.local_model_dir(f"file://{model}", None) == model
    with pytest.raises(ModelSourceError, match=rf"model {tmp_path}: no config.json in {tmp_path}"):
        model_source.local_model_dir(str(tmp_path), None)


def test_remote_models_need_a_download_dir_and_a_known_scheme(tmp_path: Path):
    with pytest.raises(ModelSourceError, match="s3://b/m: --download-dir is required"):
        model_source.local_model_dir("s3://b/m", None)
    with pytest.raises(ModelSourceError, match=r"gs://b/m: unsupported scheme gs://"):
        model_source.local_model_dir("gs://b/m", str(tmp_path))


def test_a_prefix_is_copied_whole_then_reused_without_asking_the_store(tmp_path: Path):
    source = make_model(tmp_path / "bucket" / "models" / "llama")
    prefix = f"file://{source}"
    downloads = tmp_path / "downloads"
    stale = downloads / f"{model_source.PARTIAL_PREFIX}{model_source.copy_dir_for(downloads, prefix).name}-x1"
    stale.mkdir(parents=True)  # what a container killed mid-copy leaves
    copy = model_source.fetch_prefix(ObjectStore(), prefix, downloads)
    assert copy == model_source.copy_dir_for(downloads, prefix) and copy.parent == downloads
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*") if p.is_file()) == [
        "config.json", "model.safetensors", "tokenizer/tokenizer.json"]
    assert not stale.exists() and os.listdir(downloads) == [copy.name]
    (source / "config.json").unlink()  # a second start never reads the store again
    assert model_source.fetch_prefix(ObjectStore(), prefix, downloads) == copy
    assert (copy / "config.json").is_file()


def test_an_empty_or_failing_prefix_leaves_no_copy(tmp_path: Path):
    downloads = tmp_path / "downloads"
    with pytest.raises(ModelSourceError, match=r"model file:///nowhere/m: no objects under that prefix"):
        model_source.fetch_prefix(ObjectStore(), "file:///nowhere/m", downloads)

    class Failing(ObjectStore):
        def download_file(self, uri: str, path: Path) -> None:
            raise ConnectionError("connection reset by peer")

    prefix = f"file://{make_model(tmp_path / 'm')}"
    with pytest.raises(ModelSourceError, match=r"download failed: connection reset by peer"):
        model_source.fetch_prefix(Failing(), prefix, downloads)
    assert os.listdir(downloads) == []  # no partial copy, no directory a restart would trust


def test_the_s3_store_is_the_one_the_aws_variables_describe(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    settings = model_source.s3_store_from_env().s3_settings
    assert (settings.endpoint, settings.region, settings.access_key, settings.secret_key) == (
        "http://minio:9000", "eu-west-1", "id", "secret")
    assert "secret" not in repr(settings)

"""Inputs are downloaded once per pod: local rank 0 fetches the base model, the data and the reference
into the pod's cache, the other ranks wait and read it. Bytes are counted by a proxy in front of S3: the
job's output endpoint is the proxy's, so the rendered pod (run verbatim) reaches S3 only through it."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune_testing.counting_proxy import CountingProxy
from kubetune_testing.seaweedfs import ACCESS_KEY, BUCKET, SECRET_KEY
from kubetune_trainer import node_cache
from kubetune_trainer.modeling import BadInput, resolve_model_dir
from tests.integration.conftest import s3_server  # noqa: F401 (fixture)

from .conftest import job_spec, lm_corpus, write_jsonl
from .rendered import render_run

MODEL_PREFIX = f"s3://{BUCKET}/node-downloads/model/"
DATA_URI = f"s3://{BUCKET}/node-downloads/train.jsonl"
S3_SECRET = "node-downloads-s3"


@pytest.fixture(scope="module")
def proxy(s3_server):  # noqa: F811 (the fixture imported above)
    with CountingProxy(s3_server.endpoint) as counting:
        yield counting


@pytest.fixture(scope="module")
def model_in_s3(s3_server, tiny_llama) -> int:  # noqa: F811
    """The tiny model uploaded as an s3:// base model; returns its size in bytes."""
    store = s3_server.store()
    files = sorted(p for p in tiny_llama.rglob("*") if p.is_file())
    for path in files:
        store.upload_file(path, MODEL_PREFIX + str(path.relative_to(tiny_llama)))
    return sum(p.stat().st_size for p in files)


def run_job(spec: dict, name: str, tmp_path: Path) -> tuple[int, str]:
    """The job's rendered PyTorchJob run as the training operator would: the master's exit code, its log."""
    run, _ = render_run(spec, name, tmp_path / name,
                        secrets={S3_SECRET: {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}})
    run.start()
    run.wait(600)
    master = run.pod()
    return master.exit_code, master.log.read_text(errors="replace")


def s3_job(tiny_llama, tmp_path: Path, endpoint: str, data_uri: str = DATA_URI) -> dict:
    spec = job_spec(tiny_llama, tmp_path / "unused.jsonl", tmp_path / "unused", training__maxSteps=2,
                    training__perDeviceBatchSize=4, training__evalSteps=2,
                    distributed={"nodes": 1, "gpusPerNode": 0, "processesPerNode": 2, "deepspeed": {"enabled": False}})
    spec["baseModel"] = {"uri": MODEL_PREFIX.rstrip("/")}
    spec["dataset"]["uri"] = data_uri
    spec["output"] = {"uri": f"s3://{BUCKET}/node-downloads/jobs", "endpoint": endpoint,
                      "credentials": {"secretName": S3_SECRET}}
    return spec


def test_two_processes_fetch_the_model_and_the_data_once_per_pod(proxy, s3_server, model_in_s3,  # noqa: F811
                                                                 tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", lm_corpus(32))
    s3_server.store().upload_file(data, DATA_URI)
    proxy.traffic.reset()
    code, log = run_job(s3_job(tiny_llama, tmp_path, proxy.endpoint), "once", tmp_path)
    assert code == 0, log[-4000:]
    model_files = sum(1 for p in tiny_llama.rglob("*") if p.is_file())
    assert proxy.traffic.downloaded(f"/{BUCKET}/node-downloads/model/") == model_in_s3
    assert proxy.traffic.gets(f"/{BUCKET}/node-downloads/model/") == model_files
    assert proxy.traffic.downloaded(f"/{BUCKET}/node-downloads/train.jsonl") == data.stat().st_size
    assert proxy.traffic.gets(f"/{BUCKET}/node-downloads/train.jsonl") == 1


def test_a_missing_dataset_is_bad_input_on_every_rank_without_a_wait(proxy, model_in_s3, tiny_llama,
                                                                     tmp_path):
    missing = f"s3://{BUCKET}/node-downloads/missing.jsonl"
    code, log = run_job(s3_job(tiny_llama, tmp_path, proxy.endpoint, missing), "missing", tmp_path)
    assert code == 2, log[-4000:]
    refusals = [line for line in log.splitlines() if "bad input: nothing was trained" in line]
    assert len(refusals) == 2 and all(f"dataset.uri {missing} does not exist" in line for line in refusals)


def test_the_cache_is_reused_only_while_whole_and_current(proxy, s3_server, model_in_s3, tmp_path):  # noqa: F811
    store = s3_server.store()
    proxy_store = type(store)(type(store.s3_settings)(endpoint=proxy.endpoint, access_key=ACCESS_KEY,
                                                      secret_key=SECRET_KEY))
    model_path = f"/{BUCKET}/node-downloads/model/"
    base = {"uri": MODEL_PREFIX}

    def fetched_bytes() -> int:
        proxy.traffic.reset()
        local = resolve_model_dir(base, proxy_store, tmp_path / "cache")
        assert node_cache.complete_copy(local) is not None
        return proxy.traffic.downloaded(model_path)

    assert fetched_bytes() == model_in_s3
    assert fetched_bytes() == 0  # a pod restarted with the same volume: a cache hit
    local = resolve_model_dir(base, proxy_store, tmp_path / "cache", fetch=False)
    weights = local / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # killed mid-write, or corrupted: re-downloaded
    assert fetched_bytes() == model_in_s3
    (local / node_cache.MARKER).unlink()  # killed before the marker: never trusted
    (local / "config.json.partial").write_text("{")
    assert fetched_bytes() == model_in_s3
    assert not (local / "config.json.partial").exists()
    store.write(MODEL_PREFIX + "extra.txt", b"new file in the source")  # the source changed: fetched again
    try:
        assert fetched_bytes() == model_in_s3 + len(b"new file in the source")
    finally:
        store.s3.delete_object(Bucket=BUCKET, Key="node-downloads/model/extra.txt")
    with pytest.raises(node_cache.CacheMissing, match="KUBETUNE_WORK_DIR"):
        resolve_model_dir(base, proxy_store, tmp_path / "elsewhere", fetch=False)
    with pytest.raises(BadInput, match="no objects"):
        resolve_model_dir({"uri": f"s3://{BUCKET}/node-downloads/none"}, proxy_store, tmp_path / "cache")


def test_once_per_node_fetches_on_local_rank_0_and_reads_elsewhere():
    def refuse():
        raise BadInput("dataset.uri s3://b/k does not exist")

    with pytest.raises(BadInput, match="does not exist"):  # alone (no process group): raised as it was
        node_cache.once_per_node(True, refuse, lambda: "local")
    assert node_cache.once_per_node(True, lambda: "fetched", lambda: "local") == "fetched"
    assert node_cache.once_per_node(False, refuse, lambda: "local") == "local"  # never fetches
    assert node_cache.failure_kind(BadInput("x")) == "BadInput"
    assert node_cache.failure_kind(node_cache.IncompleteDownload("short")) == "Retryable"
    assert node_cache.failure_kind(ValueError("bug")) == "Failed"

"""The operator and the real trainer together: kopf + KMock + SeaweedFS + the rendered pods.

The training-operator stand-in (kubetune_testing.training_operator_loop) plays only what cannot run
here, the Kubeflow training operator and the kubelet: it runs every PyTorchJob the operator creates,
its pods' command and env exactly as rendered (Secrets resolved from the cluster, the job-config
ConfigMap mounted), and writes the PyTorchJob's status. Data comes from S3 and the adapter goes to S3.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from kubetune.api import jobconfig
from kubetune.clients import kube
from kubetune.clients.storage import check_published
from kubetune_testing import training_operator_loop
from kubetune_testing.seaweedfs import BUCKET, SECRET_KEY
from tests.trainer.conftest import lm_corpus

from .conftest import NS, eventually
from .stage_helpers import data_stage_name, events_for, wait_status
from .test_finetunejob_flows import condition, status_of, submit, wait_phase

pytestmark = pytest.mark.integration


def spec_for(tiny_llama, rows) -> dict:
    return {
        "baseModel": {"uri": f"file://{tiny_llama}"},
        "dataset": {"uri": f"s3://{BUCKET}/data/train.jsonl", "format": "prompt-completion"},
        "method": {"type": "LoRA", "lora": {"rank": 4, "targetModules": ["q_proj", "v_proj"]}},
        "training": {"maxSteps": 60, "learningRate": 0.01, "perDeviceBatchSize": 4, "maxSeqLength": 64,
                     "precision": "FP32", "gradientCheckpointing": False, "evalSteps": 20},
        "distributed": {"nodes": 1, "gpusPerNode": 0, "processesPerNode": 1, "deepspeed": {"enabled": False}},
    }


async def test_real_training_publishes_and_reports_progress(operator, api, s3_server, tiny_llama, tmp_path):
    s3_server.store().write(f"s3://{BUCKET}/data/train.jsonl",
                            "".join(json.dumps(r) + "\n" for r in lm_corpus(96)).encode())
    async with training_operator_loop.running(api.client, NS, tmp_path) as pods:
        await submit(api, s3_server, "real-train", data_stage=False, **spec_for(tiny_llama, None))

        async def training_progress():
            progress = (await status_of(api, "real-train")).get("progress") or {}
            # any stage past the first step: on a fast machine the run may be done before a poll sees "training"
            return progress if progress.get("step", 0) > 0 else None

        progress = await eventually(training_progress, timeout=120)
        assert progress["totalSteps"] == 60 and 0 <= progress["percent"] <= 100
        assert progress["trainLoss"] > 0 and progress["tokensPerSecond"] > 0
        status = await wait_phase(api, "real-train", "Succeeded", timeout=300)
        run = pods.runs["real-train"]
        output = run.logs()
    assert run.phase == "Succeeded", output
    pytorchjob = await api.get(kube.PYTORCHJOBS, "real-train")
    assert pytorchjob["status"]["replicaStatuses"]["Master"]["succeeded"] == 1
    assert condition(status, "AdapterPublished")["reason"] == "Verified"
    adapter = status["adapter"]
    assert adapter["metrics"]["eval_loss"] < adapter["baselineMetrics"]["eval_loss"]
    assert pods.runs[data_stage_name("real-train")].phase == "Succeeded"  # the real CPU data stage ran first
    assert status["data"]["state"] == "Succeeded" and status["data"]["examples"]["train"] > 0
    assert adapter["uri"].startswith(f"s3://{BUCKET}/jobs/")
    job = await api.get(kube.FINETUNEJOBS, "real-train")
    assert check_published(s3_server.store(), adapter["manifestUri"].rsplit("/", 1)[0] + "/").verified
    assert SECRET_KEY not in json.dumps(job) + output


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


async def test_the_cpu_data_stage_refuses_bad_data_and_no_gpu_workload_is_created(
        operator, api, s3_server, tiny_llama, tmp_path):
    rows = [json.dumps(r) for r in lm_corpus(10)] + ['{"prompt": "alpha"}', "not json"]
    s3_server.store().write(f"s3://{BUCKET}/data/train.jsonl", ("\n".join(rows) + "\n").encode())
    async with training_operator_loop.running(api.client, NS, tmp_path) as pods:
        await submit(api, s3_server, "bad-rows", data_stage=False, **spec_for(tiny_llama, None))
        status = await wait_phase(api, "bad-rows", "Failed", timeout=180)
        run = pods.runs[data_stage_name("bad-rows")]
        await asyncio.sleep(1.0)  # a few resyncs: nothing more may be created
        names = [p["metadata"]["name"] for p in await api.list(kube.PYTORCHJOBS)]
    assert run.phase == "Failed" and run.pod().exit_code == jobconfig.EXIT_BAD_INPUT, run.logs()
    assert run.restarts == 0  # bad input is final: restartPolicy ExitCode does not retry 2
    assert status["failure"]["reason"] == "BadInput"
    message = status["failure"]["message"]
    assert "line 11" in message and "missing_field" in message and "line 12" in message
    assert status["data"]["state"] == "Failed" and "line 11" in status["data"]["message"]
    assert condition(status, "DataValidated")["status"] == "False"
    assert names == [data_stage_name("bad-rows")]  # no GPU workload was ever created
    pod_spec = (await api.get(kube.PYTORCHJOBS, names[0]))["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    assert "nvidia.com/gpu" not in json.dumps(pod_spec["spec"]["containers"][0]["resources"])
    assert not list(tmp_path.rglob("model.safetensors"))  # the tokenizer's files only, never the weights


async def test_the_cpu_data_stage_reports_to_status_and_drops_leakage(operator, api, s3_server, tiny_llama, tmp_path):
    train = lm_corpus(60)
    leaked = [{"prompt": r["prompt"].upper() + "!", "completion": "  " + r["completion"]} for r in train[:5]]
    fresh = [{"prompt": "zeta zeta", "completion": f"unseen words {i}"} for i in range(5)]
    s3_server.store().write(f"s3://{BUCKET}/data/leaky-train.jsonl", _jsonl(train))
    s3_server.store().write(f"s3://{BUCKET}/data/leaky-validation.jsonl", _jsonl(leaked + fresh))
    spec = spec_for(tiny_llama, None)
    spec["dataset"].update(uri=f"s3://{BUCKET}/data/leaky-train.jsonl",
                           validationUri=f"s3://{BUCKET}/data/leaky-validation.jsonl")
    async with training_operator_loop.running(api.client, NS, tmp_path) as pods:
        await submit(api, s3_server, "leaky", data_stage=False, **spec)
        status = await wait_status(api, "leaky", lambda s: (s.get("data") or {}).get("state") == "Succeeded",
                                   timeout=180)
        await eventually(lambda: api.get(kube.PYTORCHJOBS, "leaky"), timeout=20)  # the GPU stage, only now
        assert pods.runs[data_stage_name("leaky")].phase == "Succeeded"
    data = status["data"]
    assert "+" in data["digest"]
    assert data["leakage"] == {"policy": "Drop", "matched": 5, "dropped": 5}
    assert data["examples"]["validation"] == 5
    assert data["duplicates"]["acrossSplits"] == 5
    assert 0 < data["tokens"]["train"]["p50"] <= data["tokens"]["train"]["p95"] <= data["tokens"]["train"]["max"]
    leakage = next(e for e in await events_for(api, "leaky") if e["reason"] == "DataLeakage")
    assert leakage["type"] == "Warning" and "5 of 10 validation examples" in leakage["message"]


def test_s3_base_model_is_downloaded_once_into_the_cache(s3_server, tiny_llama, tmp_path):
    from kubetune_trainer.modeling import BadInput, resolve_model_dir

    store = s3_server.store()
    for path in sorted(p for p in tiny_llama.rglob("*") if p.is_file()):
        store.upload_file(path, f"s3://{BUCKET}/models/tiny/{path.relative_to(tiny_llama)}")
    local = resolve_model_dir({"uri": f"s3://{BUCKET}/models/tiny"}, store, tmp_path / "cache")
    assert sorted(p.name for p in local.iterdir() if p.name != ".complete") == \
        sorted(p.name for p in tiny_llama.iterdir())
    assert (local / "model.safetensors").read_bytes() == (tiny_llama / "model.safetensors").read_bytes()
    again = resolve_model_dir({"uri": f"s3://{BUCKET}/models/tiny/"}, store, tmp_path / "cache")
    assert again == local  # cached: not downloaded twice
    with pytest.raises(BadInput, match="no objects"):
        resolve_model_dir({"uri": f"s3://{BUCKET}/models/missing"}, store, tmp_path / "cache")

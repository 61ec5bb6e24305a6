"""The operator and the real trainer together: kopf + KMock + SeaweedFS + the rendered pods.

The training-operator stand-in (kubetune_testing.training_operator_loop) plays only what cannot run
here, the Kubeflow training operator and the kubelet: it runs every PyTorchJob the operator creates,
its pods' command and env exactly as rendered (Secrets resolved from the cluster, the job-config
ConfigMap mounted), and writes the PyTorchJob's status. Data comes from S3 and the adapter goes to S3.
"""

from __future__ import annotations

import json

import pytest

from kubetune.api import jobconfig
from kubetune.clients import kube
from kubetune.clients.storage import check_published
from kubetune_testing import training_operator_loop
from kubetune_testing.seaweedfs import BUCKET, SECRET_KEY
from tests.trainer.conftest import lm_corpus

from .conftest import NS, eventually
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
        await submit(api, s3_server, "real-train", **spec_for(tiny_llama, None))

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
    assert adapter["uri"].startswith(f"s3://{BUCKET}/jobs/")
    job = await api.get(kube.FINETUNEJOBS, "real-train")
    assert check_published(s3_server.store(), adapter["manifestUri"].rsplit("/", 1)[0] + "/").verified
    assert SECRET_KEY not in json.dumps(job) + output


async def test_bad_data_fails_the_job_with_the_trainers_reason(operator, api, s3_server, tiny_llama, tmp_path):
    rows = [json.dumps(r) for r in lm_corpus(10)] + ['{"prompt": "alpha"}']
    s3_server.store().write(f"s3://{BUCKET}/data/train.jsonl", ("\n".join(rows) + "\n").encode())
    async with training_operator_loop.running(api.client, NS, tmp_path) as pods:
        await submit(api, s3_server, "bad-train", **spec_for(tiny_llama, None))
        status = await wait_phase(api, "bad-train", "Failed", timeout=180)
        master = next(p for p in pods.runs["bad-train"].history if p.replica_type == "Master")
    assert master.exit_code == jobconfig.EXIT_BAD_INPUT  # not retried: restartPolicy ExitCode
    assert status["failure"]["reason"] == "BadInput"
    assert "line 11" in status["failure"]["message"] and "missing_field" in status["failure"]["message"]


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

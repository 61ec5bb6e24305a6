"""The operator and the real trainer together: kopf + KMock + SeaweedFS + a trainer process.

The test plays only what cannot run here, the Kubeflow training operator and the kubelet: it runs
the Master container's own command with its own environment (secretKeyRefs resolved, PET_* added)
against the ConfigMap the operator rendered, and writes the PyTorchJob's conditions from the exit
code. Data comes from S3 and the adapter goes to S3, as in a cluster.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys

import pytest

from kubetune.api import jobconfig
from kubetune.clients import kube
from kubetune.clients.storage import check_published
from kubetune_testing.seaweedfs import ACCESS_KEY, BUCKET, SECRET_KEY
from kubetune_testing.training_operator import PyTorchJobRun
from tests.trainer.conftest import lm_corpus

from .conftest import NS, eventually
from .stage_helpers import data_stage_name, events_for
from .test_finetunejob_flows import condition, status_of, submit, wait_phase

pytestmark = pytest.mark.integration


async def pod_command_and_env(api, name: str, tmp_path) -> tuple[list[str], dict]:
    """The Master pod's container command and environment, as the kubelet would run them: the config
    mounted (here: a file), secretKeyRefs resolved from the Secret, and the PET_* variables the
    Kubeflow training operator adds for torchrun."""
    config_map = await eventually(lambda: api.get(kube.CONFIGMAPS, f"{name}-config"))
    # The operator creates the ConfigMap before the PyTorchJob: wait for both, not just the first.
    pytorchjob = await eventually(lambda: api.get(kube.PYTORCHJOBS, name))
    config_path = tmp_path / "config.json"
    config_path.write_text(config_map["data"][jobconfig.CONFIG_FILE])
    container = pytorchjob["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    command = [sys.executable if part == "python" else part for part in container["command"]]
    command[command.index("--config") + 1] = str(config_path)
    secrets = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}  # the s3-creds Secret
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            env[item["name"]] = secrets[item["valueFrom"]["secretKeyRef"]["key"]]
    env["HF_HOME"] = str(tmp_path / "hf")  # the pod's cache volume
    env.update({"PET_NNODES": "1", "PET_NODE_RANK": "0", "PET_NPROC_PER_NODE": pytorchjob["spec"]["nprocPerNode"],
                "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(_free_port())})
    return [*command, "--work-dir", str(tmp_path / "work")], env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def start_trainer(api, name: str, tmp_path) -> asyncio.subprocess.Process:
    command, env = await pod_command_and_env(api, name, tmp_path)
    await api.set_pytorchjob_conditions(name, ("Created", "PyTorchJobCreated", "created"),
                                        ("Running", "PyTorchJobRunning", "running"),
                                        replicaStatuses={"Master": {"active": 1}})
    return await asyncio.create_subprocess_exec(*command, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)


async def finish(api, name: str, process) -> tuple[int, str]:
    output, _ = await process.communicate()
    code = process.returncode
    if code == 0:
        await api.set_pytorchjob_conditions(name, ("Succeeded", "PyTorchJobSucceeded", "done"),
                                            replicaStatuses={"Master": {"succeeded": 1}})
    else:
        await api.set_pytorchjob_conditions(name, ("Failed", "PyTorchJobFailed", f"Master exited with {code}"),
                                            replicaStatuses={"Master": {"failed": 1}})
    return code, output.decode(errors="replace")


async def play_pytorchjob(api, name: str, root) -> PyTorchJobRun:
    """Kubeflow's training operator for one PyTorchJob the operator created: its pods run as rendered
    (kubetune_testing.training_operator), its status written back to the API as they go."""
    pytorchjob = await eventually(lambda: api.get(kube.PYTORCHJOBS, name))
    volumes = pytorchjob["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["volumes"]
    config_map_name = next(v["configMap"]["name"] for v in volumes if "configMap" in v)
    config_map = await eventually(lambda: api.get(kube.CONFIGMAPS, config_map_name))
    run = PyTorchJobRun(pytorchjob, root, config_maps={config_map_name: config_map["data"]},
                        secrets={"s3-creds": {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}})
    run.start()
    await api.client.patch(kube.PYTORCHJOBS, NS, name, {"status": run.status()}, subresource="status")
    await asyncio.to_thread(run.wait, 240)
    await api.client.patch(kube.PYTORCHJOBS, NS, name, {"status": run.status()}, subresource="status")
    return run


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
    await submit(api, s3_server, "real-train", **spec_for(tiny_llama, None))
    process = await start_trainer(api, "real-train", tmp_path)

    async def training_progress():
        progress = (await status_of(api, "real-train")).get("progress") or {}
        # any stage past the first step: on a fast machine the run may be done before a poll sees "training"
        return progress if progress.get("step", 0) > 0 else None

    progress = await eventually(training_progress, timeout=60)
    assert progress["totalSteps"] == 60 and 0 <= progress["percent"] <= 100
    assert progress["trainLoss"] > 0 and progress["tokensPerSecond"] > 0

    code, output = await finish(api, "real-train", process)
    assert code == 0, output[-3000:]
    status = await wait_phase(api, "real-train", "Succeeded", timeout=20)
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
    await submit(api, s3_server, "bad-train", **spec_for(tiny_llama, None))
    process = await start_trainer(api, "bad-train", tmp_path)
    code, _ = await finish(api, "bad-train", process)
    assert code == jobconfig.EXIT_BAD_INPUT
    status = await wait_phase(api, "bad-train", "Failed")
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


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


async def test_the_cpu_data_stage_refuses_bad_data_and_no_gpu_workload_is_created(
        operator, api, s3_server, tiny_llama, tmp_path):
    rows = [json.dumps(r) for r in lm_corpus(10)] + ['{"prompt": "alpha"}', "not json"]
    s3_server.store().write(f"s3://{BUCKET}/data/bad-rows.jsonl", ("\n".join(rows) + "\n").encode())
    spec = spec_for(tiny_llama, None)
    spec["dataset"]["uri"] = f"s3://{BUCKET}/data/bad-rows.jsonl"
    await submit(api, s3_server, "bad-rows", data_stage=False, **spec)
    run = await play_pytorchjob(api, data_stage_name("bad-rows"), tmp_path)
    assert run.phase == "Failed" and run.pod().exit_code == jobconfig.EXIT_BAD_INPUT, run.logs()
    assert run.restarts == 0  # bad input is final: restartPolicy ExitCode does not retry 2
    status = await wait_phase(api, "bad-rows", "Failed")
    assert status["failure"]["reason"] == "BadInput"
    assert "line 11" in status["failure"]["message"] and "line 12" in status["failure"]["message"]
    assert status["data"]["state"] == "Failed" and "line 11" in status["data"]["message"]
    assert condition(status, "DataValidated")["status"] == "False"
    await asyncio.sleep(1.0)  # a few resyncs
    assert [p["metadata"]["name"] for p in await api.list(kube.PYTORCHJOBS)] == [data_stage_name("bad-rows")]
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
    await submit(api, s3_server, "leaky", data_stage=False, **spec)
    run = await play_pytorchjob(api, data_stage_name("leaky"), tmp_path)
    assert run.phase == "Succeeded", run.logs()
    await eventually(lambda: api.get(kube.PYTORCHJOBS, "leaky"), timeout=20)  # the GPU stage, only now
    data = (await status_of(api, "leaky"))["data"]
    assert data["state"] == "Succeeded" and "+" in data["digest"]
    assert data["leakage"] == {"policy": "Drop", "matched": 5, "dropped": 5}
    assert data["examples"]["validation"] == 5
    assert data["duplicates"]["acrossSplits"] == 5
    assert 0 < data["tokens"]["train"]["p50"] <= data["tokens"]["train"]["p95"] <= data["tokens"]["train"]["max"]
    leakage = next(e for e in await events_for(api, "leaky") if e["reason"] == "DataLeakage")
    assert leakage["type"] == "Warning" and "5 of 10 validation examples" in leakage["message"]

"""`kubetune local`: a FineTuneJob run on this machine through the operator's state machine."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from .conftest import lm_corpus, write_jsonl


def _job_file(tmp_path, tiny_llama, data) -> str:
    doc = {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "local-job"},
        "spec": {
            "baseModel": {"uri": f"file://{tiny_llama}"},
            "dataset": {"uri": f"file://{data}", "format": "prompt-completion"},
            "method": {"type": "LoRA", "lora": {"rank": 4, "targetModules": ["q_proj", "v_proj"]}},
            "training": {"maxSteps": 8, "learningRate": 0.01, "perDeviceBatchSize": 4, "maxSeqLength": 64,
                         "precision": "FP32", "gradientCheckpointing": False},
            "distributed": {"nodes": 1, "gpusPerNode": 0, "processesPerNode": 1, "deepspeed": {"enabled": False}},
            "output": {"uri": "s3://not-used-locally/prefix"},
        },
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def run_local(tmp_path, job_file, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kubetune.cli", "local", "-f", job_file, "--run-dir",
                           str(tmp_path / "runs"), "--poll", "0.2", "--status-file", str(tmp_path / "status.json"),
                           *extra], capture_output=True, text=True, timeout=300, check=False)


def test_local_run_trains_publishes_and_summarises(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "train.jsonl", lm_corpus(48))
    result = run_local(tmp_path, _job_file(tmp_path, tiny_llama, data), "--set", "training.maxSteps=10")
    assert result.returncode == 0, result.stdout + result.stderr
    job = json.loads((tmp_path / "status.json").read_text())
    status = job["status"]
    assert status["phase"] == "Succeeded"
    assert status["adapter"]["uri"].startswith(f"file://{tmp_path / 'runs' / 'storage'}")
    assert status["progress"]["step"] == 10 and status["progress"]["totalSteps"] == 10  # the --set applied
    assert "baseline" in result.stdout and "fine-tuned" in result.stdout and "eval_loss" in result.stdout
    for event in ("Created", "Running", "AdapterPublished"):
        assert event in result.stderr
    assert "trainer.log" in result.stdout


def test_local_run_reports_bad_data_and_fails(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "train.jsonl", [json.dumps(r) for r in lm_corpus(8)] + ["not json"])
    result = run_local(tmp_path, _job_file(tmp_path, tiny_llama, data))
    assert result.returncode == 1
    status = json.loads((tmp_path / "status.json").read_text())["status"]
    assert status["phase"] == "Failed" and status["failure"]["reason"] == "BadInput"
    assert "invalid_json" in result.stdout and "line 9" in result.stdout


def test_local_refuses_an_invalid_spec_before_running_anything(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "train.jsonl", lm_corpus(8))
    result = run_local(tmp_path, _job_file(tmp_path, tiny_llama, data), "--set", "method.lora.rank=0")
    assert result.returncode == 2
    assert "spec.method.lora.rank" in result.stderr
    assert not (tmp_path / "runs").exists()

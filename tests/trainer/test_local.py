"""`kubetune local`: a FineTuneJob run on this machine through the operator's state machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    return subprocess.run([sys.executable, "-m", "kubetune_operator.cli", "local", "-f", job_file, "--run-dir",
                           str(tmp_path / "runs"), "--poll", "0.2", "--status-file", str(tmp_path / "status.json"),
                           *extra], capture_output=True, text=True, timeout=300, check=False)


def test_local_run_trains_publishes_and_summarises(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "train.jsonl", lm_corpus(48))
    result = run_local(tmp_path, _job_file(tmp_path, tiny_llama, data), "--set", "training.maxSteps=10",
                       "--set", "output.mergeAdapter=true")
    assert result.returncode == 0, result.stdout + result.stderr
    job = json.loads((tmp_path / "status.json").read_text())
    status = job["status"]
    assert status["phase"] == "Succeeded"
    assert status["adapter"]["uri"].startswith(f"file://{tmp_path / 'runs' / 'storage'}")
    # the merged model: verified by the operator's pass as its own artifact, never in the adapter's files
    merged, manifest_path = status["merged"], status["adapter"]["manifestUri"].removeprefix("file://")
    manifest = json.loads(Path(manifest_path).read_text())
    assert merged["digest"] == manifest["merged"]["digest"] != status["adapter"]["digest"]
    assert merged["uri"].startswith(status["adapter"]["manifestUri"].rsplit("/", 1)[0] + "/merged/sha256-")
    assert merged["sizeBytes"] > status["adapter"]["sizeBytes"] == sum(f["size"] for f in manifest["files"])
    assert not any(f["path"] == "model.safetensors" for f in manifest["files"])
    assert "merged model" in next(c for c in status["conditions"] if c["type"] == "AdapterPublished")["message"]
    assert status["progress"]["step"] == 10 and status["progress"]["totalSteps"] == 10  # the --set applied
    assert "baseline" in result.stdout and "fine-tuned" in result.stdout and "eval_loss" in result.stdout
    for event in ("DataStageStarted", "Validating", "DataValidated", "Created", "Running", "AdapterPublished"):
        assert event in result.stderr
    # the CPU data stage ran first, as a real process, and its report is in the status and the summary
    assert status["data"]["state"] == "Succeeded" and status["data"]["examples"]["train"] > 0
    assert f"data ({status['data']['digest']})" in result.stdout and "tokens p50" in result.stdout
    assert "trainer.log" in result.stdout
    # the final object for `kubetune local -f adep.yaml` (fineTuneJobRef) and the report: charts + summary
    name_dir = tmp_path / "runs" / "local-job"
    assert json.loads((name_dir / "finetunejob.json").read_text())["status"] == status
    for chart in ("loss.png", "metrics.png"):
        assert (name_dir / "report" / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", chart
        assert str(name_dir / "report" / chart) in result.stdout
    summary = (name_dir / "report" / "summary.txt").read_text()
    assert status["adapter"]["digest"] in summary and "eval_loss" in summary and "duration" in summary
    assert f"merged    {merged['uri']}" in summary


def test_local_run_reports_bad_data_and_fails(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "train.jsonl", [json.dumps(r) for r in lm_corpus(8)] + ["not json"])
    result = run_local(tmp_path, _job_file(tmp_path, tiny_llama, data))
    assert result.returncode == 2  # bad input, as the trainer's own exit code says
    status = json.loads((tmp_path / "status.json").read_text())["status"]
    assert status["phase"] == "Failed" and status["failure"]["reason"] == "BadInput"
    assert "exited with code 2" in status["failure"]["message"]  # the launcher passes the worker's code through
    # refused by the CPU data stage: the training job never existed
    assert status["data"]["state"] == "Failed" and "line 9" in status["data"]["message"]
    assert "trainingJob" not in status and "Created" not in result.stderr
    assert "invalid_json" in result.stdout and "line 9" in result.stdout
    report = tmp_path / "runs" / "local-job" / "report"
    assert "no adapter was published" in (report / "summary.txt").read_text()  # the charts' reason
    assert not list(report.glob("*.png"))


def test_local_refuses_a_single_class_dataset_with_its_finding_and_publishes_nothing(tmp_path, tiny_llama):
    rows = [{"text": f"{' '.join(r['prompt'].split()[:2])} {r['completion']}", "label": "billing"}
            for r in lm_corpus(12)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    result = run_local(tmp_path, _job_file(tmp_path, tiny_llama, data), "--set", "task=SequenceClassification",
                       "--set", "dataset.format=text-label", "--set", "dataset.validationSplit=0.25")
    assert result.returncode == 2, result.stdout + result.stderr
    status = json.loads((tmp_path / "status.json").read_text())["status"]
    assert status["phase"] == "Failed" and status["failure"]["reason"] == "BadInput"
    assert [(f["severity"], f["code"]) for f in status["data"]["findings"]] == [("Error", "TooFewLabels")]
    assert "1 distinct label ('billing')" in status["data"]["findings"][0]["message"]
    assert "Warning DataTooFewLabels: Error: the training split has 1 distinct label" in result.stderr
    assert "data refused:\n    error TooFewLabels: the training split has 1 distinct label ('billing')" in result.stdout
    # refused by the CPU data stage: no training job, nothing in the output storage
    assert "trainingJob" not in status and "adapter" not in status
    assert not list((tmp_path / "runs" / "storage").rglob("manifest.json"))
    assert not list((tmp_path / "runs" / "storage").rglob("*.safetensors"))


def test_local_names_a_directory_given_as_the_dataset(tmp_path, tiny_llama):
    (tmp_path / "data").mkdir()
    result = run_local(tmp_path, _job_file(tmp_path, tiny_llama, tmp_path / "data"))
    assert result.returncode == 2, result.stdout + result.stderr
    status = json.loads((tmp_path / "status.json").read_text())["status"]
    assert status["failure"]["reason"] == "BadInput" and "Traceback" not in status["failure"]["message"]
    assert f"dataset.uri file://{tmp_path / 'data'} is a directory; expected a JSON Lines file" in result.stdout


def test_local_refuses_an_invalid_spec_before_running_anything(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "train.jsonl", lm_corpus(8))
    result = run_local(tmp_path, _job_file(tmp_path, tiny_llama, data), "--set", "method.lora.rank=0")
    assert result.returncode == 2
    assert "spec.method.lora.rank" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_local_retries_a_retryable_exit_up_to_the_backoff_limit(tmp_path, tiny_llama, monkeypatch):
    """Storage that cannot be reached is a retryable failure (exit 143): restarted like a pod, then failed."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local-test")  # credentials from the shell, as `kubetune local` reads
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local-test-secret")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    data = write_jsonl(tmp_path / "train.jsonl", lm_corpus(8))
    result = run_local(tmp_path, _job_file(tmp_path, tiny_llama, data), "--set",
                       "dataset={uri: 's3://data/train.jsonl', format: prompt-completion, "
                       "s3: {endpoint: 'http://127.0.0.1:9'}}", "--set", "runPolicy.backoffLimit=1")
    assert result.returncode == 1, result.stdout + result.stderr
    status = json.loads((tmp_path / "status.json").read_text())["status"]
    assert status["phase"] == "Failed"
    # the data stage is the first to reach for the storage: it is the one retried, then failed
    assert status["failure"]["reason"] == "DataStageFailed" and "trainingJob" not in status
    assert "exited with code 143" in status["failure"]["message"]
    logs = list((tmp_path / "runs").glob("local-job/*/local-job-data/trainer.log"))
    assert len(logs) == 1 and logs[0].read_text().count("retryable failure") == 2  # the first launch and one retry


def test_local_runs_a_trainjob_as_it_runs_a_pytorchjob(tmp_path, tiny_llama):
    """backend TrainJob: the same passes create TrainJobs, played from their trainer's command and world."""
    data = write_jsonl(tmp_path / "train.jsonl", lm_corpus(32))
    result = run_local(tmp_path, _job_file(tmp_path, tiny_llama, data), "--set", "backend=TrainJob",
                       "--set", "training.maxSteps=4")
    assert result.returncode == 0, result.stdout + result.stderr
    status = json.loads((tmp_path / "status.json").read_text())["status"]
    assert status["phase"] == "Succeeded" and status["data"]["state"] == "Succeeded"
    assert status["replicas"] == {"node": {"active": 0, "succeeded": 1, "failed": 0}}
    assert "created TrainJob local-job" in result.stderr and "PyTorchJob" not in result.stderr
    assert status["adapter"]["uri"].startswith(f"file://{tmp_path / 'runs' / 'storage'}")

"""MLflow tracking records the run, one run per stage, continued by a restarted pod; an unreachable or
missing tracker never breaks training. The restart runs the rendered pod verbatim through the
training-operator stand-in. (wandb is not installed here: its path is covered only as missing.)"""

from __future__ import annotations

import json
import time

import pytest

from kubetune.api import jobconfig, storage_layout
from kubetune.clients.storage import ObjectStore
from kubetune_testing.training_operator import MASTER
from kubetune_trainer import tracking

from .conftest import job_spec, lm_corpus, make_config, manifest_of, run_in_process, write_jsonl
from .rendered import render_run


def test_mlflow_records_params_losses_and_metrics(tiny_llama, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local store stands in for a tracking server
    store = f"file://{tmp_path / 'mlruns'}"
    data = write_jsonl(tmp_path / "train.jsonl", lm_corpus(48))
    spec = job_spec(tiny_llama, data, tmp_path / "out", training__maxSteps=6, training__evalSteps=3,
                    tracking={"mlflow": {"trackingUri": store, "experiment": "team-a"}})
    run_in_process(make_config(spec, name="tracked"), tmp_path / "work")
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("team-a")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "test/tracked" and run.info.status == "FINISHED"
    assert run.data.params["method.type"] == "LoRA"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "trainLoss")] == [1, 2, 3, 4, 5, 6]
    assert len(client.get_metric_history(run.info.run_id, "eval_loss")) == 2
    assert "baseline_eval_loss" in run.data.metrics and "final_eval_loss" in run.data.metrics


@pytest.mark.parametrize("tracking", [
    {"mlflow": {"trackingUri": "http://127.0.0.1:9"}},  # nothing listens there: offline cluster
    {"wandb": {"project": "p", "mode": "offline"}},  # client not installed in this environment
])
def test_tracking_failures_never_break_a_run(tracking, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    data = write_jsonl(tmp_path / "train.jsonl", lm_corpus(48))
    spec = job_spec(tiny_llama, data, tmp_path / "out", training__maxSteps=3, tracking=tracking)
    manifest = run_in_process(make_config(spec, name="offline"), tmp_path / "work")
    assert manifest["training"]["steps"] == 3


def test_each_stage_is_its_own_run_with_a_stable_wandb_id():
    job = {"namespace": "team-a", "name": "bot", "uid": "u-1"}
    train = tracking.stage_run(job, jobconfig.Stage())
    baseline = tracking.stage_run(job, jobconfig.Stage(kind=jobconfig.STAGE_BASELINE))
    trial = tracking.stage_run(job, jobconfig.Stage(kind=jobconfig.STAGE_SWEEP))
    assert (train.name, train.wandb_id, train.experiment) == ("team-a/bot", "u-1", "team-a")
    assert (baseline.name, baseline.wandb_id) == ("team-a/bot/baseline", "u-1-baseline")
    assert (trial.name, trial.wandb_id) == ("team-a/bot/sweep", "u-1-sweep")
    assert trial.tags == {"kubetune.io/job-uid": "u-1", "kubetune.io/stage": "sweep"}


def test_a_continued_run_skips_what_it_already_logged():
    logged = {"trainLoss": 12, "eval_loss": 10}
    assert tracking.unlogged({"trainLoss": 1.0, "eval_loss": 2.0}, 10, logged) == {}
    assert tracking.unlogged({"trainLoss": 1.0, "eval_loss": 2.0, "lr": 0.1}, 12, logged) == {"eval_loss": 2.0,
                                                                                             "lr": 0.1}
    assert tracking.unlogged({"trainLoss": 1.0}, 13, logged) == {"trainLoss": 1.0}
    assert tracking.unlogged({"eval_loss": 2.0}, 11, {}) == {"eval_loss": 2.0}


def test_a_restarted_pod_continues_its_mlflow_run(tiny_llama, tmp_path, monkeypatch):
    """The rendered pod, run verbatim, SIGKILLed after a checkpoint (the pod is lost) and restarted by
    `restartPolicy: ExitCode`: one MLflow run, continued by id from the stage's tracking.json, every step
    logged exactly once."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # this test's own client; the pod opts in itself
    store_uri = f"file://{tmp_path / 'mlruns'}"
    data = write_jsonl(tmp_path / "train.jsonl", lm_corpus(96))
    total = 100
    spec = job_spec(tiny_llama, data, tmp_path / "out", training__maxSteps=total, training__checkpointSteps=10,
                    training__evalSteps=50, training__perDeviceBatchSize=4,
                    tracking={"mlflow": {"trackingUri": store_uri, "experiment": "resume"}})
    run, config = render_run(spec, "tracked-resume", tmp_path / "pods")
    store, prefix = ObjectStore(), config.storage.job_prefix
    latest = storage_layout.latest_checkpoint_uri(prefix)
    run.start()
    deadline = time.monotonic() + 180
    while store.read(latest) is None and time.monotonic() < deadline:
        assert run.poll() == "Running", run.logs()
        time.sleep(0.05)
    assert run.kill(MASTER).poll() == 137
    saved = json.loads(store.read(storage_layout.tracking_uri(prefix)))
    client = MlflowClient(store_uri)
    (first,) = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert saved == {"api": tracking.TRACKING_API, "mlflow": {"runId": first.info.run_id}}
    assert first.info.status == "RUNNING"  # killed: nobody ended it
    logged_before = len(client.get_metric_history(first.info.run_id, "trainLoss"))
    assert logged_before >= 10  # up to the checkpoint at least; the steps after it are replayed on resume
    print(f"trainLoss steps logged before the kill: {logged_before}; latest checkpoint: "
          f"step {json.loads(store.read(latest))['step']}")

    assert run.wait(300) == "Succeeded", run.logs()
    assert run.restarts == 1
    assert manifest_of(config)["training"]["steps"] == total
    (run_info,) = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert run_info.info.run_id == saved["mlflow"]["runId"] and run_info.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_info.info.run_id, "trainLoss")]
    assert sorted(steps) == list(range(1, total + 1)), f"{logged_before} steps logged before the kill"
    assert [m.step for m in client.get_metric_history(run_info.info.run_id, "eval_loss")] == [50, 100]
    assert "MLflow run continued" in run.pod().log.read_text(errors="replace")

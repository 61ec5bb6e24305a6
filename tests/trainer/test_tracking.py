"""MLflow tracking records the run; an unreachable or missing tracker never breaks training."""

from __future__ import annotations

import pytest

from .conftest import job_spec, lm_corpus, make_config, run_in_process, write_jsonl


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

"""Experiment tracking (MLflow, Weights & Biases) that can never break a run.

Configured by `spec.tracking`; used on rank 0 only. A tracker whose client is not installed, whose
server is unreachable or which fails mid-run is switched off with one warning: training and publishing
go on (an offline cluster must not lose a run to its dashboard).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def _flatten(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = str(value)[:500]  # MLflow caps parameter values
    return out


class Tracker:
    """Fan-out to the configured backends; a failing backend is dropped, never raised."""

    def __init__(self, spec: dict, job: dict, enabled: bool):
        self.backends: dict[str, object] = {}
        tracking = spec.get("tracking") or {}
        if not enabled:
            return
        name = f"{job['namespace']}/{job['name']}"
        if tracking.get("mlflow"):
            self._try("mlflow", lambda: self._start_mlflow(tracking["mlflow"], job, name, spec))
        if tracking.get("wandb"):
            self._try("wandb", lambda: self._start_wandb(tracking["wandb"], job, name, spec))

    def _try(self, backend: str, action) -> None:
        try:
            result = action()
            if result is not None:
                self.backends[backend] = result
        except Exception as exc:
            self.backends.pop(backend, None)
            log.warning("experiment tracking switched off", extra={"backend": backend, "error": str(exc)[:500]})

    @staticmethod
    def _start_mlflow(settings: dict, job: dict, name: str, spec: dict):
        # An unreachable server must cost seconds, not the client's default minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        import mlflow

        mlflow.set_tracking_uri(settings["trackingUri"])
        mlflow.set_experiment(settings.get("experiment") or job["namespace"])
        run = mlflow.start_run(run_name=name, tags={"kubetune.io/job-uid": job["uid"]})
        mlflow.log_params(_flatten("", spec, {}))
        return run

    @staticmethod
    def _start_wandb(settings: dict, job: dict, name: str, spec: dict):
        import wandb

        os.environ.setdefault("WANDB_DIR", os.environ.get("TMPDIR", "/tmp"))
        return wandb.init(project=settings["project"], entity=settings.get("entity"), name=name, id=job["uid"],
                          resume="allow", mode=settings.get("mode", "online"), config=spec)

    def log(self, values: dict, step: int) -> None:
        numbers = {k: float(v) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if not numbers:
            return
        if "mlflow" in self.backends:
            self._try("mlflow", lambda: _mlflow_log(numbers, step))
        if "wandb" in self.backends:
            run = self.backends["wandb"]
            self._try("wandb", lambda: (run.log(numbers, step=step), run)[1])

    def finish(self, status: str) -> None:
        if "mlflow" in self.backends:
            self._try("mlflow", lambda: _mlflow_end(status))
        if "wandb" in self.backends:
            run = self.backends["wandb"]
            self._try("wandb", lambda: run.finish(exit_code=0 if status == "FINISHED" else 1))
        self.backends.clear()


def _mlflow_log(numbers: dict, step: int):
    import mlflow

    mlflow.log_metrics(numbers, step=step)
    return mlflow.active_run()


def _mlflow_end(status: str):
    import mlflow

    mlflow.end_run(status=status)

"""Experiment tracking (MLflow, Weights & Biases) that can never break a run.

Configured by `spec.tracking`; used on rank 0 only. Each stage has its own run, whose ids are kept in
the stage's `tracking.json` so a restarted pod continues the same run (docs/observability.md). A
tracker whose client is not installed, whose server is unreachable or which fails mid-run is switched
off with one warning: training and publishing go on (an offline cluster must not lose a run to its dashboard).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from kubetune.api import jobconfig, storage_layout

log = logging.getLogger(__name__)

TRACKING_API = "kubetune.io/tracking/v1"


def _flatten(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = str(value)[:500]  # MLflow caps parameter values
    return out


@dataclass(frozen=True)
class StageRun:
    """How one stage's run is named in the trackers."""

    name: str  # the run's display name
    experiment: str  # MLflow's default experiment: the job's namespace
    wandb_id: str  # W&B run ids are chosen by the client: one per stage, stable across restarts
    tags: dict


def stage_run(job: dict, stage: jobconfig.Stage) -> StageRun:
    """The training stage keeps the job's own name (and the job uid as W&B id); the baseline and the
    rank sweep are runs of their own, so their steps never mix with training's."""
    name, uid = f"{job['namespace']}/{job['name']}", job["uid"]
    tags = {"kubetune.io/job-uid": uid, "kubetune.io/stage": stage.kind}
    if stage.kind == jobconfig.STAGE_TRAIN:
        return StageRun(name, job["namespace"], uid, tags)
    return StageRun(f"{name}/{stage.kind}", job["namespace"], f"{uid}-{stage.kind}", tags)


def unlogged(numbers: dict, step: int, logged_through: dict[str, int]) -> dict:
    """The values not already in a continued run: a key logged up to step N before the pod restarted
    (the restart resumes from an earlier checkpoint and replays the steps after it) is skipped up to N."""
    return {key: value for key, value in numbers.items() if step > logged_through.get(key, -1)}


class Tracker:
    """Fan-out to the configured backends; a failing backend is dropped, never raised.

    `store`: the job's output store, where `tracking.json` lives at the stage's prefix."""

    def __init__(self, config: jobconfig.JobConfig, store, enabled: bool):
        self.backends: dict[str, object] = {}
        self.logged_through: dict[str, int] = {}  # continued MLflow run: last step logged per key
        tracking = config.spec.get("tracking") or {}
        if not enabled or not tracking:
            return
        self.store = store
        self.state_uri = storage_layout.tracking_uri(config.storage.job_prefix)
        saved = self._read_saved()
        run = stage_run(config.job.__dict__, config.stage)
        spec = config.spec
        if tracking.get("mlflow"):
            self._try("mlflow", lambda: self._start_mlflow(tracking["mlflow"], run, spec, saved.get("mlflow")))
        if tracking.get("wandb"):
            self._try("wandb", lambda: self._start_wandb(tracking["wandb"], run, spec))
        self._save(saved)

    def _try(self, backend: str, action) -> None:
        try:
            result = action()
            if result is not None:
                self.backends[backend] = result
        except Exception as exc:
            self.backends.pop(backend, None)
            log.warning("experiment tracking switched off", extra={"backend": backend, "error": str(exc)[:500]})

    def _read_saved(self) -> dict:
        """The run ids an earlier pod of this stage started ({} the first time, or when unreadable)."""
        try:
            raw = self.store.read(self.state_uri)
            document = json.loads(raw) if raw is not None else {}
        except Exception as exc:  # a dashboard must not fail the run: start new runs, say so
            log.warning("tracking run ids unreadable, starting new runs",
                        extra={"uri": self.state_uri, "error": str(exc)[:500]})
            return {}
        return document if isinstance(document, dict) and document.get("api") == TRACKING_API else {}

    def _save(self, saved: dict) -> None:
        document = {"api": TRACKING_API}
        if "mlflow" in self.backends:
            document["mlflow"] = {"runId": self.backends["mlflow"].info.run_id}
        if "wandb" in self.backends:
            document["wandb"] = {"id": self.backends["wandb"].id}
        if len(document) == 1 or all(saved.get(k) == v for k, v in document.items()):
            return  # nothing started, or the same runs continued: nothing new to remember
        try:
            self.store.write(self.state_uri, json.dumps(document, sort_keys=True).encode())
        except Exception as exc:
            log.warning("tracking run ids not saved: a restarted pod will start new runs",
                        extra={"uri": self.state_uri, "error": str(exc)[:500]})

    def _start_mlflow(self, settings: dict, run: StageRun, spec: dict, saved: dict | None):
        # An unreachable server must cost seconds, not the client's default minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        if settings["trackingUri"].startswith("file://"):
            # The API accepts a file store (a shared volume); MLflow 3 refuses one unless opted in.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        import mlflow

        mlflow.set_tracking_uri(settings["trackingUri"])
        mlflow.set_experiment(settings.get("experiment") or run.experiment)
        run_id = (saved or {}).get("runId")
        if run_id:
            try:
                active = mlflow.start_run(run_id=run_id)
            except Exception as exc:  # deleted on the server, or another server: a new run, said once
                log.warning("MLflow run not found, starting a new one", extra={"runId": run_id,
                                                                              "error": str(exc)[:500]})
            else:
                self.logged_through = _mlflow_logged_through(run_id)
                log.info("MLflow run continued", extra={"runId": run_id, "loggedThrough": self.logged_through})
                return active
        active = mlflow.start_run(run_name=run.name, tags=run.tags)
        mlflow.log_params(_flatten("", spec, {}))
        return active

    @staticmethod
    def _start_wandb(settings: dict, run: StageRun, spec: dict):
        import wandb

        os.environ.setdefault("WANDB_DIR", os.environ.get("TMPDIR", "/tmp"))
        # resume="allow": the same id continues the run a killed pod left (W&B itself ignores values
        # logged for steps below the run's current step, so replayed steps are not duplicated).
        return wandb.init(project=settings["project"], entity=settings.get("entity"), name=run.name,
                          id=run.wandb_id, resume="allow", mode=settings.get("mode", "online"), config=spec,
                          tags=[f"stage:{run.tags['kubetune.io/stage']}"])

    def log(self, values: dict, step: int) -> None:
        numbers = {k: float(v) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if not numbers:
            return
        if "mlflow" in self.backends:
            fresh = unlogged(numbers, step, self.logged_through)
            if fresh:
                self._try("mlflow", lambda: _mlflow_log(fresh, step))
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


def _mlflow_logged_through(run_id: str) -> dict[str, int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    return {key: max(m.step for m in client.get_metric_history(run_id, key))
            for key in client.get_run(run_id).data.metrics}


def _mlflow_log(numbers: dict, step: int):
    import mlflow

    mlflow.log_metrics(numbers, step=step)
    return mlflow.active_run()


def _mlflow_end(status: str):
    import mlflow

    mlflow.end_run(status=status)

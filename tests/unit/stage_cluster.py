"""The stage tests' world: a `Cluster` that does what the operator's shell does around `decide`."""

from __future__ import annotations

import copy
import json

from kubetune.api import jobconfig
from kubetune_operator.backends import pytorchjob as pytorchjob_backend
from kubetune_operator.reconcile import conditions as cond
from kubetune_operator.reconcile import finetunejob as ftj
from kubetune_operator.reconcile.finetunejob_plan import Plan, StageReport
from kubetune_operator.render import training as render
from kubetune_testing.factories import data_validated, finetunejob, sweep_row

NOW = "2026-11-28T12:00:00Z"
START = "2026-11-28T11:00:00Z"
DONE = "2026-11-28T11:50:00Z"
SETTINGS = ftj.Settings(publish_timeout_seconds=600)
ROOT = "s3://adapters/team-a/team-a/llama-lora/0b7f-uid/"
BASELINE_JOB = "llama-lora-baseline"
TARGET = {"metric": "eval_loss", "value": 1.0}


SWEEP_JOB = "llama-lora-rank-sweep"


def with_conditions(pytorchjob: dict, *kinds: str, message: str = "", completion: str | None = None,
                    start: str | None = START) -> dict:
    out = copy.deepcopy(pytorchjob)
    status = {"conditions": [{"type": k, "status": "True", "reason": f"PyTorchJob{k}", "message": message,
                              "lastTransitionTime": completion or START} for k in kinds]}
    if start:
        status["startTime"] = start
    if completion:
        status["completionTime"] = completion
    out["status"] = status
    return out


class Cluster:
    """What the operator's shell does around `decide`: lists the job's children, reads the stage reports
    `needs_stage_reports` asks for, creates what the plan says (never twice), applies patches and writes
    the status. The job starts past its data stage (tests/unit/test_reconcile_data.py covers that stage)."""

    def __init__(self, job: dict):
        self.job = job if (job.get("status") or {}).get("data") else data_validated(job)
        self.pytorchjobs: dict[str, dict] = {}
        self.config_maps: dict[str, dict] = {}
        self.results: dict[str, dict] = {}  # stage job name -> result.json in its prefix
        self.progress: dict[str, dict] = {}  # stage job name -> progress.json in its prefix
        self.created: list[tuple[str, str]] = []
        self.reports_read: dict[str, str] = {}

    def observe(self, now: str = NOW, progress: dict | None = None, manifest=None) -> ftj.Observed:
        name = self.job["metadata"]["name"]
        stage_jobs = {n: pytorchjob_backend.read_status(p) for n, p in self.pytorchjobs.items()
                      if n != render.workload_name(name)}
        self.reports_read = ftj.needs_stage_reports(self.job, stage_jobs)
        reports = {n: StageReport(result=self.results.get(n), progress=self.progress.get(n))
                   for n in self.reports_read}
        return ftj.Observed(
            job=copy.deepcopy(self.job), now=now,
            config_map=self.config_maps.get(render.config_map_name(name)),
            workload=self._training_workload(name),
            manifest=manifest, progress=progress, stage_jobs=stage_jobs,
            stage_config_maps=frozenset(n for n in self.config_maps if n != render.config_map_name(name)),
            stage_reports=reports)

    def _training_workload(self, name: str):
        training = self.pytorchjobs.get(render.workload_name(name))
        return pytorchjob_backend.read_status(training) if training is not None else None

    def reconcile(self, now: str = NOW, progress: dict | None = None, manifest=None) -> Plan:
        plan = ftj.decide(self.observe(now, progress, manifest), SETTINGS)
        for child in plan.create:
            store = self.config_maps if child["kind"] == "ConfigMap" else self.pytorchjobs
            name = child["metadata"]["name"]
            assert name not in store, f"{child['kind']} {name} created twice"
            store[name] = copy.deepcopy(child)
            self.created.append((child["kind"], name))
        for name, suspend in plan.suspend_stage_jobs.items():
            self.pytorchjobs[name]["spec"]["runPolicy"]["suspend"] = suspend
        self.job = {**self.job, "status": copy.deepcopy(plan.status)}
        return plan

    # the world moving on between reconciles

    def set(self, name: str, *kinds: str, message: str = "", completion: str | None = None,
            start: str | None = START) -> None:
        self.pytorchjobs[name] = with_conditions(self.pytorchjobs[name], *kinds, message=message,
                                                 completion=completion, start=start)

    def succeed(self, name: str, metrics: dict | None, completion: str = DONE) -> None:
        self.set(name, "Created", "Running", "Succeeded", completion=completion)
        if metrics is not None:
            self.results[name] = {"api": jobconfig.STAGE_RESULT_API, "metrics": metrics}

    def fail(self, name: str, message: str = "1 Master replica(s) failed", completion: str = DONE) -> None:
        self.set(name, "Created", "Failed", message=message, completion=completion)

    def delete(self, name: str) -> None:
        del self.pytorchjobs[name]
        self.config_maps.pop(f"{name}-config", None)

    def active(self) -> list[str]:
        """Stage PyTorchJobs that have not finished."""
        return sorted(n for n, p in self.pytorchjobs.items()
                      if render.LABEL_STAGE in p["metadata"]["labels"]
                      and not any(c["type"] in ("Succeeded", "Failed") for c in
                                  (p.get("status") or {}).get("conditions") or []))

    @property
    def status(self) -> dict:
        return self.job["status"]

    def condition(self, kind: str) -> dict | None:
        return cond.find(self.status.get("conditions"), kind)

    def trials(self) -> dict[str, dict]:
        return {t["name"]: t for t in self.status["sweep"]["trials"]}


def created_pytorchjobs(plan: Plan) -> list[str]:
    return [c["metadata"]["name"] for c in plan.create if c["kind"] == "PyTorchJob"]


def config_json(plan_or_cluster, name: str) -> dict:
    if isinstance(plan_or_cluster, Cluster):
        config_map = plan_or_cluster.config_maps[name]
    else:
        config_map = next(c for c in plan_or_cluster.create if c["metadata"]["name"] == name)
    return json.loads(config_map["data"][jobconfig.CONFIG_FILE])


def reasons(plan: Plan) -> list[str]:
    return [e.reason for e in plan.events]


def baseline_cluster(**spec) -> Cluster:
    return Cluster(finetunejob(baseline={"target": dict(TARGET)}, **spec))


def sweep_cluster(ranks=(4, 8, 16), **sweep) -> Cluster:
    return Cluster(finetunejob(rankSweep={"ranks": list(ranks), **sweep}))


row = sweep_row  # one config's row as the sweep's trainer writes it


def sweep_result(rows: list[dict], **extra) -> dict:
    return {"api": jobconfig.STAGE_RESULT_API, "kind": "sweep", "metric": "eval_loss", "trials": rows,
            "fullRunSteps": 200, "budgetSteps": 60, "usedSteps": 60, **extra}

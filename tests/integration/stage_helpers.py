"""The stage flows' world: the FineTuneJobs they submit, and the training operator and trainer they play."""

from __future__ import annotations

import json

import kmock

from kubetune.api import storage_layout
from kubetune.clients import kube
from kubetune_operator.reconcile import conditions as cond
from kubetune_operator.render import training as render
from kubetune_testing.factories import data_result, finetunejob, sweep_row
from kubetune_testing.seaweedfs import ACCESS_KEY, BUCKET, SECRET_KEY

from .conftest import NS, eventually

OUTPUT_URI = f"s3://{BUCKET}/jobs"
PYTORCHJOBS_RESOURCE = kmock.resource("kubeflow.org", "v1", "pytorchjobs")
BASELINE_TARGET = {"enabled": True, "target": {"metric": "eval_loss", "value": 1.0}, "forceTraining": False}
START = "2026-11-28T11:00:00Z"
DONE = "2026-11-28T11:05:00Z"  # 300 s after START


def job_doc(name: str, s3_endpoint: str, **overrides) -> dict:
    doc = finetunejob(**overrides)
    doc["metadata"] = {"name": name, "namespace": NS}
    doc["spec"]["output"] = {"uri": OUTPUT_URI, "endpoint": s3_endpoint, "credentials": {"secretName": "s3-creds"}}
    return doc


async def submit(api, s3_server, name: str, data_stage: bool = True, **overrides) -> dict:
    """Create the FineTuneJob and (`data_stage`) let its data stage succeed, so its GPU stages come next."""
    await api.create_secret("s3-creds", {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY})
    created, _ = await api.client.create(kube.FINETUNEJOBS, job_doc(name, s3_server.endpoint, **overrides))
    if data_stage:
        await pass_data_stage(api, s3_server, created)
    return created


def sweep(ranks: list[int], **extra) -> dict:
    return {"ranks": ranks, "holdoutFraction": 0.1, "metric": "eval_loss", "alpha": "Proportional", "tieTolerance": 0,
            **extra}


def prefix_of(created: dict) -> str:
    meta = created["metadata"]
    return storage_layout.job_prefix(OUTPUT_URI, NS, meta["name"], meta["uid"])


def sweep_name(job: str) -> str:
    return f"{job}-rank-sweep"


row = sweep_row  # one config's row as the sweep's trainer writes it


def write_json(s3_server, uri: str, doc: dict) -> None:
    s3_server.store().write(uri, json.dumps(doc).encode())


def data_stage_name(job: str) -> str:
    return f"{job}-data"


def write_data_result(s3_server, created: dict, report: dict | None = None) -> None:
    """What the data stage's trainer writes last: result.json with its report at `<job prefix>/data/`."""
    meta = created["metadata"]
    prefix = storage_layout.job_prefix(created["spec"]["output"]["uri"], meta["namespace"], meta["name"],
                                       meta["uid"])
    write_json(s3_server, storage_layout.result_uri(storage_layout.data_stage_prefix(prefix)),
               data_result(created, report))


async def pass_data_stage(api, s3_server, created: dict, report: dict | None = None) -> None:
    """Play the CPU data stage as its trainer and the training operator would: wait for `<job>-data`, write
    its result, then mark the PyTorchJob Succeeded. The GPU stages follow."""
    name = data_stage_name(created["metadata"]["name"])
    await wait_exists(api, kube.PYTORCHJOBS, name)
    write_data_result(s3_server, created, report)
    await succeed(api, name, startTime=START, completionTime=DONE)


def write_sweep_result(s3_server, created: dict, rows: list[dict]) -> None:
    prefix = storage_layout.sweep_prefix(prefix_of(created))
    write_json(s3_server, storage_layout.result_uri(prefix), {
        "kind": "sweep", "metric": "eval_loss", "trials": rows, "fullRunSteps": 200, "budgetSteps": 60,
        "usedSteps": 60, "seconds": 42})


def write_sweep_progress(s3_server, created: dict, progress: dict) -> None:
    write_json(s3_server, storage_layout.progress_uri(storage_layout.sweep_prefix(prefix_of(created))), progress)


async def status_of(api, name: str) -> dict:
    job = await api.get(kube.FINETUNEJOBS, name)
    return (job or {}).get("status") or {}


async def wait_status(api, name: str, predicate, timeout: float = 10.0) -> dict:
    async def check():
        status = await status_of(api, name)
        return status if predicate(status) else None
    return await eventually(check, timeout=timeout)


async def wait_phase(api, name: str, phase: str, timeout: float = 10.0) -> dict:
    return await wait_status(api, name, lambda s: s.get("phase") == phase, timeout)


def condition(status: dict, kind: str) -> dict:
    return cond.find(status.get("conditions"), kind) or {}


def sweep_state(status: dict) -> str | None:
    return (status.get("sweep") or {}).get("state")


async def events_for(api, name: str) -> list[dict]:
    return [e for e in await api.list(kube.EVENTS) if e.get("involvedObject", {}).get("name") == name]


async def wait_event(api, name: str, reason: str, containing: str = "") -> dict:
    async def check():
        return next((e for e in await events_for(api, name)
                     if e.get("reason") == reason and containing in e.get("message", "")), None)
    return await eventually(check)


async def wait_exists(api, resource: kube.Resource, name: str) -> dict:
    return await eventually(lambda: api.get(resource, name))


async def sweep_jobs(api, job: str) -> list[str]:
    """The job's sweep workloads, by name."""
    return sorted(p["metadata"]["name"] for p in await api.list(kube.PYTORCHJOBS)
                  if (p["metadata"].get("labels") or {}).get(render.LABEL_JOB) == job
                  and (p["metadata"].get("labels") or {}).get(render.LABEL_STAGE) == "sweep")


def config_of(config_map: dict) -> dict:
    return json.loads(config_map["data"]["config.json"])


async def succeed(api, name: str, **extra) -> None:
    await api.set_pytorchjob_conditions(name, ("Succeeded", "PyTorchJobSucceeded", "done"), **extra)


async def run(api, name: str) -> None:
    await api.set_pytorchjob_conditions(name, ("Running", "PyTorchJobRunning", "running"), startTime=START)


async def finish_sweep(api, s3_server, created: dict, rows: list[dict]) -> None:
    """The trainer writes result.json last, then the training operator marks the PyTorchJob Succeeded."""
    write_sweep_result(s3_server, created, rows)
    await succeed(api, sweep_name(created["metadata"]["name"]), startTime=START, completionTime=DONE)


def pytorchjob_creates(k8s) -> int:
    return len(k8s[kmock.action.CREATE, PYTORCHJOBS_RESOURCE])

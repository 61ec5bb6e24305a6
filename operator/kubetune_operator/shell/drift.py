"""One adapter's drift pass: read new samples into windows, observe its retrains and labelled data,
decide (`reconcile.driftloop.decide`) and start a retrain when decided.

Storage work (`clients.drift_storage`, blocking) runs in a thread; where retrain FineTuneJobs live
(the cluster, or local runs) is the port's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from kubetune.api.validation import validate
from kubetune.clients import storage
from kubetune_operator.clients import drift_storage
from kubetune_operator.clients.drift_storage import Analysis, Analyzer, DataError
from kubetune_operator.reconcile import driftloop

log = logging.getLogger("kubetune.drift")


class RetrainPort(Protocol):
    """Where an AdapterDeployment's retrain FineTuneJobs live."""

    async def retrain_jobs(self, adep: dict, adapter: dict) -> list[driftloop.RetrainJob]:
        """The retrains of this adapter of this AdapterDeployment."""

    async def retrains_in_flight(self) -> int:
        """Retrains not finished yet, of every AdapterDeployment watched (the cap counts them all)."""

    async def create_retrain(self, job: dict) -> None:
        """Create (and so start) a retrain FineTuneJob."""


def retrain_view(job: dict) -> driftloop.RetrainJob:
    """A retrain FineTuneJob as the drift loop reads it: its phase, adapter and why it ended."""
    status = job.get("status") or {}
    message = next((c.get("message", "") for c in status.get("conditions") or []
                    if c.get("type") in ("Failed", "Succeeded", "BaselineSufficient") and c.get("status") == "True"),
                   status.get("message", ""))
    return driftloop.RetrainJob(job["metadata"]["name"], status.get("phase", "Pending"), status.get("adapter"),
                                message or "")


async def _manifest(analyzer: Analyzer, store: storage.ObjectStore, uri: str) -> dict | None:
    """A published manifest, read once (published manifests never change)."""
    if uri not in analyzer.manifests:
        document = await asyncio.to_thread(drift_storage.read_manifest, store, uri)
        if document is None:
            return None
        analyzer.manifests[uri] = document
    return analyzer.manifests[uri]


async def _analyse(analyzer: Analyzer, store: storage.ObjectStore, adep: dict, adapter: dict, rec: dict,
                   manifest: dict | None, now: str) -> Analysis:
    """New samples into windows every drift_seconds; between analyses, what status says of the open window."""
    namespace, name = adep["metadata"]["namespace"], adep["metadata"]["name"]
    previous, stable = rec.get("drift"), rec["stable"]
    analysis = Analysis()
    key = (namespace, name, adapter["name"])
    due = time.monotonic() - analyzer.last_analysis.get(key, float("-inf")) >= analyzer.drift_seconds
    if manifest is None:
        analysis.problem = ("ManifestUnreadable", f"cannot read {stable['manifestUri']}")
    elif due:
        analyzer.last_analysis[key] = time.monotonic()
        try:
            analysis = await asyncio.to_thread(drift_storage.analyse_samples, analyzer, store, adep=adep,
                                               adapter=adapter, stable=stable, manifest=manifest, now=now)
        except DataError as exc:
            analysis.problem = ("DriftReferenceUnavailable", str(exc))
        except Exception as exc:  # storage or embedding service down: try again next time
            log.warning("drift analysis failed", extra={"adapterdeployment": name, "adapter": adapter["name"],
                                                        "error": f"{type(exc).__name__}: {exc}"})
            analysis.problem = ("DriftAnalysisFailed", f"{type(exc).__name__}: {exc}")
    else:
        analysis.open_window = (previous or {}).get("window")
        problem = (previous or {}).get("problem")
        analysis.problem = (problem["reason"], problem["message"]) if problem else None
    return analysis


async def _new_labelled(analyzer: Analyzer, store: storage.ObjectStore, adep: dict, adapter: dict,
                        manifest: dict | None) -> tuple[int, str | None]:
    """(examples, problem): labelled examples no promoted retrain used yet."""
    retrain = adapter["drift"]["retrain"]
    fmt = ((retrain["template"]["spec"].get("dataset") or {}).get("format")
           or ((manifest or {}).get("dataset") or {}).get("format") or "text-label")
    try:
        return await asyncio.to_thread(drift_storage.count_new_labelled, analyzer, store, adep, adapter, fmt)
    except Exception as exc:
        return 0, f"cannot read labelled data: {type(exc).__name__}: {exc}"


async def _start_retrain(port: RetrainPort, analyzer: Analyzer, store: storage.ObjectStore, adep: dict,
                         adapter: dict, plan: driftloop.Plan, manifest: dict, stable: dict,
                         now: str) -> tuple[dict, list]:
    """Write the retrain's data and create its FineTuneJob; data that cannot be used: RetrainNotStarted."""
    namespace, name = adep["metadata"]["namespace"], adep["metadata"]["name"]
    status, events = plan.status, list(plan.events)
    try:
        data = await asyncio.to_thread(drift_storage.prepare_retrain, store, adep, adapter, plan.start_retrain,
                                       manifest, stable["manifestUri"])
        job = driftloop.retrain_job(adep, adapter, plan.start_retrain, data, stable["manifestUri"])
        result = validate(job, local=analyzer.local)
        if not result.ok:
            raise DataError("the retrain FineTuneJob is invalid: " + "; ".join(str(e) for e in result.errors))
        await port.create_retrain(job)
        log.info("retrain started", extra={"adapterdeployment": name, "adapter": adapter["name"],
                                           "job": plan.start_retrain})
    except DataError as exc:
        status, event = driftloop.retrain_not_started(plan.status, adapter, f"{namespace}/{adapter['name']}", now,
                                                      "RetrainNotStarted", str(exc))
        events = [e for e in events if e.reason != "RetrainStarted"] + [event]
    return status, events


async def drift_pass(port: RetrainPort, analyzer: Analyzer, store: storage.ObjectStore, adep: dict,
                     adapter: dict, rec: dict, now: str) -> tuple[dict, list]:
    """One adapter's drift loop. Returns (status.adapters[].drift, Events)."""
    jobs = await port.retrain_jobs(adep, adapter)
    previous, stable = rec.get("drift"), rec.get("stable")
    manifest = await _manifest(analyzer, store, stable["manifestUri"]) if stable else None
    analysis = await _analyse(analyzer, store, adep, adapter, rec, manifest, now) if stable else Analysis()
    in_flight_job = ((previous or {}).get("retrain") or {}).get("job")
    candidate = None
    for job in jobs:
        if job.name == in_flight_job and job.phase == "Succeeded" and job.adapter:
            candidate = await _manifest(analyzer, store, job.adapter["manifestUri"])
    new_labelled, labelled_problem = 0, None
    wants_retrain = bool((previous or {}).get("drifted") or any(v.get("drifted") for v in analysis.verdicts))
    if adapter["drift"].get("retrain") and wants_retrain and not in_flight_job:
        new_labelled, labelled_problem = await _new_labelled(analyzer, store, adep, adapter, manifest)
    observed = driftloop.Observed(
        now=now, version=stable["version"] if stable else None, verdicts=tuple(analysis.verdicts),
        open_window=analysis.open_window, problem=analysis.problem, retrain_jobs=tuple(jobs), candidate=candidate,
        new_labelled=new_labelled, labelled_problem=labelled_problem,
        cluster_in_flight=await port.retrains_in_flight() if wants_retrain else 0, cluster_cap=analyzer.max_retrains)
    plan = driftloop.decide(adep, adapter, previous, observed)
    status, events = plan.status, list(plan.events)
    if plan.start_retrain:
        status, events = await _start_retrain(port, analyzer, store, adep, adapter, plan, manifest, stable, now)
    promoted = driftloop.newly_promoted(status, now)
    if promoted:
        await asyncio.to_thread(drift_storage.mark_consumed, store, adep, adapter, promoted)
    return status, events

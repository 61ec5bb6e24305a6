"""One FineTuneJob reconcile pass: observe through a port, `decide`, apply the plan through the port.

Every rule of what to read and when (manifest, progress, stage reports, Secrets, owned children) lives
here once; the cluster adapter (controllers.finetunejob) and the local one (local.finetunejob) only
say how to read and write.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

from kubetune.api import manifest as manifest_api
from kubetune_operator.backends import backend_of, kueue
from kubetune_operator.backends.workload import WorkloadStatus
from kubetune_operator.reconcile import finetunejob as ftj
from kubetune_operator.reconcile.finetunejob_plan import Event, Plan, StageReport
from kubetune_operator.render import training as render


@dataclass(frozen=True)
class Workload:
    """A workload child as a port lists it: its metadata (owners, labels) and its backend-neutral status."""

    metadata: dict
    status: WorkloadStatus


class FineTuneJobPort(Protocol):
    """What one pass over one FineTuneJob needs from where it runs (a cluster, or this machine)."""

    async def read_job(self) -> dict | None: ...

    async def list_config_maps(self, job: dict) -> list[dict]: ...

    async def list_workloads(self, job: dict) -> list[Workload]: ...

    async def check_manifest(self, job_prefix: str) -> manifest_api.ManifestCheck: ...

    async def read_progress(self, prefix: str) -> dict | None: ...

    async def read_stage_report(self, prefix: str) -> StageReport | None:
        """None: unreadable now (the state machine waits for the next pass)."""

    async def secret_keys(self, names: list[str], output: dict | None) -> dict | None: ...

    async def create_child(self, child: dict) -> None: ...

    async def patch_child(self, kind: str, name: str, patch: dict) -> None: ...

    async def read_kueue_workload(self, job: dict, workload_uid: str) -> dict | None:
        """Kueue's Workload for the workload of this uid; None: none (yet), or no Kueue."""

    async def activate_kueue_workload(self, job: dict, name: str, active: bool) -> None: ...

    async def write_status(self, job: dict, status: dict) -> None: ...

    async def post_event(self, job: dict, event: Event) -> None: ...


def _owned_by(metadata: dict, job: dict) -> bool:
    return any(o.get("uid") == job["metadata"].get("uid") for o in metadata.get("ownerReferences") or [])


async def _with_admission(port: FineTuneJobPort, job: dict, workload: Workload) -> Workload:
    """The workload with Kueue's view of it, when Kueue manages it and the decision needs that view."""
    status = workload.status
    if not kueue.needs_admission(status.labels, status.suspended, status.finished, job.get("spec") or {}):
        return workload
    found = await port.read_kueue_workload(job, status.uid)
    return Workload(workload.metadata, dataclasses.replace(status, admission=kueue.admission(found)))


async def observe(port: FineTuneJobPort, job: dict, now: str) -> ftj.Observed:
    """Read what `decide` needs, and only that: the children, then storage and Secrets when asked."""
    name = job["metadata"]["name"]
    config_maps = {c["metadata"]["name"]: c for c in await port.list_config_maps(job)}
    workloads = {w.metadata["name"]: await _with_admission(port, job, w) for w in await port.list_workloads(job)}
    config_map = config_maps.pop(render.config_map_name(name), None)
    training = workloads.pop(render.workload_name(name), None)
    workload = training.status if training else None
    stage_jobs = {n: w.status for n, w in workloads.items() if _owned_by(w.metadata, job)}
    manifest = await port.check_manifest(ftj.job_prefix(job)) if ftj.needs_manifest(job, workload) else None
    progress = await port.read_progress(ftj.job_prefix(job)) if ftj.needs_progress(job, workload) else None
    reports = {}
    for stage_job, stage_prefix in ftj.needs_stage_reports(job, stage_jobs).items():
        report = await port.read_stage_report(stage_prefix)
        if report is not None:
            reports[stage_job] = report
    secrets = await port.secret_keys(ftj.needs_secrets(job), job["spec"].get("output"))
    return ftj.Observed(job=job, now=now, config_map=config_map, workload=workload, manifest=manifest,
                        progress=progress, stage_jobs=stage_jobs,
                        stage_config_maps=frozenset(n for n, c in config_maps.items() if _owned_by(c["metadata"], job)),
                        stage_reports=reports, secrets=secrets)


async def apply(port: FineTuneJobPort, job: dict, plan: Plan) -> None:
    """Carry out a plan: children first (the status names them), then the status, then events."""
    backend = backend_of(job)
    for child in plan.create:
        await port.create_child(child)
    if plan.suspend_workload is not None:
        await port.patch_child(backend.kind, render.workload_name(job["metadata"]["name"]),
                               backend.suspend_patch(plan.suspend_workload))
    for stage_job, suspend in plan.suspend_stage_jobs.items():
        await port.patch_child(backend.kind, stage_job, backend.suspend_patch(suspend))
    for kueue_workload, active in plan.activate_kueue_workloads.items():
        await port.activate_kueue_workload(job, kueue_workload, active)
    await port.write_status(job, plan.status)
    for event in plan.events:
        await port.post_event(job, event)


async def run_pass(port: FineTuneJobPort, settings: ftj.Settings, now: str) -> Plan | None:
    """One pass: observe, decide, apply. None when the FineTuneJob is gone."""
    job = await port.read_job()
    if job is None:
        return None
    plan = ftj.decide(await observe(port, job, now), settings)
    await apply(port, job, plan)
    return plan


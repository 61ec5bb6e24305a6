"""kopf handlers for FineTuneJob: thin triggers around one level-based reconcile.

Every trigger (the FineTuneJob created, changed or resumed; its PyTorchJob changed; a periodic
resync) runs the same `reconcile(namespace, name)`: read the FineTuneJob and its children, read the
manifest when the pure logic asks for it, call `finetunejob.decide`, carry out the plan. A per-job
lock serialises concurrent triggers; deterministic child names and create-or-get make any number
of runs, restarts and retries converge on exactly one PyTorchJob.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

import kopf

from kubetune.api import manifest as manifest_api
from kubetune.api import storage_layout
from kubetune.api import v1alpha1 as api
from kubetune.clients import kube, storage
from kubetune.reconcile import finetunejob as ftj
from kubetune.reconcile import statuswrite
from kubetune.render import training as render

from . import metrics
from .credentials import PassSecrets, object_store, secret_keys
from .retry import reconcile_or_retry

log = logging.getLogger("kubetune.finetunejob")


@dataclass
class Runtime:
    """What the handlers share: the API client, settings, and per-object locks."""

    client: kube.KubeClient | None = None
    settings: ftj.Settings = field(default_factory=ftj.Settings)
    default_s3: storage.S3Settings = field(default_factory=storage.S3Settings)
    verify_content: bool = True
    # volatile status fields (progress) are written at most this often; 0: every change at once.
    # `kubetune operator --status-min-interval` sets it (default 10 there).
    status_min_interval_seconds: float = 0.0
    locks: dict = field(default_factory=lambda: defaultdict(asyncio.Lock))


RUNTIME = Runtime()


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class _PassStore:
    """The job's storage for one reconcile pass: built (and its credentials Secret read) at most once, and
    only when the pass reads storage at all."""

    def __init__(self, job: dict, secrets: PassSecrets):
        self.job, self.secrets = job, secrets
        self._store: storage.ObjectStore | None = None

    async def get(self) -> storage.ObjectStore:
        """Storage access with the job's own output credentials, else the operator's defaults."""
        if self._store is None:
            self._store = await object_store(self.secrets, self.job["spec"]["output"], RUNTIME.default_s3)
        return self._store


async def _check_manifest(job: dict, stores: _PassStore) -> manifest_api.ManifestCheck:
    store = await stores.get()
    try:
        return await asyncio.to_thread(storage.check_published, store, ftj.job_prefix(job), RUNTIME.verify_content)
    except Exception as exc:  # storage down: treat as "not there yet"; the resync retries
        log.warning("manifest check failed", extra={"job": job["metadata"]["name"], "error": str(exc)})
        return manifest_api.ManifestCheck(found=False)


async def _read_progress(job: dict, stores: _PassStore) -> dict | None:
    """The trainer's progress.json (None when absent, unreadable or storage is down: progress can wait)."""
    store = await stores.get()
    try:
        raw = await asyncio.to_thread(store.read, storage_layout.progress_uri(ftj.job_prefix(job)))
        return json.loads(raw) if raw else None
    except Exception as exc:
        log.debug("progress read failed", extra={"job": job["metadata"]["name"], "error": str(exc)})
        return None


async def _read_json(store: storage.ObjectStore, uri: str) -> dict | None:
    raw = await asyncio.to_thread(store.read, uri)
    return json.loads(raw) if raw else None


async def _read_stage_reports(job: dict, wanted: dict[str, str], stores: _PassStore) -> dict[str, ftj.StageReport]:
    """result.json and progress.json of finished (or vanished) stage jobs. A stage whose files cannot be
    read now is left out: the state machine waits for the next pass instead of guessing."""
    if not wanted:
        return {}
    store = await stores.get()
    reports = {}
    for name, prefix in wanted.items():
        try:
            reports[name] = ftj.StageReport(
                result=await _read_json(store, storage_layout.result_uri(prefix)),
                progress=await _read_json(store, storage_layout.progress_uri(prefix)))
        except Exception as exc:
            log.warning("stage result read failed", extra={"job": job["metadata"]["name"], "stage": name,
                                                           "error": str(exc)})
    return reports


async def write_status(client: kube.KubeClient, resource: kube.Resource, obj: dict, new: dict, volatile: tuple,
                       min_interval_seconds: float) -> bool:
    """Write the status a pass decided, throttled by reconcile.statuswrite: any change but the volatile
    fields at once, volatile-only changes at most every `min_interval_seconds`. True when written."""
    meta = obj["metadata"]
    write = statuswrite.status_write(obj.get("status"), new, now_rfc3339(), min_interval_seconds, volatile)
    if write.throttled:
        metrics.STATUS_WRITES.labels(kind=obj["kind"], result="throttled").inc()
        log.debug("status write throttled", extra={"kind": obj["kind"], "namespace": meta["namespace"],
                                                  "name": meta["name"], "due_in": write.due_in})
    if write.patch is None:
        return False
    await client.patch(resource, meta["namespace"], meta["name"], {"status": write.patch}, subresource="status")
    metrics.STATUS_WRITES.labels(kind=obj["kind"], result="written").inc()
    return True


def _owned_by(child: dict, job: dict) -> bool:
    return any(o.get("uid") == job["metadata"].get("uid") for o in child["metadata"].get("ownerReferences") or [])


async def reconcile(namespace: str, name: str) -> float | None:
    """One pass of the FineTuneJob control loop. Returns seconds until the next resync, if any."""
    client = RUNTIME.client
    async with RUNTIME.locks[(namespace, name)]:
        started = time.monotonic()
        job = await client.get(kube.FINETUNEJOBS, namespace, name)
        if job is None:
            RUNTIME.locks.pop((namespace, name), None)  # waiters keep their reference; memory stays bounded
            return None
        job.setdefault("apiVersion", api.API_VERSION)
        job.setdefault("kind", "FineTuneJob")
        selector = f"{render.LABEL_JOB}={name}"
        config_maps = {c["metadata"]["name"]: c for c in await client.list(kube.CONFIGMAPS, namespace, selector)}
        pytorchjobs = {p["metadata"]["name"]: p for p in await client.list(kube.PYTORCHJOBS, namespace, selector)}
        config_map = config_maps.pop(render.config_map_name(name), None)
        pytorchjob = pytorchjobs.pop(render.pytorchjob_name(name), None)
        stage_jobs = {n: p for n, p in pytorchjobs.items() if _owned_by(p, job)}
        pass_secrets = PassSecrets(client, namespace)
        stores = _PassStore(job, pass_secrets)
        manifest = await _check_manifest(job, stores) if ftj.needs_manifest(job, pytorchjob) else None
        progress = await _read_progress(job, stores) if ftj.needs_progress(job, pytorchjob) else None
        reports = await _read_stage_reports(job, ftj.needs_stage_reports(job, stage_jobs), stores)
        secrets = await secret_keys(pass_secrets, ftj.needs_secrets(job), job["spec"].get("output"))
        plan = ftj.decide(
            ftj.Observed(job=job, now=now_rfc3339(), config_map=config_map, pytorchjob=pytorchjob, manifest=manifest,
                         progress=progress, stage_jobs=stage_jobs,
                         stage_config_maps=frozenset(n for n, c in config_maps.items() if _owned_by(c, job)),
                         stage_reports=reports, secrets=secrets),
            RUNTIME.settings,
        )
        for child in plan.create:
            resource = kube.CONFIGMAPS if child["kind"] == "ConfigMap" else kube.PYTORCHJOBS
            _, created = await client.create(resource, child)
            if created:
                metrics.CHILDREN_CREATED.labels(kind=child["kind"]).inc()
                log.info("created child", extra={"job": name, "namespace": namespace, "kind": child["kind"]})
        if plan.patch_pytorchjob:
            await client.patch(kube.PYTORCHJOBS, namespace, render.pytorchjob_name(name), plan.patch_pytorchjob)
        for stage_job, stage_patch in plan.patch_stage_jobs.items():
            await client.patch(kube.PYTORCHJOBS, namespace, stage_job, stage_patch)
        await write_status(client, kube.FINETUNEJOBS, job, plan.status, statuswrite.FINETUNEJOB_VOLATILE,
                           RUNTIME.status_min_interval_seconds)
        for event in plan.events:
            await client.post_event(job, event.type, event.reason, event.message)
        old_phase = (job.get("status") or {}).get("phase")
        new_phase = plan.status.get("phase")
        if old_phase != new_phase:
            metrics.PHASE_TRANSITIONS.labels(phase=new_phase or "").inc()
            log.info("phase", extra={"job": name, "namespace": namespace, "from": old_phase, "to": new_phase})
        metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
        return plan.requeue_after


def _owner_name(body: dict) -> str | None:
    for owner in body.get("metadata", {}).get("ownerReferences") or []:
        if owner.get("kind") == "FineTuneJob" and owner.get("apiVersion", "").startswith(api.GROUP + "/"):
            return owner.get("name")
    return None


async def _reconcile_logged(namespace: str, name: str) -> None:
    await reconcile_or_retry(reconcile, namespace, name, metrics.RECONCILE_ERRORS)


def register(registry: kopf.OperatorRegistry | None = None) -> None:
    """Register the handlers (on the given registry, or kopf's default one)."""
    kw = {"registry": registry} if registry is not None else {}

    @kopf.on.resume(api.GROUP, api.VERSION, "finetunejobs", **kw)
    @kopf.on.create(api.GROUP, api.VERSION, "finetunejobs", **kw)
    @kopf.on.update(api.GROUP, api.VERSION, "finetunejobs", field="spec", **kw)
    async def finetunejob_changed(namespace, name, **_):
        await _reconcile_logged(namespace, name)

    @kopf.on.event("kubeflow.org", "v1", "pytorchjobs", labels={render.LABEL_JOB: kopf.PRESENT}, **kw)
    async def pytorchjob_event(body, namespace, type, **_):
        owner = _owner_name(body)
        if owner:
            await _reconcile_logged(namespace, owner)

    @kopf.timer(api.GROUP, api.VERSION, "finetunejobs", interval=RUNTIME.settings.resync_seconds,
                initial_delay=RUNTIME.settings.resync_seconds, idle=None,
                when=lambda status, **_: (status or {}).get("phase") not in ftj.TERMINAL, **kw)
    async def finetunejob_resync(namespace, name, **_):
        await _reconcile_logged(namespace, name)

    # Training progress reaches status within seconds: running jobs are re-read as often as the
    # trainer writes progress.json (a cheap GET per job; status is patched only when it changed).
    @kopf.timer(api.GROUP, api.VERSION, "finetunejobs", interval=RUNTIME.settings.progress_seconds,
                initial_delay=RUNTIME.settings.progress_seconds, idle=None,
                when=lambda status, **_: (status or {}).get("phase") in ftj.ACTIVE, **kw)
    async def finetunejob_progress(namespace, name, **_):
        await _reconcile_logged(namespace, name)

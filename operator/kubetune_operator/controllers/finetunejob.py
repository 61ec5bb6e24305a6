"""The cluster adapter for FineTuneJob: kopf triggers and the kube/storage port of `shell.run_pass`.

Every trigger (the job created, changed or resumed; its workload changed; its periodic pass, due by
`scheduler`) runs one pass under a per-job lock; deterministic names and create-or-get converge on one
workload per stage. Children are read from the watch (`children`), not listed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import kopf

from kubetune.api import manifest as manifest_api
from kubetune.api import storage_layout
from kubetune.api import v1alpha1 as api
from kubetune.clients import kube, storage
from kubetune_operator.backends import BACKENDS, backend_for_kind, backend_of, kueue
from kubetune_operator.reconcile import finetunejob as ftj
from kubetune_operator.reconcile import schedule, statuswrite
from kubetune_operator.reconcile.finetunejob_plan import Event, StageReport
from kubetune_operator.render import training as render
from kubetune_operator.shell import finetunejob as shell
from kubetune_operator.shell import now_rfc3339

from . import children as children_index
from . import metrics
from .credentials import PassSecrets, object_store, secret_keys
from .ownership import OWNERSHIP
from .retry import reconcile_or_retry
from .scheduler import Scheduler

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
    children: children_index.Children = field(default_factory=children_index.Children)
    budgets: schedule.Budgets = field(default_factory=schedule.Budgets)
    scheduler: Scheduler | None = None  # the periodic passes; made at the operator's start-up
    wake_serving: Callable[[str, list[str]], None] | None = None  # (namespace, AdapterDeployment names)


RUNTIME = Runtime()
KUEUE_WORKLOADS = kube.Resource(*kueue.WORKLOADS)


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


async def _read_json(store: storage.ObjectStore, uri: str) -> dict | None:
    raw = await asyncio.to_thread(store.read, uri)
    return json.loads(raw) if raw else None


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


class ClusterPass:
    """The cluster side of one pass over one FineTuneJob (shell.finetunejob.FineTuneJobPort): the kube
    API, the job's storage and its Secrets, each read at most once per pass."""

    def __init__(self, client: kube.KubeClient, namespace: str, name: str):
        self.client, self.namespace, self.name = client, namespace, name
        self.secrets = PassSecrets(client, namespace)
        self.stores: _PassStore | None = None  # once the job is read
        self.job: dict | None = None  # as read at the start of the pass
        self.read_progress_file = False  # whether the pass read a running workload's progress.json

    async def read_job(self) -> dict | None:
        job = self.job = await self.client.get(kube.FINETUNEJOBS, self.namespace, self.name)
        if job is not None:
            job.setdefault("apiVersion", api.API_VERSION)
            job.setdefault("kind", "FineTuneJob")
            self.stores = _PassStore(job, self.secrets)
        return job

    def _selector(self) -> str:
        return f"{render.LABEL_JOB}={self.name}"

    async def list_config_maps(self, job: dict) -> list[dict]:
        cached = RUNTIME.children.config_maps(self.namespace, self.name)
        if cached is not None:
            return cached
        return await self.client.list(kube.CONFIGMAPS, self.namespace, self._selector())

    async def list_workloads(self, job: dict) -> list[shell.Workload]:
        backend = backend_of(job)
        cached = RUNTIME.children.workloads(backend.kind, self.namespace, self.name)
        if cached is not None:
            return cached
        found = await self.client.list(_resource(backend.kind), self.namespace, self._selector())
        return [shell.Workload(w["metadata"], backend.read_status(w)) for w in found]

    async def check_manifest(self, job_prefix: str) -> manifest_api.ManifestCheck:
        store = await self.stores.get()
        try:
            return await asyncio.to_thread(storage.check_published, store, job_prefix, RUNTIME.verify_content,
                                           verify_merged=True)
        except Exception as exc:  # storage down: treat as "not there yet"; the resync retries
            log.warning("manifest check failed", extra={"job": self.name, "error": str(exc)})
            return manifest_api.ManifestCheck(found=False)

    async def read_progress(self, prefix: str) -> dict | None:
        """The trainer's progress.json (None when absent, unreadable or storage is down: progress can wait)."""
        self.read_progress_file = True
        store = await self.stores.get()
        try:
            return await _read_json(store, storage_layout.progress_uri(prefix))
        except Exception as exc:
            log.debug("progress read failed", extra={"job": self.name, "error": str(exc)})
            return None

    async def read_stage_report(self, prefix: str) -> StageReport | None:
        """result.json and progress.json of a finished (or vanished) stage job; None when unreadable now."""
        store = await self.stores.get()
        try:
            return StageReport(result=await _read_json(store, storage_layout.result_uri(prefix)),
                                   progress=await _read_json(store, storage_layout.progress_uri(prefix)))
        except Exception as exc:
            log.warning("stage result read failed", extra={"job": self.name, "prefix": prefix, "error": str(exc)})
            return None

    async def secret_keys(self, names: list[str], output: dict | None) -> dict | None:
        return await secret_keys(self.secrets, names, output)

    async def create_child(self, child: dict) -> None:
        stored, created = await self.client.create(_resource(child["kind"]), child)
        RUNTIME.children.created(self.namespace, self.name, {**stored, "kind": child["kind"]})
        if created:
            metrics.CHILDREN_CREATED.labels(kind=child["kind"]).inc()
            log.info("created child", extra={"job": self.name, "namespace": self.namespace, "kind": child["kind"]})

    async def patch_child(self, kind: str, name: str, patch: dict) -> None:
        await self.client.patch(_resource(kind), self.namespace, name, patch)

    async def read_kueue_workload(self, job: dict, workload_uid: str) -> dict | None:
        """Kueue's Workload for one of the job's workloads (labelled with its uid by Kueue). None when Kueue
        has made none yet, is not installed (404), or the operator may not read it (403: the status then
        says only that the workload waits for admission)."""
        try:
            found = await self.client.list(KUEUE_WORKLOADS, self.namespace, f"{kueue.LABEL_JOB_UID}={workload_uid}")
        except kube.ApiError as exc:
            if exc.status not in (403, 404):
                raise
            log.debug("Kueue workloads unreadable", extra={"job": self.name, "status": exc.status})
            return None
        return found[0] if found else None

    async def activate_kueue_workload(self, job: dict, name: str, active: bool) -> None:
        await self.client.patch(KUEUE_WORKLOADS, self.namespace, name, {"spec": {"active": active}})

    async def write_status(self, job: dict, status: dict) -> None:
        await write_status(self.client, kube.FINETUNEJOBS, job, status, statuswrite.FINETUNEJOB_VOLATILE,
                           RUNTIME.status_min_interval_seconds)
        old_phase, new_phase = (job.get("status") or {}).get("phase"), status.get("phase")
        if old_phase != new_phase:
            metrics.PHASE_TRANSITIONS.labels(phase=new_phase or "").inc()
            log.info("phase", extra={"job": self.name, "namespace": self.namespace, "from": old_phase,
                                     "to": new_phase})

    async def post_event(self, job: dict, event: Event) -> None:
        await self.client.post_event(job, event.type, event.reason, event.message)


def _resource(kind: str) -> kube.Resource:
    """The API resource of a child kind: a ConfigMap, or a training backend's workload."""
    if kind == "ConfigMap":
        return kube.CONFIGMAPS
    return kube.Resource(*backend_for_kind(kind).api_resource)


def _forget(key: tuple[str, str]) -> None:
    RUNTIME.locks.pop(key, None)  # waiters keep their reference; memory stays bounded
    RUNTIME.children.forget(*key)
    if RUNTIME.scheduler is not None:
        RUNTIME.scheduler.forget(key)


async def reconcile(namespace: str, name: str) -> float | None:
    """One pass of the FineTuneJob control loop. Returns seconds until the next periodic pass, if any."""
    key = (namespace, name)
    if not OWNERSHIP.owns(namespace, name):  # another replica's now (sharding)
        _forget(key)
        return None
    async with RUNTIME.locks[key]:
        started = time.monotonic()
        port = ClusterPass(RUNTIME.client, namespace, name)
        plan = await shell.run_pass(port, RUNTIME.settings, now_rfc3339())
        if plan is None:
            _forget(key)
            return None
        metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
        phase = plan.status.get("phase")
        if RUNTIME.scheduler is not None:
            RUNTIME.scheduler.after_pass(key, schedule.finetunejob_next(
                phase, plan.requeue_after, port.read_progress_file, RUNTIME.settings.resync_seconds))
        if phase != ((port.job or {}).get("status") or {}).get("phase") and RUNTIME.wake_serving is not None:
            # AdapterDeployments waiting for this job are not polled often: its news wakes them
            RUNTIME.wake_serving(namespace, RUNTIME.children.serving(namespace, name))
        return plan.requeue_after


def _owner_name(body: dict) -> str | None:
    for owner in body.get("metadata", {}).get("ownerReferences") or []:
        if owner.get("kind") == "FineTuneJob" and owner.get("apiVersion", "").startswith(api.GROUP + "/"):
            return owner.get("name")
    return None


async def _reconcile_logged(namespace: str, name: str) -> None:
    await reconcile_or_retry(reconcile, namespace, name, metrics.RECONCILE_ERRORS, _retry)


def _retry(key: tuple[str, str]) -> None:
    if RUNTIME.scheduler is not None:  # whatever triggered the failed pass, the scheduler tries again
        RUNTIME.scheduler.retry(key, schedule.WAITING)


def owned(namespace, name, **_) -> bool:
    """kopf's filter: only the objects this process owns are handled (and annotated) by it."""
    return OWNERSHIP.owns(namespace, name)


def register(registry: kopf.OperatorRegistry | None = None) -> None:
    """Register the handlers (on the given registry, or kopf's default one)."""
    kw = {"registry": registry} if registry is not None else {}
    children_index.register(registry)

    # The create path: a new job's first pass runs here at once, never behind the periodic passes
    # (those run in the scheduler's queue, a few at a time).
    @kopf.on.resume(api.GROUP, api.VERSION, "finetunejobs", when=owned, **kw)
    @kopf.on.create(api.GROUP, api.VERSION, "finetunejobs", when=owned, **kw)
    @kopf.on.update(api.GROUP, api.VERSION, "finetunejobs", field="spec", when=owned, **kw)
    async def finetunejob_changed(namespace, name, **kwargs):
        RUNTIME.children.attach(kwargs)
        await _reconcile_logged(namespace, name)

    for backend in BACKENDS.values():
        group, version, plural = backend.api_resource

        @kopf.on.event(group, version, plural, id=f"{backend.kind.lower()}_event",
                       labels={render.LABEL_JOB: kopf.PRESENT}, **kw)
        async def workload_event(body, namespace, type, **kwargs):
            RUNTIME.children.attach(kwargs)
            if type == "ADDED" and not body.get("status"):
                return  # the pass that created it knows all it says; its first status will be news
            owner = _owner_name(body)
            if owner and OWNERSHIP.owns(namespace, owner):
                await _reconcile_logged(namespace, owner)

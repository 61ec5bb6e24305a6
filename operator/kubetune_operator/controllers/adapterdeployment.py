"""The AdapterDeployment's cluster adapter: kopf triggers, and the port `shell.adapterdeployment.run_pass`
reads and writes through (the object, its pods' agent reports, the desired-state ConfigMap, the managed
runtime's children, retrain FineTuneJobs, status and Events). Rollouts advance on periodic passes (the
`scheduler`): canary steps wait on time and on the agents' reports, which arrive as Pod annotations.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

import kopf

from kubetune.api import serving
from kubetune.api import v1alpha1 as api
from kubetune.api.validation import validate
from kubetune.bounded import BoundedDict
from kubetune.clients import kube, storage
from kubetune_operator.clients import drift_storage as drift
from kubetune_operator.clients.sources import manifest_location
from kubetune_operator.reconcile import adapterdeployment as adp
from kubetune_operator.reconcile import clusterwide, driftloop, schedule, statuswrite
from kubetune_operator.reconcile import conditions as cond
from kubetune_operator.render import gitops
from kubetune_operator.render import serving as render
from kubetune_operator.shell import adapterdeployment as shell
from kubetune_operator.shell.drift import retrain_view

from . import metrics
from .credentials import PassSecrets, object_store, secret_keys
from .finetunejob import RUNTIME as finetunejob_runtime
from .finetunejob import now_rfc3339, owned, write_status
from .ownership import OWNERSHIP
from .retry import reconcile_or_retry
from .scheduler import Scheduler

log = logging.getLogger("kubetune.adapterdeployment")

ADAPTERDEPLOYMENTS = kube.Resource("kubetune.io", "v1alpha1", "adapterdeployments")
PODS = kube.Resource("", "v1", "pods")
DEPLOYMENTS = kube.Resource("apps", "v1", "deployments")
SERVICES = kube.Resource("", "v1", "services")
SERVICEACCOUNTS = kube.Resource("", "v1", "serviceaccounts")
ROLES = kube.Resource("rbac.authorization.k8s.io", "v1", "roles")
ROLEBINDINGS = kube.Resource("rbac.authorization.k8s.io", "v1", "rolebindings")
NAMESPACES = kube.Resource("", "v1", "namespaces", namespaced=False)
RESOURCES = {"ConfigMap": kube.CONFIGMAPS, "ServiceAccount": SERVICEACCOUNTS, "Role": ROLES,
             "RoleBinding": ROLEBINDINGS, "Deployment": DEPLOYMENTS, "Service": SERVICES}


@dataclass
class Runtime:
    client: kube.KubeClient | None = None
    settings: adp.Settings = field(default_factory=adp.Settings)
    render: render.ServingSettings = field(default_factory=render.ServingSettings)
    default_s3: storage.S3Settings = field(default_factory=storage.S3Settings)
    resync_seconds: float = 5.0
    verified: dict = field(default_factory=BoundedDict)  # (manifest uri, digest) -> Source: verification is costly
    base_identities: dict = field(default_factory=BoundedDict)  # (uri, revision) -> the served base's identity
    locks: dict = field(default_factory=lambda: defaultdict(asyncio.Lock))
    analyzer: drift.Analyzer = field(default_factory=drift.Analyzer)  # drift caches and settings
    watch_namespaces: tuple = ()  # empty: the whole cluster (the retrain cap counts these)
    status_min_interval_seconds: float = 0.0  # see finetunejob.Runtime
    scheduler: Scheduler | None = None  # the periodic passes; made at the operator's start-up


RUNTIME = Runtime()


class ClusterPort:
    """One pass's reads and writes in the cluster (shell.adapterdeployment.AdapterDeploymentPort)."""

    def __init__(self, client: kube.KubeClient, namespace: str, name: str):
        self.client, self.namespace, self.name = client, namespace, name
        self.secrets = PassSecrets(client, namespace)
        self.verified, self.analyzer = RUNTIME.verified, RUNTIME.analyzer
        self.base_identities = RUNTIME.base_identities
        self.config_map: dict | None = None  # the desired-state ConfigMap as read in this pass

    async def read(self) -> dict | None:
        adep = await self.client.get(ADAPTERDEPLOYMENTS, self.namespace, self.name)
        if adep is None or adep["metadata"].get("deletionTimestamp"):
            RUNTIME.locks.pop((self.namespace, self.name), None)
            return None
        adep.setdefault("apiVersion", api.API_VERSION)
        adep.setdefault("kind", "AdapterDeployment")
        result = validate(adep)
        if not result.ok:
            await self._report_invalid(adep, "; ".join(str(e) for e in result.errors))
            return None
        return {**adep, "spec": result.defaulted["spec"]}

    async def _report_invalid(self, adep: dict, message: str) -> None:
        conditions = (adep.get("status") or {}).get("conditions")
        generation = adep["metadata"].get("generation", 1)
        status = {"observedGeneration": generation, "phase": "Degraded", statuswrite.LAST_WRITE: now_rfc3339(),
                  "conditions": cond.set_condition(conditions, "Validated", False, "InvalidSpec", message,
                                                   generation, now_rfc3339())}
        await self.client.patch(ADAPTERDEPLOYMENTS, self.namespace, self.name, {"status": status},
                                subresource="status")

    async def object_store(self, adep: dict) -> storage.ObjectStore:
        """The adapters' storage with the AdapterDeployment's own credentials, else the operator's defaults."""
        return await object_store(self.secrets, adep["spec"].get("storage"), RUNTIME.default_s3)

    async def locate_source(self, adep: dict, adapter: dict) -> tuple[str, str | None] | adp.Source:
        """A FineTuneJob's published adapter, or a uri source's manifest."""
        src, name = adapter["source"], adapter["name"]
        if not src.get("fineTuneJobRef"):
            return manifest_location(src["uri"]), src.get("digest")
        job_name = src["fineTuneJobRef"]["name"]
        job = await self.client.get(kube.FINETUNEJOBS, self.namespace, job_name)
        if job is None:
            return adp.Source(problems=(("FineTuneJobNotFound", f"adapters[{name}]: FineTuneJob {job_name} "
                                                                f"does not exist in {self.namespace}"),))
        published = (job.get("status") or {}).get("adapter")
        if not published:
            phase = (job.get("status") or {}).get("phase", "Pending")
            return adp.Source(problems=(("FineTuneJobNotReady", f"adapters[{name}]: FineTuneJob {job_name} has "
                                                                f"published no adapter (phase {phase})"),))
        return published["manifestUri"], published["digest"]

    async def namespaces(self, adep: dict) -> list[clusterwide.Namespace] | None:
        """Every namespace (the watched ones with --namespace), read only when a selector may reach them."""
        if not clusterwide.namespace_selector(adep["spec"]) and not clusterwide.remembered(adep):
            return None
        watched = set(RUNTIME.watch_namespaces)  # with --namespace the operator may touch no other namespace
        return [clusterwide.namespace_view(n) for n in await self.client.list(NAMESPACES)
                if (not watched or n["metadata"]["name"] in watched) and not n["metadata"].get("deletionTimestamp")]

    async def pods(self, adep: dict, namespace: str) -> list[adp.Pod]:
        selector = ",".join(f"{k}={v}" for k, v in render.pod_selector(adep).items())
        return [_pod_view(p) for p in await self.client.list(PODS, namespace, selector)
                if not p["metadata"].get("deletionTimestamp") and (p.get("status") or {}).get("phase") != "Failed"]

    async def desired_state(self, adep: dict) -> serving.DesiredState | None:
        self.config_map = await self.client.get(kube.CONFIGMAPS, self.namespace,
                                                serving.desired_config_map_name(self.name))
        if self.config_map:
            try:
                return serving.DesiredState.from_json(self.config_map["data"][serving.DESIRED_KEY])
            except (KeyError, ValueError):
                return None
        return None

    async def secrets_found(self, adep: dict) -> dict | None:
        return await secret_keys(self.secrets, adp.needs_secrets(adep), adep["spec"].get("storage"))

    async def apply_serving(self, adep: dict, changed: serving.DesiredState | None,
                            desired: serving.DesiredState, max_rank: int | None) -> None:
        for child in render.render_children(adep, RUNTIME.render, desired, max_rank):
            if child["kind"] == "ConfigMap":  # read this pass: its content is the current desired state
                if self.config_map is None:
                    await _apply_child(self.client, child, None)
                elif changed is not None:
                    await self.client.patch(kube.CONFIGMAPS, self.namespace, child["metadata"]["name"],
                                            {"data": child["data"]})
                continue
            existing = await self.client.get(RESOURCES[child["kind"]], self.namespace, child["metadata"]["name"])
            await _apply_child(self.client, child, existing)

    async def apply_remote(self, adep: dict, namespace: str, desired: serving.DesiredState, create: bool) -> None:
        config_map, *rbac = render.render_remote_children(adep, namespace, desired)
        existing = await self.client.get(kube.CONFIGMAPS, namespace, config_map["metadata"]["name"])
        if (existing is None and not create) or (existing and existing.get("data") == config_map["data"]):
            return
        # on every change, the agents' RBAC first (create-or-get: one deleted by hand comes back), so that
        # they can read what is written; one GET of the ConfigMap per namespace and pass otherwise
        for child in rbac:
            await _apply_child(self.client, child, None)
        if existing is None:
            await _apply_child(self.client, config_map, None)
        else:
            await self.client.patch(kube.CONFIGMAPS, namespace, config_map["metadata"]["name"],
                                    {"data": config_map["data"]})

    async def release(self, adep: dict, namespace: str) -> None:
        await release_namespace(self.client, adep["metadata"]["namespace"], self.name, namespace)

    async def write_status(self, adep: dict, status: dict) -> None:
        await write_status(self.client, ADAPTERDEPLOYMENTS, adep, status, statuswrite.ADAPTERDEPLOYMENT_VOLATILE,
                           RUNTIME.status_min_interval_seconds)

    async def post_events(self, adep: dict, events: list) -> None:
        for event in events:
            await self.client.post_event(adep, event.type, event.reason, event.message)

    async def retrain_jobs(self, adep: dict, adapter: dict) -> list[driftloop.RetrainJob]:
        selector = f"{driftloop.LABEL_RETRAIN_OF}={self.name},{driftloop.LABEL_RETRAIN_ADAPTER}={adapter['name']}"
        return [retrain_view(j) for j in await self.client.list(kube.FINETUNEJOBS, self.namespace, selector)]

    async def retrains_in_flight(self) -> int:
        jobs = []
        for namespace in RUNTIME.watch_namespaces or (None,):  # the cap counts every watched namespace
            jobs += await self.client.list(kube.FINETUNEJOBS, namespace, driftloop.LABEL_RETRAIN_OF)
        return sum(1 for j in jobs if (j.get("status") or {}).get("phase") not in driftloop.FINISHED)

    async def create_retrain(self, job: dict) -> None:
        await self.client.create(kube.FINETUNEJOBS, job)
        metrics.CHILDREN_CREATED.labels(kind="FineTuneJob").inc()


def _pod_view(pod: dict) -> adp.Pod:
    """What a Pod says: its readiness and its agent's report annotation."""
    annotations = pod["metadata"].get("annotations") or {}
    raw = annotations.get(serving.ANNOTATION_REPORT)
    report = None
    if raw:
        try:
            report = json.loads(raw)
        except ValueError:
            log.warning("unreadable agent report", extra={"pod": pod["metadata"]["name"]})
    ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                for c in (pod.get("status") or {}).get("conditions") or [])
    return adp.Pod(pod["metadata"]["name"], ready, report)


def _label_patch(existing: dict, labels: dict) -> dict:
    """A merge patch of metadata.labels that also drops GitOps tracking labels an older operator set."""
    stale = {k: None for k in existing["metadata"].get("labels") or {} if gitops.is_tracking_key(k)}
    return {**stale, **labels}


async def _apply_child(client: kube.KubeClient, child: dict, existing: dict | None) -> None:
    resource = RESOURCES[child["kind"]]
    namespace, name = child["metadata"]["namespace"], child["metadata"]["name"]
    if existing is None:
        _, created = await client.create(resource, child)
        if created:
            metrics.CHILDREN_CREATED.labels(kind=child["kind"]).inc()
        return
    hash_key = render.ANNOTATION_TEMPLATE_HASH
    stored = (existing["metadata"].get("annotations") or {}).get(hash_key)
    if child["kind"] == "Deployment" and stored != child["metadata"]["annotations"][hash_key]:
        # a new --max-lora-rank or engine image (or labels: an older operator's tracking label) rolls the pods
        template = child["spec"]["template"]
        stale = set(((existing["spec"].get("template") or {}).get("metadata") or {}).get("labels") or {})
        labels = {**dict.fromkeys(stale - set(template["metadata"]["labels"])), **template["metadata"]["labels"]}
        await client.patch(resource, namespace, name, {
            "metadata": {"annotations": child["metadata"]["annotations"],
                         "labels": _label_patch(existing, child["metadata"]["labels"])},
            "spec": {"template": {**template, "metadata": {**template["metadata"], "labels": labels}},
                     "replicas": child["spec"]["replicas"]}})
    elif child["kind"] == "Deployment" and existing["spec"].get("replicas") != child["spec"]["replicas"]:
        await client.patch(resource, namespace, name, {"spec": {"replicas": child["spec"]["replicas"]}})


async def release_namespace(client: kube.KubeClient, home: str, name: str, namespace: str) -> None:
    """Delete the desired state and agent RBAC an AdapterDeployment wrote into another namespace."""
    stub = {"metadata": {"namespace": home, "name": name}}
    for child in render.render_remote_children(stub, namespace, serving.DesiredState(generation=0)):
        await client.delete(RESOURCES[child["kind"]], namespace, child["metadata"]["name"])


async def release_everywhere(client: kube.KubeClient, home: str, name: str, status: dict) -> None:
    """On deletion: ownerReferences cannot cross namespaces, so the garbage collector does not reach what it
    wrote elsewhere; find it by its labels (and its status) and delete it."""
    selector = f"{serving.LABEL_ADAPTERDEPLOYMENT}={name},{serving.LABEL_HOME_NAMESPACE}={home}"
    found = set()
    for namespace in RUNTIME.watch_namespaces or (None,):
        found |= {c["metadata"]["namespace"] for c in await client.list(kube.CONFIGMAPS, namespace, selector)}
    found |= {n["name"] for n in status.get("namespaces") or []}
    for namespace in sorted(found - {home}):
        await release_namespace(client, home, name, namespace)


def _reaches_other_namespaces(spec, status, namespace, **_) -> bool:
    """Whether it may hold children in other namespaces: its finalizer's condition. Not filtered by
    ownership: every replica then keeps the finalizer until the owner has cleaned up (below)."""
    return bool(clusterwide.namespace_selector(dict(spec))) or any(
        n.get("name") != namespace for n in (status or {}).get("namespaces") or [])


async def reconcile(namespace: str, name: str) -> None:
    key = (namespace, name)
    if not OWNERSHIP.owns(namespace, name):  # another replica's now (sharding)
        if RUNTIME.scheduler is not None:
            RUNTIME.scheduler.forget(key)
        return
    async with RUNTIME.locks[key]:
        started = time.monotonic()
        result = await shell.run_pass(ClusterPort(RUNTIME.client, namespace, name), RUNTIME.settings)
        if result is None:  # gone, or invalid until its spec changes
            if RUNTIME.scheduler is not None:
                RUNTIME.scheduler.forget(key)
            return
        for event in result.drift_events:
            metrics.DRIFT_DECISIONS.labels(reason=event.reason).inc()
        metrics.ADEP_RECONCILE_SECONDS.observe(time.monotonic() - started)
        if RUNTIME.scheduler is not None:
            RUNTIME.scheduler.after_pass(key, schedule.adapterdeployment_next(
                result.status, result.requeue_after, RUNTIME.resync_seconds))


async def _reconcile_logged(namespace: str, name: str) -> None:
    await reconcile_or_retry(reconcile, namespace, name, metrics.ADEP_RECONCILE_ERRORS, _retry)


def _retry(key: tuple[str, str]) -> None:
    if RUNTIME.scheduler is not None:  # whatever triggered the failed pass, the scheduler tries again
        RUNTIME.scheduler.retry(key, schedule.ROLLING)


def wake(namespace: str, names: list[str]) -> None:
    """Pass these AdapterDeployments now: a FineTuneJob they serve has changed phase."""
    if RUNTIME.scheduler is not None:
        for name in names:
            if OWNERSHIP.owns(namespace, name):
                RUNTIME.scheduler.nudge((namespace, name), schedule.ROLLING)


def register(registry: kopf.OperatorRegistry | None = None) -> None:
    kw = {"registry": registry} if registry is not None else {}

    @kopf.on.resume(api.GROUP, api.VERSION, "adapterdeployments", when=owned, **kw)
    @kopf.on.create(api.GROUP, api.VERSION, "adapterdeployments", when=owned, **kw)
    @kopf.on.update(api.GROUP, api.VERSION, "adapterdeployments", field="spec", when=owned, **kw)
    async def adapterdeployment_changed(namespace, name, **kwargs):
        finetunejob_runtime.children.attach(kwargs)
        await _reconcile_logged(namespace, name)

    # What it wrote into other namespaces is deleted before it goes (kopf's finalizer, only on those that may)
    @kopf.on.delete(api.GROUP, api.VERSION, "adapterdeployments", when=_reaches_other_namespaces, **kw)
    async def adapterdeployment_deleted(namespace, name, status, **_):
        if not OWNERSHIP.owns(namespace, name):  # the owner cleans up and removes the finalizer; not us
            raise kopf.TemporaryError("another replica owns it (sharding)", delay=5)
        async with RUNTIME.locks[(namespace, name)]:
            await release_everywhere(RUNTIME.client, namespace, name, dict(status or {}))

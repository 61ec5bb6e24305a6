"""kopf handlers for AdapterDeployment: thin triggers around one level-based reconcile.

Each pass reads the AdapterDeployment, resolves every adapter's source (a FineTuneJob's published
adapter, or a uri) to a verified manifest, reads the serving pods' agent reports and the desired-state
ConfigMap, calls `adapterdeployment.decide`, and carries out the plan: the desired state for the
agents (they pull it), the managed runtime's children, status and Events. Rollouts advance on a
timer: canary steps wait on time and on the agents' reports, which arrive as Pod annotations.
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
from kubetune.clients import drift_storage as drift
from kubetune.clients import kube, storage
from kubetune.clients.sources import manifest_location, verified_source
from kubetune.reconcile import adapterdeployment as adp
from kubetune.reconcile import conditions as cond
from kubetune.reconcile import driftloop, statuswrite, tenancy
from kubetune.render import gitops
from kubetune.render import serving as render

from . import metrics
from .credentials import PassSecrets, object_store, secret_keys
from .finetunejob import now_rfc3339, write_status
from .retry import reconcile_or_retry

log = logging.getLogger("kubetune.adapterdeployment")

ADAPTERDEPLOYMENTS = kube.Resource("kubetune.io", "v1alpha1", "adapterdeployments")
PODS = kube.Resource("", "v1", "pods")
DEPLOYMENTS = kube.Resource("apps", "v1", "deployments")
SERVICES = kube.Resource("", "v1", "services")
SERVICEACCOUNTS = kube.Resource("", "v1", "serviceaccounts")
ROLES = kube.Resource("rbac.authorization.k8s.io", "v1", "roles")
ROLEBINDINGS = kube.Resource("rbac.authorization.k8s.io", "v1", "rolebindings")
RESOURCES = {"ConfigMap": kube.CONFIGMAPS, "ServiceAccount": SERVICEACCOUNTS, "Role": ROLES,
             "RoleBinding": ROLEBINDINGS, "Deployment": DEPLOYMENTS, "Service": SERVICES}


@dataclass
class Runtime:
    client: kube.KubeClient | None = None
    settings: adp.Settings = field(default_factory=adp.Settings)
    render: render.ServingSettings = field(default_factory=render.ServingSettings)
    default_s3: storage.S3Settings = field(default_factory=storage.S3Settings)
    resync_seconds: float = 5.0
    verified: dict = field(default_factory=dict)  # (manifest uri, digest) -> Source: verification is costly
    locks: dict = field(default_factory=lambda: defaultdict(asyncio.Lock))
    analyzer: drift.Analyzer = field(default_factory=drift.Analyzer)  # drift caches and settings
    watch_namespaces: tuple = ()  # empty: the whole cluster (the retrain cap counts these)
    status_min_interval_seconds: float = 0.0  # see finetunejob.Runtime


RUNTIME = Runtime()


async def _store_for(adep: dict, secrets: PassSecrets) -> storage.ObjectStore:
    """The adapters' storage with the AdapterDeployment's own credentials, else the operator's defaults."""
    return await object_store(secrets, adep["spec"].get("storage"), RUNTIME.default_s3)


async def _resolve(adep: dict, adapter: dict, store: storage.ObjectStore) -> adp.Source:
    """A source as a verified manifest: every file's size and sha256 checked once per digest."""
    namespace, name = adep["metadata"]["namespace"], adapter["name"]
    src = adapter["source"]
    if src.get("fineTuneJobRef"):
        job_name = src["fineTuneJobRef"]["name"]
        job = await RUNTIME.client.get(kube.FINETUNEJOBS, namespace, job_name)
        if job is None:
            return adp.Source(problems=(("FineTuneJobNotFound", f"adapters[{name}]: FineTuneJob {job_name} "
                                                                f"does not exist in {namespace}"),))
        published = (job.get("status") or {}).get("adapter")
        if not published:
            phase = (job.get("status") or {}).get("phase", "Pending")
            return adp.Source(problems=(("FineTuneJobNotReady", f"adapters[{name}]: FineTuneJob {job_name} has "
                                                                f"published no adapter (phase {phase})"),))
        manifest_uri, expected = published["manifestUri"], published["digest"]
    else:
        manifest_uri, expected = manifest_location(src["uri"]), src.get("digest")
    if not adp.allowed(manifest_uri, namespace, RUNTIME.settings):
        # outside the namespace's storage prefixes (--allowed-storage): refused unread
        message = (f"adapters[{name}]: {manifest_uri} is outside the storage prefixes namespace {namespace} "
                   "may serve from")
        return adp.Source(manifest_uri=manifest_uri, problems=(("SourceNotAllowed", message),))
    return await verified_source(store, manifest_uri, expected, name, RUNTIME.verified)


def _pod_view(pod: dict) -> adp.Pod:
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


async def _apply_child(child: dict, existing: dict | None) -> None:
    resource = RESOURCES[child["kind"]]
    namespace, name = child["metadata"]["namespace"], child["metadata"]["name"]
    if existing is None:
        _, created = await RUNTIME.client.create(resource, child)
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
        await RUNTIME.client.patch(resource, namespace, name, {
            "metadata": {"annotations": child["metadata"]["annotations"],
                         "labels": _label_patch(existing, child["metadata"]["labels"])},
            "spec": {"template": {**template, "metadata": {**template["metadata"], "labels": labels}},
                     "replicas": child["spec"]["replicas"]}})
    elif child["kind"] == "Deployment" and existing["spec"].get("replicas") != child["spec"]["replicas"]:
        await RUNTIME.client.patch(resource, namespace, name, {"spec": {"replicas": child["spec"]["replicas"]}})


def _retrain_view(job: dict) -> driftloop.RetrainJob:
    status = job.get("status") or {}
    message = next((c.get("message", "") for c in status.get("conditions") or []
                    if c.get("type") in ("Failed", "Succeeded", "BaselineSufficient") and c.get("status") == "True"),
                   status.get("message", ""))
    return driftloop.RetrainJob(job["metadata"]["name"], status.get("phase", "Pending"), status.get("adapter"),
                                message or "")


async def _retrains_in_flight() -> int:
    namespaces = RUNTIME.watch_namespaces or (None,)
    jobs = []
    for namespace in namespaces:
        jobs += await RUNTIME.client.list(kube.FINETUNEJOBS, namespace, driftloop.LABEL_RETRAIN_OF)
    return sum(1 for j in jobs if (j.get("status") or {}).get("phase") not in driftloop.FINISHED)


async def _drift_pass(adep: dict, adapter: dict, rec: dict, store: storage.ObjectStore,
                      now: str) -> tuple[dict, list]:
    """One adapter's drift loop (clients.drift_storage.drift_pass) with this cluster's FineTuneJobs."""
    namespace, name = adep["metadata"]["namespace"], adep["metadata"]["name"]
    selector = f"{driftloop.LABEL_RETRAIN_OF}={name},{driftloop.LABEL_RETRAIN_ADAPTER}={adapter['name']}"
    jobs = [_retrain_view(j) for j in await RUNTIME.client.list(kube.FINETUNEJOBS, namespace, selector)]

    async def create(job: dict) -> None:
        await RUNTIME.client.create(kube.FINETUNEJOBS, job)
        metrics.CHILDREN_CREATED.labels(kind="FineTuneJob").inc()

    return await drift.drift_pass(RUNTIME.analyzer, store, adep, adapter, rec, now, jobs=jobs,
                                  in_flight=_retrains_in_flight, create_job=create)


async def reconcile(namespace: str, name: str) -> None:
    client = RUNTIME.client
    async with RUNTIME.locks[(namespace, name)]:
        started = time.monotonic()
        adep = await client.get(ADAPTERDEPLOYMENTS, namespace, name)
        if adep is None or adep["metadata"].get("deletionTimestamp"):
            RUNTIME.locks.pop((namespace, name), None)
            return
        adep.setdefault("apiVersion", api.API_VERSION)
        adep.setdefault("kind", "AdapterDeployment")
        result = validate(adep)
        if not result.ok:
            message = "; ".join(str(e) for e in result.errors)
            conditions = (adep.get("status") or {}).get("conditions")
            status = {"observedGeneration": adep["metadata"].get("generation", 1), "phase": "Degraded",
                      statuswrite.LAST_WRITE: now_rfc3339(),
                      "conditions": cond.set_condition(conditions, "Validated", False, "InvalidSpec", message,
                                                       adep["metadata"].get("generation", 1), now_rfc3339())}
            await client.patch(ADAPTERDEPLOYMENTS, namespace, name, {"status": status}, subresource="status")
            return
        adep = {**adep, "spec": result.defaulted["spec"]}
        pass_secrets = PassSecrets(client, namespace)
        store = await _store_for(adep, pass_secrets)
        records = {r["name"]: r for r in (adep.get("status") or {}).get("adapters") or []}
        # a promoted retrain is served instead of the spec's source (while that source is unchanged)
        rollout_view = driftloop.rollout_view(adep, records)
        sources = {a["name"]: await _resolve(rollout_view, a, store) for a in rollout_view["spec"]["adapters"]}
        selector = ",".join(f"{k}={v}" for k, v in render.pod_selector(adep).items())
        pods = [p for p in await client.list(PODS, namespace, selector)
                if not p["metadata"].get("deletionTimestamp") and (p.get("status") or {}).get("phase") != "Failed"]
        desired_name = serving.desired_config_map_name(name)
        config_map = await client.get(kube.CONFIGMAPS, namespace, desired_name)
        current = None
        if config_map:
            try:
                current = serving.DesiredState.from_json(config_map["data"][serving.DESIRED_KEY])
            except (KeyError, ValueError):
                current = None
        now = now_rfc3339()
        found_secrets = await secret_keys(pass_secrets, adp.needs_secrets(adep), adep["spec"].get("storage"))
        plan = adp.decide(adp.Observed(adep=rollout_view, now=now, sources=sources,
                                       pods=[_pod_view(p) for p in pods], desired=current, secrets=found_secrets),
                          RUNTIME.settings)
        events = list(plan.events)
        for adapter in adep["spec"]["adapters"]:
            # no drift pass over storage outside the namespace's prefixes (Validated=False StorageNotAllowed)
            if adapter.get("drift") and not tenancy.adapterdeployment_refusals(adep, RUNTIME.settings.allowed_sources,
                                                                               adapter):
                rec = next(r for r in plan.status["adapters"] if r["name"] == adapter["name"])
                rec["drift"], drift_events = await _drift_pass(adep, adapter, rec, store, now)
                for event in drift_events:
                    metrics.DRIFT_DECISIONS.labels(reason=event.reason).inc()
                events += drift_events
        desired = plan.desired or current or serving.DesiredState(generation=1)
        served = {**adep, "status": plan.status}
        max_rank = adp.runtime_max_rank(adep["spec"], adp.served_ranks(served, sources))
        children = render.render_children(adep, RUNTIME.render, desired, max_rank)
        for child in children:
            if child["kind"] == "ConfigMap":  # read above: its content is the current desired state
                if config_map is None:
                    await _apply_child(child, None)
                elif plan.desired is not None:
                    await client.patch(kube.CONFIGMAPS, namespace, desired_name, {"data": child["data"]})
                continue
            existing = await client.get(RESOURCES[child["kind"]], namespace, child["metadata"]["name"])
            await _apply_child(child, existing)
        await write_status(client, ADAPTERDEPLOYMENTS, adep, plan.status, statuswrite.ADAPTERDEPLOYMENT_VOLATILE,
                           RUNTIME.status_min_interval_seconds)
        for event in events:
            await client.post_event(adep, event.type, event.reason, event.message)
        metrics.ADEP_RECONCILE_SECONDS.observe(time.monotonic() - started)


async def _reconcile_logged(namespace: str, name: str) -> None:
    await reconcile_or_retry(reconcile, namespace, name, metrics.ADEP_RECONCILE_ERRORS)


def register(registry: kopf.OperatorRegistry | None = None) -> None:
    kw = {"registry": registry} if registry is not None else {}

    @kopf.on.resume(api.GROUP, api.VERSION, "adapterdeployments", **kw)
    @kopf.on.create(api.GROUP, api.VERSION, "adapterdeployments", **kw)
    @kopf.on.update(api.GROUP, api.VERSION, "adapterdeployments", field="spec", **kw)
    async def adapterdeployment_changed(namespace, name, **_):
        await _reconcile_logged(namespace, name)

    # Rollouts move on time (pauses, analysis windows) and on the agents' Pod reports: a periodic pass
    # per AdapterDeployment reads them (one LIST of its pods, one GET of its ConfigMap).
    @kopf.timer(api.GROUP, api.VERSION, "adapterdeployments", interval=RUNTIME.resync_seconds,
                initial_delay=RUNTIME.resync_seconds, idle=None, **kw)
    async def adapterdeployment_resync(namespace, name, **_):
        await _reconcile_logged(namespace, name)

"""One AdapterDeployment pass, for the cluster and for `kubetune local`: observe through a port, decide
(`reconcile.adapterdeployment.decide`), run each adapter's drift pass, apply through the port.

Every rule of a pass lives here once: the storage limits on sources and on the drift loop, the rollout
view of a promoted retrain, the runtime's --max-lora-rank. The ports only read and write.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from kubetune.api import serving
from kubetune.clients import storage
from kubetune_operator.clients import base_models
from kubetune_operator.clients.drift_storage import Analyzer
from kubetune_operator.clients.sources import verified_source
from kubetune_operator.reconcile import adapterdeployment as adp
from kubetune_operator.reconcile import clusterwide, driftloop, tenancy

from . import now_rfc3339
from .drift import RetrainPort, drift_pass


class AdapterDeploymentPort(RetrainPort, Protocol):
    """What one pass reads and writes, wherever the AdapterDeployment runs."""

    verified: dict  # (manifest uri, digest) -> adp.Source: verification is costly, done once per digest
    base_identities: dict  # (uri, revision) -> (expiry, (identity, why)): clients.base_models' cache
    analyzer: Analyzer  # drift caches and settings

    async def read(self) -> dict | None:
        """The AdapterDeployment, spec defaulted and valid, with its status; None: nothing to reconcile."""

    async def object_store(self, adep: dict) -> storage.ObjectStore:
        """The adapters' storage, with the AdapterDeployment's credentials."""

    async def locate_source(self, adep: dict, adapter: dict) -> tuple[str, str | None] | adp.Source:
        """An adapter's (manifest uri, expected digest), or a Source naming why there is none yet."""

    async def namespaces(self, adep: dict) -> list[clusterwide.Namespace] | None:
        """The namespaces a namespaceSelector may reach, with their labels and annotations; None: not read
        (no selector and no other namespace in its status; or a port that knows only its own namespace)."""

    async def pods(self, adep: dict, namespace: str) -> list[adp.Pod]:
        """The serving pods in `namespace`, with their readiness and their agent's report."""

    async def desired_state(self, adep: dict) -> serving.DesiredState | None:
        """What the agents read now (None: nothing written yet, or unreadable)."""

    async def secrets_found(self, adep: dict) -> dict | None:
        """The keys of the Secrets the serving pods need (None: not looked at)."""

    async def apply_serving(self, adep: dict, changed: serving.DesiredState | None,
                            desired: serving.DesiredState, max_rank: int | None) -> None:
        """Publish a changed desired state; keep the serving runtime (its children) as `desired` needs."""

    async def apply_remote(self, adep: dict, namespace: str, desired: serving.DesiredState, create: bool) -> None:
        """Keep another namespace's desired state and agent RBAC (cluster-wide); only update it if not `create`.
        Called only for namespaces `namespaces` returned."""

    async def release(self, adep: dict, namespace: str) -> None:
        """Delete what it wrote into another namespace."""

    async def write_status(self, adep: dict, status: dict) -> None:
        """Store the new status."""

    async def post_events(self, adep: dict, events: list) -> None:
        """Tell the user (Events)."""


@dataclass(frozen=True)
class PassResult:
    status: dict
    events: list
    drift_events: list  # the drift loop's decisions among `events`
    requeue_after: float | None = None  # the decision's: when its next pass is wanted (reconcile.schedule)


async def resolve_source(port: AdapterDeploymentPort, adep: dict, adapter: dict, store: storage.ObjectStore,
                         settings: adp.Settings) -> adp.Source:
    """A source as a verified manifest; one outside the namespace's storage prefixes is refused unread."""
    located = await port.locate_source(adep, adapter)
    if isinstance(located, adp.Source):
        return located
    manifest_uri, expected = located
    namespace, name = adep["metadata"]["namespace"], adapter["name"]
    if not adp.allowed(manifest_uri, namespace, settings):
        message = (f"adapters[{name}]: {manifest_uri} is outside the storage prefixes namespace {namespace} "
                   "may serve from")
        return adp.Source(manifest_uri=manifest_uri, problems=(("SourceNotAllowed", message),))
    return await verified_source(store, manifest_uri, expected, name, port.verified)


def drift_allowed(adep: dict, adapter: dict, settings: adp.Settings) -> bool:
    """No drift pass over storage outside the namespace's prefixes (decide says Validated=False
    StorageNotAllowed); none configured (`kubetune local`, an open cluster): every drift adapter runs."""
    return bool(adapter.get("drift")) and not tenancy.adapterdeployment_refusals(adep, settings.allowed_sources,
                                                                                 adapter)


async def observe_reach(port: AdapterDeploymentPort, adep: dict, rollout_view: dict, sources: dict,
                        settings: adp.Settings) -> tuple[list, dict, list, dict]:
    """Where it serves, which of those namespaces refuse it and why, the namespaces it left, and the pods
    listed in each."""
    served = clusterwide.targets(adep, await port.namespaces(adep))
    manifests = {name: source.manifest_uri for name, source in sources.items()}
    refusals = {n.name: why for n in served
                if (why := clusterwide.refusal(rollout_view, n, manifests, settings.allowed_sources))}
    released = clusterwide.left(adep, served)
    listed = {name: await port.pods(adep, name) for name in [n.name for n in served] + released}
    return served, refusals, released, listed


async def run_pass(port: AdapterDeploymentPort, settings: adp.Settings) -> PassResult | None:
    """Observe -> decide -> drift pass per adapter -> apply. None when there was nothing to reconcile."""
    adep = await port.read()
    if adep is None:
        return None
    store = await port.object_store(adep)
    records = {r["name"]: r for r in (adep.get("status") or {}).get("adapters") or []}
    # a promoted retrain is served instead of the spec's source (while that source is unchanged)
    rollout_view = driftloop.rollout_view(adep, records)
    sources = {a["name"]: await resolve_source(port, rollout_view, a, store, settings)
               for a in rollout_view["spec"]["adapters"]}
    served_base = None
    if any((s.base_model or {}).get("identity") for s in sources.values()):  # older manifests: URIs compared
        served_base = await base_models.served_identity(store, adep["spec"]["baseModel"], port.base_identities)
    reached, refusals, released, listed = await observe_reach(port, adep, rollout_view, sources, settings)
    pods = clusterwide.union_pods(adep, [n.name for n in reached if n.name not in refusals], listed,
                                  [a["name"] for a in adep["spec"]["adapters"]])
    current = await port.desired_state(adep)
    now = now_rfc3339()
    found_secrets = await port.secrets_found(adep)
    plan = adp.decide(adp.Observed(adep=rollout_view, now=now, sources=sources, pods=pods, desired=current,
                                   secrets=found_secrets, served_base=served_base), settings)
    reach = clusterwide.reach(adep, reached, refusals, listed, released, plan.status["adapters"],
                              plan.status["summary"])
    plan.status = clusterwide.with_reach(plan.status, adep, reach)
    plan.events += [adp.Event(*event) for event in reach.events]
    drift_events = []
    for adapter in adep["spec"]["adapters"]:
        if drift_allowed(adep, adapter, settings):
            rec = next(r for r in plan.status["adapters"] if r["name"] == adapter["name"])
            rec["drift"], events = await drift_pass(port, port.analyzer, store, adep, adapter, rec, now)
            drift_events += events
    served = {**adep, "status": plan.status}
    max_rank = adp.runtime_max_rank(adep["spec"], adp.served_ranks(served, sources))
    desired = plan.desired or current or serving.DesiredState(generation=1)
    await port.apply_serving(adep, plan.desired, desired, max_rank)
    for namespace, state, create in clusterwide.writes(adep, desired, reached, refusals, released, reach):
        await (port.release(adep, namespace) if state is None else
               port.apply_remote(adep, namespace, state, create=create))
    await port.write_status(adep, plan.status)
    events = list(plan.events) + drift_events
    await port.post_events(adep, events)
    return PassResult(plan.status, events, drift_events, plan.requeue_after)

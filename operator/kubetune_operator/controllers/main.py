"""Running the operator: logging, login, health probe, metrics, namespace scope, kopf."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

import kopf
from prometheus_client import start_http_server

from kubetune.api import storage_location
from kubetune.clients import credentials, storage
from kubetune.logs import configure_logging
from kubetune_operator.reconcile import adapterdeployment as adp
from kubetune_operator.reconcile import finetunejob as ftj
from kubetune_operator.reconcile import schedule, tenancy
from kubetune_operator.render import serving as serving_render
from kubetune_operator.render import training as render

from . import adapterdeployment, finetunejob, login, periodic, sharding


def configure(settings: kopf.OperatorSettings, *, standalone: bool = True) -> None:
    settings.peering.standalone = standalone
    settings.posting.level = logging.WARNING  # our own Events tell the story; kopf's only on problems
    settings.persistence.finalizer = sharding.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubetune.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kubetune.io")
    settings.watching.server_timeout = 300
    # The resync/progress timers put kopf's finalizer on every object; on deletion kopf stops them and
    # re-checks only every `cancellation_polling` seconds (default 60), so `kubectl delete ftj` took a
    # minute or more. Timers stop at once (they only sleep between passes): wait for that in-cycle.
    settings.background.instant_exit_timeout = 1.0
    settings.background.cancellation_polling = 2
    settings.networking.request_timeout = 60
    # At most this many objects are processed at once (a burst of creations queues instead of running
    # thousands of passes side by side: their transient memory stayed as the process's RSS high-water),
    # and an idle object's worker exits after a second to free its slot (kopf's default: 5 s).
    settings.batching.worker_limit = 64
    settings.batching.idle_timeout = 1.0


def register_all(registry: kopf.OperatorRegistry | None = None) -> None:
    finetunejob.register(registry)
    adapterdeployment.register(registry)

    kw = {"registry": registry} if registry is not None else {}

    @kopf.on.startup(**kw)
    async def startup(settings: kopf.OperatorSettings, **_):
        configure(settings)
        periodic.start()

    @kopf.on.cleanup(**kw)
    async def cleanup(**_):
        await periodic.stop()
        if finetunejob.RUNTIME.client is not None:
            await finetunejob.RUNTIME.client.close()
        if adapterdeployment.RUNTIME.client is not None and \
                adapterdeployment.RUNTIME.client is not finetunejob.RUNTIME.client:
            await adapterdeployment.RUNTIME.client.close()

    @kopf.on.probe(id="finetunejobs-tracked", **kw)
    def probe(**_):
        return len(finetunejob.RUNTIME.locks)  # FineTuneJobs reconciled since start, and not deleted


# Wire-level loggers of the S3 client: at DEBUG they print every request's headers, whose Authorization
# carries the access key id of the credentials in use (a tenant's Secret). Kept at INFO even with --verbose.
def _allowed_storage(items: list[str]) -> dict[str, tuple[str, ...]]:
    """`--allowed-storage NAMESPACE=PREFIX` (repeatable; `*=PREFIX` for every namespace; `--allowed-source`
    is its former name): one limit for every storage URI of a namespace's FineTuneJobs and
    AdapterDeployments (reconcile.tenancy)."""
    try:
        return tenancy.parse(items)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def apply_settings(args: argparse.Namespace, storage_setting: storage_location.StorageLocation) -> None:
    """The flags (and the chart's environment) into both controllers' runtimes; `storage_setting` (where
    a spec names no endpoint or region) reaches the operator's own store and every renderer."""
    allowed_storage = _allowed_storage(args.allowed_storage or [])
    finetunejob.RUNTIME.settings = ftj.Settings(
        render=render.RenderSettings(trainer_image=args.trainer_image, storage=storage_setting),
        publish_timeout_seconds=args.publish_timeout,
        allowed_storage=allowed_storage,
    )
    finetunejob.RUNTIME.default_s3 = storage.S3Settings(
        endpoint=storage_setting.endpoint,
        region=storage_setting.region,
        access_key=os.environ.get("AWS_ACCESS_KEY_ID") or None,
        secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY") or None,
    )
    adapterdeployment.RUNTIME.default_s3 = finetunejob.RUNTIME.default_s3
    adapterdeployment.RUNTIME.settings = adp.Settings(allowed_sources=allowed_storage)
    adapterdeployment.RUNTIME.render = serving_render.ServingSettings(
        agent_image=args.agent_image, storage=storage_setting).with_engine_image("vllm", args.vllm_image)
    adapterdeployment.RUNTIME.analyzer.max_retrains = args.max_concurrent_retrains
    adapterdeployment.RUNTIME.analyzer.drift_seconds = args.drift_seconds
    adapterdeployment.RUNTIME.watch_namespaces = tuple(args.namespace or ())
    if args.status_min_interval < 0:
        raise SystemExit("--status-min-interval: seconds >= 0 (0 writes every status change at once)")
    finetunejob.RUNTIME.status_min_interval_seconds = args.status_min_interval
    finetunejob.RUNTIME.budgets = schedule.Budgets().scaled(args.poll_budget / schedule.Budgets().total)
    adapterdeployment.RUNTIME.status_min_interval_seconds = args.status_min_interval
    if args.embedding_url:
        from kubetune_operator.clients.embeddings import EmbeddingClient

        adapterdeployment.RUNTIME.analyzer.embedder = EmbeddingClient(args.embedding_url, args.embedding_model)


def run(args: argparse.Namespace, storage_setting: storage_location.StorageLocation) -> int:
    configure_logging(args.verbose)
    apply_settings(args, storage_setting)
    # A plain registry: kopf's default one probes for the Kubernetes client libraries to add fallback
    # logins, importing kubernetes_asyncio (~40 MiB) although kubetune's own login handles every case.
    registry = kopf.OperatorRegistry()
    register_all(registry)
    if args.shards > 1:
        sharding.register_finalizer_keepers(registry)

    # kopf's login and the reconcilers' client: credentials that follow rotation
    provider = login.register(registry)

    start_http_server(args.metrics_port)
    if not args.namespace and not args.all_namespaces:
        raise SystemExit("choose the scope: --all-namespaces, or --namespace NS (repeatable)")
    asyncio.run(_operate(args, provider, registry))
    return 0


async def _operate(args: argparse.Namespace, provider: credentials.CredentialsProvider,
                   registry: kopf.OperatorRegistry) -> None:
    async with sharding.holding(args, provider):  # --shards > 1: this replica's share (docs/sharding.md)
        await kopf.operator(
            registry=registry,
            clusterwide=args.all_namespaces,
            namespaces=tuple(args.namespace or ()),  # kopf iterates it: None crashed --all-namespaces at start-up
            liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz",
            standalone=True,
        )

"""`python -m kubetune_agent`: the serving agent (see README.md in this directory).

Every flag falls back to an environment variable, `--foo-bar` -> `KUBETUNE_FOO_BAR`; the namespace and
the pod name also to the downward API's `POD_NAMESPACE` and `POD_NAME`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from kubetune import runtimes
from kubetune.api import jobconfig, serving
from kubetune.clients.storage import ObjectStore, S3Settings
from kubetune.logs import configure_logging
from kubetune_agent import kube, sync
from kubetune_agent.proxy import serve

log = logging.getLogger("kubetune_agent")


def _env(name: str, *fallbacks: str, default: str | None = None) -> str | None:
    for key in (f"KUBETUNE_{name}", *fallbacks):
        value = os.environ.get(key)
        if value:
            return value
    return default


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kubetune_agent", description=__doc__.splitlines()[0])
    parser.add_argument("--engine-url", default=_env("ENGINE_URL", default="http://127.0.0.1:8000"),
                        help="the engine's OpenAI-compatible server (KUBETUNE_ENGINE_URL)")
    parser.add_argument("--runtime", choices=sorted(runtimes.RUNTIMES),
                        default=_env("RUNTIME", default=runtimes.DEFAULT_ENGINE),
                        help="the engine's serving runtime, whose control API the agent speaks (KUBETUNE_RUNTIME)")
    parser.add_argument("--host", default=_env("HOST", default="0.0.0.0"), help="listen address (KUBETUNE_HOST)")
    parser.add_argument("--port", type=int, default=int(_env("PORT", default="8080")),
                        help="the port clients use (KUBETUNE_PORT)")
    parser.add_argument("--namespace", default=_env("NAMESPACE", "POD_NAMESPACE"),
                        help="the tenant: aliases are qualified with it, others' names are 404 "
                             "(KUBETUNE_NAMESPACE, POD_NAMESPACE)")
    parser.add_argument("--pod-name", default=_env("POD_NAME", "POD_NAME", default=socket.gethostname()),
                        help="this Pod (report annotation, sample paths) (KUBETUNE_POD_NAME, POD_NAME, hostname)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--desired-file", default=_env("DESIRED_FILE"),
                        help="read the desired state from this file (local mode) (KUBETUNE_DESIRED_FILE)")
    source.add_argument("--desired-configmap", default=_env("DESIRED_CONFIGMAP"),
                        help=f"read key {serving.DESIRED_KEY} of this ConfigMap in --namespace through the "
                             "Kubernetes API (KUBETUNE_DESIRED_CONFIGMAP)")
    parser.add_argument("--report-file", default=_env("REPORT_FILE"),
                        help="write the report to this file instead of the Pod's annotation "
                             f"{serving.ANNOTATION_REPORT} (KUBETUNE_REPORT_FILE)")
    parser.add_argument("--cache-dir", default=_env("CACHE_DIR", default="/var/cache/kubetune/adapters"),
                        help="verified adapter copies; the engine must see them at the same path "
                             "(a shared volume) (KUBETUNE_CACHE_DIR)")
    parser.add_argument("--sync-seconds", type=float, default=float(_env("SYNC_SECONDS", default="2")),
                        help="sync period: the engine is checked, and the desired state read unless it is "
                             "watched (KUBETUNE_SYNC_SECONDS)")
    parser.add_argument("--resync-seconds", type=float, default=float(_env("RESYNC_SECONDS", default="300")),
                        help="while the desired ConfigMap is watched, read it anyway this often "
                             "(KUBETUNE_RESYNC_SECONDS)")
    parser.add_argument("--service-account-dir", type=Path,
                        default=Path(_env("SERVICE_ACCOUNT_DIR", default=str(kube.SERVICE_ACCOUNT_DIR))),
                        help="the token and ca.crt of the Pod's service account (a projected volume mounted "
                             "elsewhere) (KUBETUNE_SERVICE_ACCOUNT_DIR)")
    parser.add_argument("--report-seconds", type=float, default=float(_env("REPORT_SECONDS", default="5")),
                        help="report period; a change is reported at once (KUBETUNE_REPORT_SECONDS)")
    parser.add_argument("--request-timeout", type=float, default=float(_env("REQUEST_TIMEOUT", default="600")),
                        help="longest engine request (KUBETUNE_REQUEST_TIMEOUT)")
    parser.add_argument("--max-backoff", type=float, default=float(_env("MAX_BACKOFF", default="300")),
                        help="longest wait before retrying a version that failed (KUBETUNE_MAX_BACKOFF)")
    parser.add_argument("--sample-flush-records", type=int, default=int(_env("SAMPLE_FLUSH_RECORDS", default="100")),
                        help="write sampled records every N records... (KUBETUNE_SAMPLE_FLUSH_RECORDS)")
    parser.add_argument("--sample-flush-seconds", type=float,
                        default=float(_env("SAMPLE_FLUSH_SECONDS", default="30")),
                        help="...or every N seconds (KUBETUNE_SAMPLE_FLUSH_SECONDS)")
    parser.add_argument("--s3-endpoint", default=_env("S3_ENDPOINT", "AWS_ENDPOINT_URL"),
                        help="S3-compatible endpoint for s3:// manifests and samples (KUBETUNE_S3_ENDPOINT, "
                             "AWS_ENDPOINT_URL: what the operator renders); credentials: AWS_ACCESS_KEY_ID / "
                             "AWS_SECRET_ACCESS_KEY or boto3's default chain")
    parser.add_argument("--s3-region", default=_env("S3_REGION", "AWS_REGION", "AWS_DEFAULT_REGION"),
                        help="(KUBETUNE_S3_REGION, AWS_REGION, AWS_DEFAULT_REGION)")
    parser.add_argument("--verbose", action="store_true", default=bool(_env("VERBOSE")))
    args = parser.parse_args(argv)
    if not args.namespace:
        parser.error("--namespace is required (or KUBETUNE_NAMESPACE / POD_NAMESPACE)")
    if not (args.desired_file or args.desired_configmap):
        parser.error("one of --desired-file and --desired-configmap is required")
    if min(args.sync_seconds, args.report_seconds, args.resync_seconds) <= 0:
        parser.error("--sync-seconds, --resync-seconds and --report-seconds must be positive")
    return args


def build(args: argparse.Namespace) -> sync.Agent:
    kubernetes = None
    if args.desired_configmap or not args.report_file:
        kubernetes = kube.InClusterKube(root=args.service_account_dir)
    source = (kube.DesiredFile(Path(args.desired_file)) if args.desired_file
              else kube.DesiredConfigMap(kubernetes, args.namespace, args.desired_configmap))
    sink = (kube.ReportFile(Path(args.report_file)) if args.report_file
            else kube.PodAnnotation(kubernetes, args.namespace, args.pod_name))
    store = ObjectStore(S3Settings(endpoint=args.s3_endpoint, region=args.s3_region,
                                   access_key=os.environ.get(jobconfig.ENV_S3_ACCESS_KEY) or None,
                                   secret_key=os.environ.get(jobconfig.ENV_S3_SECRET_KEY) or None))
    config = sync.AgentConfig(
        engine_url=args.engine_url, namespace=args.namespace, pod=args.pod_name, cache_dir=Path(args.cache_dir),
        sync_seconds=args.sync_seconds, resync_seconds=args.resync_seconds, report_seconds=args.report_seconds,
        request_timeout=args.request_timeout,
        max_backoff=args.max_backoff, sample_flush_records=args.sample_flush_records,
        sample_flush_seconds=args.sample_flush_seconds, runtime=args.runtime)
    return sync.Agent(config, source, sink, store)


async def run(args: argparse.Namespace) -> None:
    agent = build(args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    async with serve(agent, args.host, args.port):
        await stop.wait()
        log.info("stopping")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.verbose)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    try:
        asyncio.run(run(args))
    except kube.NotInCluster as exc:  # neither --desired-file nor --report-file, outside a cluster
        log.error(str(exc))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

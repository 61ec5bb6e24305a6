"""The agent's sync loop and its I/O: desired state in, adapters into the engine, report out.

Every tick: read the desired state (ConfigMap or file), ask the engine what it has loaded
(`/v1/models`), unload what is not desired, and for every desired version not loaded: take its
verified copy from the cache, or download it and verify every file against the manifest (and the
manifest against the desired digest) before the engine ever sees it; then load it. The engine's own
answer is the truth each tick, so an engine that restarted (and lost its adapters) gets them back
within a tick of being healthy again. Nothing here raises out of the loop: failures are logged,
counted, reported per version and retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary

from kubetune.agent import plan
from kubetune.api import serving
from kubetune.clients import kube
from kubetune.clients.storage import ObjectStore

log = logging.getLogger(__name__)

PODS = kube.Resource("", "v1", "pods")
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
_HEX_DIR = re.compile(r"^[a-f0-9]{64}$")
_CHUNK = 8 << 20
_S3_CLIENT_LOCK = threading.Lock()


def ensure_s3_client(store: ObjectStore, uri: str) -> None:
    """Create the store's boto3 client once, under a lock: `ObjectStore.s3` creates it lazily, and boto3's
    client creation is not thread-safe (the cache and the sampler reach the store from worker threads)."""
    if uri.startswith("s3://"):
        with _S3_CLIENT_LOCK:
            _ = store.s3


# --- Kubernetes (in cluster) -------------------------------------------------------------------


class NotInCluster(RuntimeError):
    pass


class InClusterKube:
    """A `KubeClient` with the Pod's service account. The projected token rotates (kubelet rewrites
    the file), so it is re-read on every use and the client rebuilt when it changed."""

    def __init__(self, root: Path = SERVICE_ACCOUNT_DIR, host: str | None = None, port: str | None = None):
        host = host or os.environ.get("KUBERNETES_SERVICE_HOST")
        port = port or os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise NotInCluster("KUBERNETES_SERVICE_HOST is not set: not in a cluster "
                               "(use --desired-file and --report-file)")
        if ":" in host:  # IPv6
            host = f"[{host}]"
        self.server = f"https://{host}:{port}"
        self.root = root
        try:
            self._ssl = ssl.create_default_context(cafile=str(root / "ca.crt"))
        except OSError as exc:
            raise NotInCluster(f"no service account CA at {root / 'ca.crt'}: {exc}") from exc
        self._token: str | None = None
        self._client: kube.KubeClient | None = None

    async def client(self) -> kube.KubeClient:
        token = (self.root / "token").read_text().strip()
        if self._client is None or token != self._token:
            if self._client is not None:
                await self._client.close()
            self._client = kube.KubeClient(self.server, token=token, ssl_context=self._ssl, timeout=15.0)
            self._token = token
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


class DesiredFile:
    def __init__(self, path: Path):
        self.path = Path(path)

    def __str__(self) -> str:
        return f"file {self.path}"

    async def read(self) -> str | None:
        try:
            return self.path.read_text()
        except FileNotFoundError:
            return None

    async def close(self) -> None:
        pass


class DesiredConfigMap:
    def __init__(self, kubernetes: InClusterKube, namespace: str, name: str):
        self.kubernetes, self.namespace, self.name = kubernetes, namespace, name

    def __str__(self) -> str:
        return f"ConfigMap {self.namespace}/{self.name}"

    async def read(self) -> str | None:
        config_map = await (await self.kubernetes.client()).get(kube.CONFIGMAPS, self.namespace, self.name)
        if config_map is None:
            return None
        return (config_map.get("data") or {}).get(serving.DESIRED_KEY)

    async def close(self) -> None:
        await self.kubernetes.close()


class ReportFile:
    def __init__(self, path: Path):
        self.path = Path(path)

    def __str__(self) -> str:
        return f"file {self.path}"

    async def write(self, text: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False, suffix=".tmp") as handle:
            handle.write(text)
        os.replace(handle.name, self.path)

    async def close(self) -> None:
        pass


class PodAnnotation:
    """The report in the agent's own Pod's annotation (JSON merge patch on metadata.annotations)."""

    def __init__(self, kubernetes: InClusterKube, namespace: str, pod: str):
        self.kubernetes, self.namespace, self.pod = kubernetes, namespace, pod

    def __str__(self) -> str:
        return f"Pod {self.namespace}/{self.pod} annotation {serving.ANNOTATION_REPORT}"

    async def write(self, text: str) -> None:
        patch = {"metadata": {"annotations": {serving.ANNOTATION_REPORT: text}}}
        await (await self.kubernetes.client()).patch(PODS, self.namespace, self.pod, patch)

    async def close(self) -> None:
        await self.kubernetes.close()


# --- the engine --------------------------------------------------------------------------------


class EngineUnavailable(Exception):
    """The engine did not answer (connection refused, timeout): nothing to blame a version for."""


class EngineError(Exception):
    """The engine answered with an error status; `message` is its own words."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


class EngineClient:
    """The control calls of vLLM's OpenAI-compatible server (runtime LoRA updating on)."""

    def __init__(self, url: str, session: aiohttp.ClientSession, timeout: float = 120.0):
        self.url = url.rstrip("/")
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    async def _call(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        try:
            async with self.session.request(method, self.url + path, json=body, timeout=self.timeout) as response:
                return response.status, await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise EngineUnavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc

    async def ready(self) -> bool:
        try:
            status, _ = await self._call("GET", serving.ENGINE_HEALTH)
        except EngineUnavailable:
            return False
        return status == 200

    async def adapters(self) -> set[str]:
        status, body = await self._call("GET", serving.ENGINE_MODELS)
        if status != 200:
            raise EngineError(status, _message(body))
        try:
            return plan.lora_names(json.loads(body))
        except ValueError as exc:
            raise EngineError(status, f"/v1/models is not JSON: {exc}") from exc

    async def load(self, name: str, path: Path) -> None:
        status, body = await self._call("POST", serving.ENGINE_LOAD, {"lora_name": name, "lora_path": str(path)})
        if status != 200 and "already been loaded" not in _message(body):
            raise EngineError(status, _message(body))

    async def unload(self, name: str) -> None:
        status, body = await self._call("POST", serving.ENGINE_UNLOAD, {"lora_name": name})
        if status == 404 or "cannot be found" in _message(body):  # gone already
            return
        if status != 200:
            raise EngineError(status, _message(body))


def _message(body: bytes) -> str:
    """The engine's error message (vLLM: {"object": "error", "message": ...}; FastAPI: {"detail": ...})."""
    text = body.decode(errors="replace")
    try:
        raw = json.loads(text)
    except ValueError:
        return text[: plan.MESSAGE_LIMIT]
    if isinstance(raw, dict):
        inner = raw.get("error") if isinstance(raw.get("error"), dict) else raw
        message = inner.get("message") or inner.get("detail")
        if message:
            return str(message)[: plan.MESSAGE_LIMIT]
    return text[: plan.MESSAGE_LIMIT]


# --- the adapter cache -------------------------------------------------------------------------


class Refused(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason, self.message = reason, message


class AdapterCache:
    """Verified adapter copies under `<root>/<digest hex>/` (what the engine is told to load), each with
    its manifest at `<root>/<digest hex>.manifest.json`. A copy is renamed into place only after every
    file matched the manifest, so a directory named by a digest always holds exactly those bytes.
    The root must be at the same path in the engine's container (a shared volume)."""

    def __init__(self, root: Path, store: ObjectStore):
        self.root = Path(root)
        self.store = store
        self.verified: set[str] = set()  # digests verified by this process
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".partial-*"):  # a download interrupted by a restart
            shutil.rmtree(stale, ignore_errors=True)

    def path(self, digest: str) -> Path:
        return self.root / digest.partition(":")[2]

    def fetch(self, version: serving.Version) -> Path:
        """The verified local copy of `version` (blocking: run it in a thread). Raises `Refused`."""
        target = self.path(version.digest)
        if version.digest in self.verified and target.is_dir():
            return target
        if self._reuse(version.digest):
            return target
        try:
            ensure_s3_client(self.store, version.manifest_uri)
            raw = self.store.read(version.manifest_uri)
        except Exception as exc:
            raise Refused(plan.DOWNLOAD_FAILED, f"reading {version.manifest_uri}: {type(exc).__name__}: {exc}") from exc
        if raw is None:
            raise Refused(plan.MANIFEST_MISSING, f"{version.manifest_uri} does not exist")
        try:
            document = json.loads(raw)
        except ValueError as exc:
            raise Refused(plan.MANIFEST_INVALID, f"{version.manifest_uri} is not JSON: {exc}") from exc
        problem = plan.check_manifest(document, version)
        if problem:
            raise Refused(*problem)
        prefix = plan.adapter_prefix_of(document, version.manifest_uri)
        partial = Path(tempfile.mkdtemp(prefix=f".partial-{target.name[:12]}-", dir=self.root))
        try:
            for entry in document["files"]:
                try:
                    self.store.download_file(prefix + entry["path"], partial / entry["path"])
                except FileNotFoundError as exc:
                    raise Refused(plan.DOWNLOAD_FAILED, f"{entry['path']} is missing from the store") from exc
                except Exception as exc:
                    raise Refused(plan.DOWNLOAD_FAILED, f"{entry['path']}: {type(exc).__name__}: {exc}") from exc
            problem = plan.check_files(document["files"], _local_files(partial, document["files"]))
            if problem:
                raise Refused(*problem)
            self._sidecar(version.digest).write_text(json.dumps(document, sort_keys=True))
            if target.exists():
                shutil.rmtree(target)
            os.replace(partial, target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        self.verified.add(version.digest)
        log.info("adapter downloaded and verified",
                 extra={"version": version.name, "digest": version.digest, "files": len(document["files"])})
        return target

    def _sidecar(self, digest: str) -> Path:
        return self.root / f"{digest.partition(':')[2]}.manifest.json"

    def _reuse(self, digest: str) -> bool:
        """A copy left by an earlier run of the agent: re-hash it against its manifest before trusting it."""
        target, sidecar = self.path(digest), self._sidecar(digest)
        if not (target.is_dir() and sidecar.is_file()):
            return False
        try:
            document = json.loads(sidecar.read_text())
            ok = (document.get("digest") == digest
                  and plan.check_files(document["files"], _local_files(target, document["files"])) is None)
        except (ValueError, KeyError, TypeError, OSError):
            ok = False
        if ok:
            self.verified.add(digest)
            return True
        shutil.rmtree(target, ignore_errors=True)
        sidecar.unlink(missing_ok=True)
        return False

    def evict(self, keep: set[str]) -> list[str]:
        """Delete the copies whose digests are not in `keep` (desired or still loaded)."""
        keep_hex = {digest.partition(":")[2] for digest in keep}
        removed = []
        for entry in self.root.iterdir():
            hexdigest = entry.name.removesuffix(".manifest.json")
            if _HEX_DIR.match(hexdigest) and hexdigest not in keep_hex:
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(hexdigest)
                else:
                    entry.unlink(missing_ok=True)
                self.verified.discard(f"sha256:{hexdigest}")
        return removed


def _local_files(root: Path, files: list[dict]) -> dict[str, tuple[int, str] | None]:
    out: dict[str, tuple[int, str] | None] = {}
    for entry in files:
        path = root / entry["path"]
        if not path.is_file():
            out[entry["path"]] = None
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        out[entry["path"]] = (path.stat().st_size, digest.hexdigest())
    return out


# --- measurements ------------------------------------------------------------------------------


class Telemetry:
    """Per-version cumulative counters (for the report) and their Prometheus twins (for /metrics), in a
    registry of this agent's own."""

    def __init__(self):
        self.registry = CollectorRegistry()
        labels = ["alias", "version"]
        self.requests = Counter("kubetune_agent_requests", "Requests routed to a version (any status).", labels,
                                registry=self.registry)
        self.errors = Counter("kubetune_agent_errors", "Routed requests that failed: engine status >= 500, "
                              "engine unreachable, or the version missing in the engine.", labels,
                              registry=self.registry)
        self.latency = Histogram("kubetune_agent_request_seconds", "Time from forwarding a request to the end of "
                                 "the engine's response.", labels, buckets=serving.LATENCY_BUCKETS,
                                 registry=self.registry)
        self.confidence = Summary("kubetune_agent_confidence", "Confidence of answers: /classify: the top class "
                                  "probability per input; completions with logprobs: mean exp(token logprob) per "
                                  "choice.", labels, registry=self.registry)
        self.rejected = Counter("kubetune_agent_rejected", "Requests not routed to any version (bad request, "
                                "unknown or foreign model, nothing loaded).", ["code"], registry=self.registry)
        self.loaded = Gauge("kubetune_agent_loaded", "1 when the version is loaded in the engine, 0 when desired "
                            "and not (yet) loaded.", ["version"], registry=self.registry)
        self.engine_ready = Gauge("kubetune_agent_engine_ready", "1 when the engine answers /health.",
                                  registry=self.registry)
        self.sync_errors = Counter("kubetune_agent_sync_errors", "Failures of the sync loop, the report and the "
                                   "sampler.", ["reason"], registry=self.registry)
        self.samples = Counter("kubetune_agent_samples", "Sampled request/response records.", ["outcome"],
                               registry=self.registry)
        self.versions: dict[str, serving.VersionMetrics] = {}

    def observe(self, alias: str, version: str, seconds: float, error: bool, confidences: list[float]) -> None:
        plan.record(self.versions.setdefault(version, serving.VersionMetrics()), seconds, error, confidences)
        self.requests.labels(alias, version).inc()
        if error:
            self.errors.labels(alias, version).inc()
        self.latency.labels(alias, version).observe(seconds)
        for value in confidences:
            self.confidence.labels(alias, version).observe(value)

    def set_loaded(self, desired: set[str], loaded: set[str]) -> None:
        self.loaded.clear()
        for name in desired | loaded:
            self.loaded.labels(name).set(1 if name in loaded else 0)


# --- the agent ---------------------------------------------------------------------------------


@dataclass
class AgentConfig:
    engine_url: str
    namespace: str
    pod: str
    cache_dir: Path
    sync_seconds: float = 2.0
    report_seconds: float = 5.0
    request_timeout: float = 600.0
    max_backoff: float = 300.0
    sample_flush_records: int = 100
    sample_flush_seconds: float = 30.0


class Agent:
    """The agent's state (read by the proxy) and its two loops: sync and report."""

    def __init__(self, config: AgentConfig, source, sink, store: ObjectStore):
        self.config = config
        self.source, self.sink, self.store = source, sink, store
        self.cache = AdapterCache(config.cache_dir, store)
        self.telemetry = Telemetry()
        self.desired: serving.DesiredState | None = None
        self._desired_text: str | None = None
        self.applied_generation = -1
        self.engine_ready = False
        self.engine_loaded: frozenset[str] = frozenset()  # replaced, never mutated: the proxy reads it
        self.digests: dict[str, str] = {}  # served name -> digest of what this agent loaded or desires
        self.errors: dict[str, dict] = {}
        self._failures: dict[str, tuple[int, float]] = {}  # name -> (consecutive failures, retry at)
        self.started = plan.rfc3339(dt.datetime.now(dt.UTC))
        self.wake = asyncio.Event()  # sync now (the proxy found a version missing in the engine)
        self.changed = asyncio.Event()  # report now
        self._fingerprint: tuple | None = None
        self._tasks: list[asyncio.Task] = []
        self.session: aiohttp.ClientSession | None = None
        self.engine: EngineClient | None = None

    # lifecycle

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000),
                                             timeout=aiohttp.ClientTimeout(total=self.config.request_timeout))
        self.engine = EngineClient(self.config.engine_url, self.session)
        self._tasks = [asyncio.create_task(self._sync_loop(), name="kubetune-agent-sync"),
                       asyncio.create_task(self._report_loop(), name="kubetune-agent-report")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.write_report()
        if self.session is not None:
            await self.session.close()
        await self.source.close()
        await self.sink.close()

    # sync

    async def _sync_loop(self) -> None:
        while True:
            self.wake.clear()  # a wake-up during the tick runs the next one at once
            try:
                await self.sync_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop serving: log it, count it, try again next tick
                log.exception("sync tick failed")
                self.telemetry.sync_errors.labels("Internal").inc()
            self._note_change()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self._next_tick())

    def _next_tick(self) -> float:
        """The sync period, or sooner when a failed version's backoff ends first."""
        now = time.monotonic()
        soonest = min((at for _, at in self._failures.values() if at > now), default=None)
        delay = self.config.sync_seconds
        if soonest is not None:
            delay = min(delay, max(0.05, soonest - now))
        return delay

    async def sync_once(self) -> None:
        await self._read_desired()
        assert self.engine is not None
        if not await self.engine.ready():
            self._engine_down("engine /health is failing")
            return
        try:
            loaded = set(await self.engine.adapters())
        except (EngineUnavailable, EngineError) as exc:
            self._engine_down(f"engine /v1/models: {exc}")
            return
        if not self.engine_ready:
            log.info("engine ready", extra={"loaded": sorted(loaded)})
            self._failures = {name: (attempts, 0.0) for name, (attempts, _) in self._failures.items()}
        self._set_engine(True, loaded)
        desired = self.desired
        steps = plan.plan_sync(desired, loaded, self.cache.verified,
                               {name: at for name, (_, at) in self._failures.items()}, time.monotonic())
        try:
            for name in steps.unload:
                try:
                    await self.engine.unload(name)
                except EngineError as exc:
                    log.warning("unload failed", extra={"version": name, "error": exc.message})
                    self.telemetry.sync_errors.labels("UnloadFailed").inc()
                    continue
                loaded.discard(name)
                self._set_engine(True, loaded)
                log.info("adapter unloaded", extra={"version": name})
            for version in [*steps.load, *steps.download]:
                if await self._bring_up(version):
                    loaded.add(version.name)
                    self._set_engine(True, loaded)
        except EngineUnavailable as exc:
            self._engine_down(str(exc))
            return
        if desired is not None:
            self._forget_undesired(desired)
            self.applied_generation = desired.generation
            await asyncio.to_thread(self.cache.evict, {v.digest for v in desired.versions().values()}
                                    | {self.digests[n] for n in loaded if n in self.digests})

    async def _bring_up(self, version: serving.Version) -> bool:
        """Fetch (or reuse) the verified copy and load it. Raises EngineUnavailable."""
        assert self.engine is not None
        try:
            path = await asyncio.to_thread(self.cache.fetch, version)
        except Refused as refusal:
            self._fail(version.name, refusal.reason, refusal.message)
            return False
        except Exception as exc:  # the cache directory itself (disk full, permissions)
            self._fail(version.name, plan.DOWNLOAD_FAILED, f"{type(exc).__name__}: {exc}")
            return False
        try:
            await self.engine.load(version.name, path)
        except EngineError as exc:
            self._fail(version.name, plan.LOAD_FAILED, exc.message)
            return False
        self.digests[version.name] = version.digest
        self._failures.pop(version.name, None)
        self.errors.pop(version.name, None)
        log.info("adapter loaded", extra={"version": version.name, "digest": version.digest, "path": str(path)})
        return True

    def _fail(self, name: str, reason: str, message: str) -> None:
        attempts = self._failures.get(name, (0, 0.0))[0] + 1
        delay = plan.retry_delay(attempts, self.config.sync_seconds, self.config.max_backoff)
        self._failures[name] = (attempts, time.monotonic() + delay)
        self.errors[name] = plan.error_entry(reason, message)
        self.telemetry.sync_errors.labels(reason).inc()
        log.warning("adapter not loaded", extra={"version": name, "reason": reason, "error": message[:500],
                                                  "attempts": attempts, "retry_in_seconds": round(delay, 2)})

    def _forget_undesired(self, desired: serving.DesiredState) -> None:
        versions = desired.versions()
        for name in list(self.errors):
            if name not in versions:
                self.errors.pop(name)
                self._failures.pop(name, None)
        for name, version in versions.items():
            self.digests[name] = version.digest

    def _engine_down(self, why: str) -> None:
        if self.engine_ready:
            log.warning("engine not ready", extra={"error": why})
        self.telemetry.sync_errors.labels("EngineUnavailable").inc()
        self._set_engine(False, set())

    def _set_engine(self, ready: bool, loaded: set[str]) -> None:
        self.engine_ready = ready
        self.engine_loaded = frozenset(loaded)
        self.telemetry.engine_ready.set(1 if ready else 0)
        desired = set(self.desired.versions()) if self.desired else set()
        self.telemetry.set_loaded(desired, set(loaded))

    def version_missing(self, name: str) -> None:
        """The engine said it does not have `name` (it restarted): stop routing to it and sync now."""
        if name in self.engine_loaded:
            log.warning("engine lost a loaded adapter", extra={"version": name})
            self.engine_loaded = self.engine_loaded - {name}
            self.wake.set()

    async def _read_desired(self) -> None:
        try:
            text = await self.source.read()
        except Exception as exc:
            log.warning("cannot read the desired state", extra={"source": str(self.source),
                                                                 "error": f"{type(exc).__name__}: {exc}"})
            self.telemetry.sync_errors.labels("DesiredUnavailable").inc()
            return
        if text is None:
            if self.desired is None:
                log.info("no desired state yet", extra={"source": str(self.source)})
            return  # keep the last one: a missing ConfigMap is not "unload everything"
        if text == self._desired_text:
            return
        try:
            desired = serving.DesiredState.from_json(text)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("invalid desired state", extra={"source": str(self.source), "error": str(exc)[:500]})
            self.telemetry.sync_errors.labels("DesiredInvalid").inc()
            return
        self.desired, self._desired_text = desired, text
        log.info("desired state", extra={"generation": desired.generation, "versions": sorted(desired.versions())})

    # report

    def report(self) -> serving.AgentReport:
        return plan.build_report(generation=self.applied_generation, engine_ready=self.engine_ready,
                                 engine_loaded=self.engine_loaded, digests=self.digests, errors=self.errors,
                                 metrics=self.telemetry.versions, started=self.started,
                                 now=plan.rfc3339(dt.datetime.now(dt.UTC)))

    def _note_change(self) -> None:
        fingerprint = plan.report_fingerprint(self.report())
        if fingerprint != self._fingerprint:
            self._fingerprint = fingerprint
            self.changed.set()

    async def write_report(self) -> bool:
        try:
            await self.sink.write(self.report().to_json())
            return True
        except Exception as exc:
            log.warning("cannot write the report", extra={"sink": str(self.sink),
                                                          "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            self.telemetry.sync_errors.labels("ReportFailed").inc()
            return False

    async def _report_loop(self) -> None:
        while True:
            self.changed.clear()
            await self.write_report()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), self.config.report_seconds)

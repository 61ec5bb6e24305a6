"""The agent's sync loop: desired state in, adapters into the engine, report out.

Every tick reads the desired state, asks the engine what it has loaded, unloads what is not desired
and loads each desired version from its verified cached copy. The engine's answer is the truth each
tick, so an engine that restarted gets its adapters back. Failures never leave the loop: they are
logged, counted, reported per version and retried with backoff (README.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from kubetune import runtimes
from kubetune.api import serving
from kubetune.clients.storage import ObjectStore
from kubetune_agent import plan
from kubetune_agent.cache import AdapterCache, Refused
from kubetune_agent.engine_client import EngineClient, EngineError, EngineUnavailable
from kubetune_agent.telemetry import Telemetry

log = logging.getLogger(__name__)


@dataclass
class AgentConfig:
    engine_url: str
    namespace: str
    pod: str
    cache_dir: Path
    sync_seconds: float = 2.0
    # with a watch open, the desired state is still read this often: a safety net for a watch that went
    # quiet without ending (a half-open connection through a proxy); far above the sync tick, since each
    # read is an API request per pod and the watch already delivers every change
    resync_seconds: float = 300.0
    report_seconds: float = 5.0
    request_timeout: float = 600.0
    max_backoff: float = 300.0
    sample_flush_records: int = 100
    sample_flush_seconds: float = 30.0
    runtime: str = runtimes.DEFAULT_ENGINE  # a key of runtimes.RUNTIMES: the engine's control API


class Agent:
    """The agent's state (read by the proxy) and its two loops: sync and report."""

    def __init__(self, config: AgentConfig, source, sink, store: ObjectStore):
        self.config = config
        self.source, self.sink, self.store = source, sink, store
        self.cache = AdapterCache(config.cache_dir, store)
        self.telemetry = Telemetry()
        self.desired: serving.DesiredState | None = None
        self._desired_text: str | None = None
        self._pushed: str | None = None  # a desired state the source's watch handed over, not yet applied
        self._next_read = 0.0  # monotonic time of the next safety-net read while the source watches
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
        self.engine = EngineClient(self.config.engine_url, self.session,
                                   runtimes.RUNTIMES[self.config.runtime].api)
        self._tasks = [asyncio.create_task(self._sync_loop(), name="kubetune-agent-sync"),
                       asyncio.create_task(self._report_loop(), name="kubetune-agent-report"),
                       asyncio.create_task(self._watch_loop(), name="kubetune-agent-watch")]

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

    async def _watch_loop(self) -> None:
        """The source's watch hands each new desired state to the sync loop, which runs at once."""
        while True:
            try:
                await self.source.watch(self.desired_changed)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in the watch must not stop the ticks: they still read
                log.exception("desired-state watch failed")
                self.telemetry.sync_errors.labels("Internal").inc()
                await asyncio.sleep(self.config.sync_seconds)

    def desired_changed(self, text: str) -> None:
        self._pushed = text
        self.wake.set()

    def _next_tick(self) -> float:
        """The sync period, or sooner when a failed version's backoff ends first."""
        now = time.monotonic()
        soonest = min((at for _, at in self._failures.values() if at > now), default=None)
        if self.source.watching:
            soonest = min(soonest or self._next_read, self._next_read)
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
        """The watch's latest text if it handed one over; else a read, on every tick while the source
        does not watch (a local file, a watch being re-established) and every resync_seconds while it does."""
        text, self._pushed = self._pushed, None
        if text is None:
            now = time.monotonic()
            # before a first desired state, read on every tick as well: a pod that starts before its
            # ConfigMap exists pays one GET per tick until it does, and then relies on the watch alone
            if self.source.watching and now < self._next_read and self.desired is not None:
                return
            self._next_read = now + self.config.resync_seconds
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

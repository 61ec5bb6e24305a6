"""The agent's HTTP front, the port clients use: `POST /v1/completions`, `/v1/chat/completions` and
`/classify` resolve the body's "model" (an alias or a version of this agent's namespace) to one loaded
version (`plan.route`) and forward it; the answer carries `x-kubetune-version`. Every routed request is
measured and sampled to storage in JSON Lines; also `GET /v1/models`, `/metrics`, `/healthz`, `/readyz`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import random
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kubetune.api import serving
from kubetune.clients.storage import ObjectStore
from kubetune_agent import answers, plan
from kubetune_agent.cache import ensure_s3_client
from kubetune_agent.sync import Agent

log = logging.getLogger(__name__)

VERSION_HEADER = "x-kubetune-version"
INFERENCE_PATHS = (serving.ENGINE_COMPLETIONS, serving.ENGINE_CHAT, serving.ENGINE_CLASSIFY)
MAX_BODY = 64 << 20
MAX_FAILURE_BODY = 64 << 10  # of a streamed request's error answer, kept for its sample record


def error_response(status: int, message: str, headers: dict | None = None) -> web.Response:
    """vLLM's error body since 0.10.1 (`{"error": {...}}`, as the CPU engine answers in vLLM fidelity), so
    clients see one kind of error whoever answered: the agent or the engine behind it."""
    kind = {400: "BadRequestError", 404: "NotFoundError", 502: "BadGateway", 503: "ServiceUnavailable",
            504: "GatewayTimeout"}.get(status, "Error")
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.json_response(body, status=status, headers=headers)


class Sampler:
    """Buffers sampled records and writes them as one JSON Lines object per `flush_records` records or
    `flush_seconds` (whichever first). Storage failures are logged and counted, never raised: the
    batch is dropped (memory stays bounded)."""

    MAX_IN_FLIGHT = 4

    def __init__(self, store: ObjectStore, namespace: str, pod: str, telemetry, flush_records: int = 100,
                 flush_seconds: float = 30.0):
        self.store, self.namespace, self.pod, self.telemetry = store, namespace, pod, telemetry
        self.flush_records, self.flush_seconds = max(1, flush_records), flush_seconds
        self._uri: str | None = None
        self._lines: list[str] = []
        self._since = 0.0
        self._sequence = 0
        self._writes: set[asyncio.Task] = set()
        self.written: list[str] = []  # object URIs (for logs and tests)

    def add(self, sampling_uri: str, record: dict) -> None:
        if sampling_uri != self._uri:
            self.flush()
            self._uri = sampling_uri
        if not self._lines:
            self._since = time.monotonic()
        self._lines.append(json.dumps(record, default=str, separators=(",", ":")))
        self.telemetry.samples.labels("buffered").inc()
        if len(self._lines) >= self.flush_records:
            self.flush()

    def due(self) -> bool:
        return bool(self._lines) and time.monotonic() - self._since >= self.flush_seconds

    def flush(self) -> None:
        """Hand the buffer to a background write."""
        if not self._lines or self._uri is None:
            return
        lines, self._lines = self._lines, []
        if len(self._writes) >= self.MAX_IN_FLIGHT:
            log.warning("sample writes are backed up, dropping a batch", extra={"records": len(lines)})
            self.telemetry.samples.labels("dropped").inc(len(lines))
            return
        self._sequence += 1
        uri = plan.sample_object_uri(self._uri, self.namespace, self.pod, dt.datetime.now(dt.UTC), self._sequence)
        task = asyncio.create_task(self._write(uri, lines))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, uri: str, lines: list[str]) -> None:
        try:
            await asyncio.to_thread(ensure_s3_client, self.store, uri)
            await asyncio.to_thread(self.store.write, uri, ("\n".join(lines) + "\n").encode())
        except Exception as exc:
            log.warning("cannot write samples", extra={"uri": uri, "records": len(lines),
                                                       "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            self.telemetry.samples.labels("dropped").inc(len(lines))
            self.telemetry.sync_errors.labels("SamplingWriteFailed").inc()
            return
        self.telemetry.samples.labels("written").inc(len(lines))
        self.written.append(uri)
        log.debug("samples written", extra={"uri": uri, "records": len(lines)})

    async def close(self) -> None:
        self.flush()
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)


class Proxy:
    def __init__(self, agent: Agent, rng: random.Random | None = None):
        self.agent = agent
        self.rng = rng or random.Random()
        config = agent.config
        self.sampler = Sampler(agent.store, config.namespace, config.pod, agent.telemetry,
                               config.sample_flush_records, config.sample_flush_seconds)
        self._flusher: asyncio.Task | None = None
        self.port: int | None = None  # the bound port (serve with port 0 picks a free one)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        for path in INFERENCE_PATHS:
            app.router.add_post(path, self.inference)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        return app

    async def start(self) -> None:
        self._flusher = asyncio.create_task(self._flush_loop(), name="kubetune-agent-samples")

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.sampler.close()

    async def _flush_loop(self) -> None:
        period = min(1.0, max(0.05, self.sampler.flush_seconds / 4))
        while True:
            await asyncio.sleep(period)
            if self.sampler.due():
                self.sampler.flush()

    # --- inference -------------------------------------------------------------------------------

    async def inference(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return self._reject(400, "the request body is not JSON")
        if not isinstance(body, dict):
            return self._reject(400, "the request body is not a JSON object")
        agent = self.agent
        decision = plan.route(body.get("model"), agent.config.namespace, agent.desired, agent.engine_loaded,
                              self.rng.random())
        if decision.status != 200:
            return self._reject(decision.status, decision.message)
        assert decision.alias is not None and decision.version is not None
        # decided before forwarding: a sampled generative request asks the engine for top logprobs
        sampling_uri = self._sampling_uri()
        forwarded, asked = {**body, "model": decision.version}, None
        if sampling_uri is not None:
            forwarded, asked = answers.with_top_logprobs(request.path, forwarded)
        if body.get("stream"):
            return await self._stream(request, body, forwarded, decision, sampling_uri, asked)
        url = agent.config.engine_url.rstrip("/") + request.path
        headers = {VERSION_HEADER: decision.version}
        started = time.monotonic()
        try:
            assert agent.session is not None
            async with agent.session.post(url, json=forwarded) as upstream:
                payload = await upstream.read()
                status = upstream.status
                content_type = upstream.headers.get("Content-Type", "application/json")
        except (aiohttp.ClientError, TimeoutError) as exc:
            seconds = time.monotonic() - started
            agent.telemetry.observe(decision.alias, decision.version, seconds, True, [])
            timeout = isinstance(exc, TimeoutError)
            log.warning("engine request failed", extra={"version": decision.version, "path": request.path,
                                                        "error": f"{type(exc).__name__}: {exc}"})
            return error_response(504 if timeout else 502, f"the engine did not answer: {type(exc).__name__}",
                                  headers)
        seconds = time.monotonic() - started
        parsed = _json(payload) if status == 200 else None
        scores = plan.scores(request.path, parsed)
        if status == 404 and _model_missing(payload, decision.version):
            # the engine does not have a version the agent believed loaded (it restarted): count it as the
            # version's failure, stop routing to it and sync at once
            agent.telemetry.observe(decision.alias, decision.version, seconds, True, [])
            agent.version_missing(decision.version)
            return error_response(503, f"version {decision.version} is not loaded in the engine (reloading)",
                                  headers)
        agent.telemetry.observe(decision.alias, decision.version, seconds, plan.is_error(status), scores)
        if sampling_uri is not None:
            self._sample(sampling_uri, request.path, body, decision, status,
                         parsed if parsed is not None else payload, seconds, scores)
        if asked is not None and isinstance(parsed, dict):  # engine errors go back as they came
            payload = json.dumps(answers.for_client(parsed, asked), separators=(",", ":")).encode()
        return web.Response(body=payload, status=status, headers={**headers, "Content-Type": content_type})

    async def _stream(self, request: web.Request, body: dict, forwarded: dict, decision: plan.Route,
                      sampling_uri: str | None, asked: answers.Asked | None) -> web.StreamResponse:
        """Server-sent events pass as they arrive (latency runs to the last one) and are assembled into
        one answer for the scores and the sample record. Untouched unless the agent added logprobs:
        then each complete event is rewritten for the client (`answers.StreamAnswer`)."""
        agent = self.agent
        assert agent.session is not None and decision.alias is not None and decision.version is not None
        url = agent.config.engine_url.rstrip("/") + request.path
        started = time.monotonic()
        response: web.StreamResponse | None = None
        error = client_gone = assemble = False
        status = 502
        relay = answers.StreamAnswer(request.path, asked)
        failure = bytearray()  # an error answer's body, for the sample record
        try:
            async with agent.session.post(url, json=forwarded) as upstream:
                status = upstream.status
                content_type = upstream.headers.get("Content-Type", "text/event-stream")
                events = status == 200 and content_type.startswith("text/event-stream")
                # parsed only when something is scored: a sample, or logprobs the client asked for
                assemble = events and (sampling_uri is not None or answers.carries_logprobs(request.path, body))
                response = web.StreamResponse(status=status, headers={VERSION_HEADER: decision.version,
                                                                      "Content-Type": content_type})
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    if assemble:
                        rewritten = relay.feed(chunk)
                        chunk = rewritten if asked is not None else chunk
                    elif not events and len(failure) < MAX_FAILURE_BODY:
                        failure += chunk
                    try:
                        if chunk:
                            await response.write(chunk)
                    except ConnectionResetError:  # the client went away: not the version's fault
                        client_gone = True
                        break
                if not client_gone:
                    if assemble and asked is not None:
                        await response.write(relay.rest())
                    await response.write_eof()
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = True
            log.warning("engine stream failed", extra={"version": decision.version,
                                                       "error": f"{type(exc).__name__}: {exc}"})
        seconds = time.monotonic() - started
        answer = relay.answer() if assemble else None
        if answer is not None and error:  # broken off: a partial answer is not scored
            answer.setdefault("error", {"message": "the engine's stream broke off"})
        scores = plan.scores(request.path, answer) if answer is not None and "error" not in answer else []
        agent.telemetry.observe(decision.alias, decision.version, seconds, error or plan.is_error(status), scores)
        if sampling_uri is not None and response is not None:
            self._sample(sampling_uri, request.path, body, decision, status,
                         answer if answer is not None else bytes(failure), seconds, scores)
        if response is None:
            return error_response(502, "the engine did not answer", {VERSION_HEADER: decision.version})
        return response

    def _reject(self, status: int, message: str) -> web.Response:
        self.agent.telemetry.rejected.labels(str(status)).inc()
        return error_response(status, message)

    def _sampling_uri(self) -> str | None:
        """Where this request's record goes when it is sampled (one draw per routed request), else None."""
        desired = self.agent.desired
        if desired is None or not plan.should_sample(desired.sampling_rate, desired.sampling_uri, self.rng.random()):
            return None
        return desired.sampling_uri

    def _sample(self, sampling_uri: str, path: str, body: dict, decision: plan.Route, status: int,
                response: object, seconds: float, scores: list[tuple[float, float]]) -> None:
        if isinstance(response, bytes):
            response = response.decode(errors="replace")
        record = {
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "alias": decision.alias,
            "version": decision.version,
            "path": path,
            "status": status,
            "latency": round(seconds, 6),
            "confidence": sum(c for c, _ in scores) / len(scores) if scores else None,
            "entropy": sum(e for _, e in scores) / len(scores) if scores else None,
            "request": body,
            "response": response,
        }
        try:
            self.sampler.add(sampling_uri, record)
        except Exception:  # sampling must never fail a request
            log.exception("sampling failed")

    # --- the rest --------------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        agent = self.agent
        created = int(dt.datetime.fromisoformat(agent.started.replace("Z", "+00:00")).timestamp())
        data = []
        for state in agent.desired.adapters if agent.desired else []:
            loaded = [v for v in state.versions if v.name in agent.engine_loaded]
            data.append({"id": state.alias, "object": "model", "created": created, "owned_by": "kubetune",
                         "ready": bool(loaded), "versions": [v.name for v in state.versions]})
            data.extend({"id": v.name, "object": "model", "created": created, "owned_by": "kubetune",
                         "parent": state.alias, "weight": v.weight, "role": v.role, "digest": v.digest}
                        for v in loaded)
        return web.json_response({"object": "list", "data": data})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.agent.telemetry.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def readyz(self, request: web.Request) -> web.Response:
        """Ready when the engine is and every desired alias has a loaded version (what a Service may
        route to)."""
        agent = self.agent
        problems = []
        if not agent.engine_ready:
            problems.append("engine not ready")
        if agent.desired is None:
            problems.append("no desired state read yet")
        else:
            problems.extend(f"{a.alias}: nothing loaded" for a in agent.desired.adapters
                            if not any(v.name in agent.engine_loaded for v in a.versions))
        return web.json_response({"ready": not problems, "problems": problems}, status=503 if problems else 200)


def _model_missing(payload: bytes, version: str) -> bool:
    """A 404 saying the model does not exist (vLLM: "The model `X` does not exist."), not a missing path.
    The message is nested in vLLM >= 0.10.1 (`{"error": {"message": ...}}`), flat in older vLLM."""
    body = _json(payload)
    error = body.get("error") if isinstance(body, dict) else None
    fields = error if isinstance(error, dict) else body if isinstance(body, dict) else {}
    message = fields.get("message") or fields.get("detail")
    text = message if isinstance(message, str) else payload.decode(errors="replace")
    return version in text or "does not exist" in text


def _json(payload: bytes) -> object:
    try:
        return json.loads(payload)
    except ValueError:
        return None


@contextlib.asynccontextmanager
async def serve(agent: Agent, host: str, port: int, rng: random.Random | None = None) -> AsyncIterator[Proxy]:
    """Run the agent's loops and its HTTP front until the block exits; then flush samples, write a
    last report and close."""
    proxy = Proxy(agent, rng)
    runner = web.AppRunner(proxy.app(), access_log=None)
    await runner.setup()
    await agent.start()
    await proxy.start()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        proxy.port = runner.addresses[0][1]
        log.info("agent serving", extra={"host": host, "port": proxy.port, "engine": agent.config.engine_url,
                                         "namespace": agent.config.namespace, "pod": agent.config.pod})
        yield proxy
    finally:
        await runner.cleanup()
        await proxy.close()
        await agent.stop()

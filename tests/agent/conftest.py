"""A fake inference engine with vLLM's shapes, adapters published with the real storage client, and an
in-process agent on real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from kubetune.api import serving, storage_layout
from kubetune.clients.storage import ObjectStore, publish_adapter
from kubetune_agent import kube, sync
from kubetune_agent.proxy import serve

NS = "team-a"
BASE = "base-model"


class FakeEngine:
    """vLLM's OpenAI-compatible server with runtime LoRA updating, minus the model: records loads and
    unloads, checks that a loaded adapter directory really holds its files, answers completions and
    classifications for loaded adapters only."""

    def __init__(self):
        self.loaded: dict[str, str] = {}  # name -> lora_path
        self.loads: list[str] = []
        self.unloads: list[str] = []
        self.healthy = True
        self.failing: set[str] = set()  # adapters whose inference answers 500
        self.refuse: dict[str, str] = {}  # adapters whose load answers 400 with this message
        self.requests: list[dict] = []
        self.delay = 0.0
        self.stream_gate: asyncio.Event | None = None  # a stream's second event waits for it
        self.url = ""
        self._runner: web.AppRunner | None = None

    def restart(self) -> None:
        """What an engine restart looks like from outside: every runtime-loaded adapter is gone."""
        self.loaded.clear()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/load_lora_adapter", self.load)
        app.router.add_post("/v1/unload_lora_adapter", self.unload)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.completions)
        app.router.add_post("/classify", self.classify)
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @staticmethod
    def error(status: int, message: str) -> web.Response:
        return web.json_response({"object": "error", "message": message, "type": "BadRequestError", "param": None,
                                  "code": status}, status=status)

    async def health(self, request):
        return web.Response(status=200 if self.healthy else 503)

    async def models(self, request):
        if not self.healthy:
            return self.error(503, "starting")
        data = [{"id": BASE, "object": "model", "root": BASE, "parent": None}]
        data += [{"id": name, "object": "model", "root": path, "parent": BASE} for name, path in self.loaded.items()]
        return web.json_response({"object": "list", "data": data})

    async def load(self, request):
        body = await request.json()
        name, path = body["lora_name"], Path(body["lora_path"])
        if name in self.loaded:
            return self.error(400, f"The lora adapter '{name}' has already been loaded.")
        if name in self.refuse:
            return self.error(400, self.refuse[name])
        config = path / "adapter_config.json"
        if not config.is_file() or not (path / "adapter_model.safetensors").is_file():
            return self.error(400, f"No adapter found for {path}")
        json.loads(config.read_text())  # the agent hands over a real adapter directory
        self.loaded[name] = str(path)
        self.loads.append(name)
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(self, request):
        name = (await request.json())["lora_name"]
        if name not in self.loaded:
            return self.error(404, f"The lora adapter '{name}' cannot be found.")
        del self.loaded[name]
        self.unloads.append(name)
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    def _check_model(self, body: dict) -> web.Response | None:
        self.requests.append(body)
        model = body.get("model")
        if model != BASE and model not in self.loaded:
            return self.error(404, f"The model `{model}` does not exist.")
        if model in self.failing:
            return self.error(500, "engine failure")
        return None

    async def completions(self, request):
        body = await request.json()
        if (problem := self._check_model(body)) is not None:
            return problem
        if self.delay:
            await asyncio.sleep(self.delay)
        if body.get("stream"):
            return await self.stream(request, body)
        choice = {"index": 0, "text": " ok", "finish_reason": "stop", "logprobs": None}
        if body.get("logprobs"):
            choice["logprobs"] = {"tokens": [" o", "k"], "token_logprobs": [math.log(0.5), math.log(0.9)],
                                  "top_logprobs": None, "text_offset": [0, 2]}
        return web.json_response({"id": "cmpl-1", "object": "text_completion", "model": body["model"],
                                  "choices": [choice], "usage": {"prompt_tokens": 1, "completion_tokens": 2}})

    async def stream(self, request, body: dict) -> web.StreamResponse:
        """vLLM's completion stream: one event per token (logprobs when asked: the chosen token and the
        first `logprobs` others), the usage, [DONE]. The second token waits for `stream_gate`."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for offset, (token, probability) in enumerate([(" o", 0.5), ("k", 0.9)]):
            if offset and self.stream_gate is not None:
                await self.stream_gate.wait()
            top = {token: math.log(probability), "x": math.log(0.05), "y": math.log(0.02)}
            logprobs = {"text_offset": [offset], "token_logprobs": [math.log(probability)], "tokens": [token],
                        "top_logprobs": [dict(list(top.items())[:(body.get("logprobs") or 0) + 1])]}
            choice = {"index": 0, "text": token, "finish_reason": "stop" if offset else None,
                      "logprobs": logprobs if body.get("logprobs") is not None else None}
            chunk = {"id": "cmpl-1", "object": "text_completion", "model": body["model"], "choices": [choice]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def classify(self, request):
        body = await request.json()
        if (problem := self._check_model(body)) is not None:
            return problem
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [{"index": i, "label": "a", "probs": [0.8, 0.2], "num_classes": 2} for i in range(len(inputs))]
        return web.json_response({"id": "classify-1", "object": "list", "model": body["model"], "data": data})


@pytest.fixture
async def engine():
    fake = FakeEngine()
    await fake.start()
    yield fake
    await fake.stop()


class CountingStore(ObjectStore):
    def __init__(self):
        super().__init__()
        self.downloads = 0
        self.fetched: list[str] = []

    def download_file(self, uri, path):
        self.downloads += 1
        self.fetched.append(uri)
        super().download_file(uri, path)


_published = 0


def publish(root: Path, adapter: str, content: bytes, weight: int = 100, role: str = "stable",
            namespace: str = NS, merged: bytes | None = None) -> serving.Version:
    """A small fake adapter published with the trainer's own code into a file:// store under `root`;
    `merged`: with a merged model beside it (output.mergeAdapter)."""
    global _published
    _published += 1
    adapter_dir = root / f"src-{_published}"
    adapter_dir.mkdir(parents=True)
    (adapter_dir / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "peft_type": "LORA"}))
    (adapter_dir / "adapter_model.safetensors").write_bytes(content)
    job_prefix = f"file://{root}/store/{namespace}/{adapter}/uid-{_published}/"
    merged_dir = None
    if merged is not None:
        merged_dir = root / f"merged-{_published}"
        merged_dir.mkdir(parents=True)
        (merged_dir / "model.safetensors").write_bytes(merged)
        (merged_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    document = publish_adapter(ObjectStore(), adapter_dir, job_prefix, {}, merged_dir=merged_dir)
    return serving.Version(name=serving.version_name(namespace, adapter, document["digest"]),
                           digest=document["digest"], manifest_uri=storage_layout.manifest_uri(job_prefix),
                           weight=weight, role=role)


def stored_file(version: serving.Version, path: str) -> Path:
    document = json.loads(Path(storage_layout.split_uri(version.manifest_uri)[2]).read_text())
    prefix = version.manifest_uri.rsplit("/", 1)[0] + "/" + document["adapterPath"]
    return Path(storage_layout.split_uri(prefix + path)[2])


def desired_state(generation: int, aliases: dict[str, list[serving.Version]], **kwargs) -> serving.DesiredState:
    return serving.DesiredState(generation=generation, adapters=[
        serving.AliasState(alias=alias, versions=versions) for alias, versions in aliases.items()], **kwargs)


def write_desired(path: Path, desired: serving.DesiredState) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(desired.to_json())
    tmp.replace(path)


def read_report(path: Path) -> serving.AgentReport | None:
    try:
        return serving.AgentReport.from_json(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


async def eventually(predicate, timeout: float = 5.0, message: str = "condition"):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        await asyncio.sleep(0.03)


class Harness:
    def __init__(self, tmp_path: Path, engine: FakeEngine):
        self.tmp_path = tmp_path
        self.engine = engine
        self.desired_path = tmp_path / "desired.json"
        self.report_path = tmp_path / "report.json"
        self.cache_dir = tmp_path / "cache"
        self.store = CountingStore()
        self.agent: sync.Agent | None = None
        self.proxy = None
        self.http: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy.port}"

    def report(self) -> serving.AgentReport | None:
        return read_report(self.report_path)

    def set_desired(self, desired: serving.DesiredState) -> None:
        write_desired(self.desired_path, desired)

    async def post(self, path: str, body: dict) -> tuple[int, dict, str | None]:
        async with self.http.post(self.url + path, json=body) as response:
            return response.status, await response.json(content_type=None), response.headers.get("x-kubetune-version")

    async def get_text(self, path: str) -> tuple[int, str]:
        async with self.http.get(self.url + path) as response:
            return response.status, await response.text()

    @contextlib.asynccontextmanager
    async def run(self, seed: int = 7, **overrides):
        config = sync.AgentConfig(engine_url=self.engine.url, namespace=NS, pod="serve-0", cache_dir=self.cache_dir,
                                  sync_seconds=0.1, report_seconds=0.2, max_backoff=1.0,
                                  sample_flush_records=10, sample_flush_seconds=0.3)
        for key, value in overrides.items():
            setattr(config, key, value)
        self.agent = sync.Agent(config, kube.DesiredFile(self.desired_path), kube.ReportFile(self.report_path),
                                self.store)
        async with serve(self.agent, "127.0.0.1", 0, rng=random.Random(seed)) as proxy:
            self.proxy = proxy
            async with aiohttp.ClientSession() as http:
                self.http = http
                yield self


@pytest.fixture
def harness(tmp_path, engine):
    return Harness(tmp_path, engine)

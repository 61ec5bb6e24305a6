"""`python -m kubetune_testing.lora_standin --port P`: a light stand-in of a serving engine for rollouts of
many pods (bench/adapter_rollout.py at N = 30): vLLM's runtime LoRA API (/health, /v1/models,
/v1/load_lora_adapter, /v1/unload_lora_adapter) refusing what vLLM refuses (kubetune_engine.vllm_api's
answers, imitated from vLLM's serving_models.py), and /classify and /v1/completions answering with the
adapter asked for, without a model. Start-up and loads cost the seconds it is given (measured from the
real engine), so that a restart of it is not free.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from aiohttp import web

from kubetune_engine import vllm_api

BASE = "minilm"


class StandIn:
    def __init__(self, start_seconds: float, first_load_seconds: float, load_seconds: float):
        self.started_at = time.monotonic()
        self.start_seconds = start_seconds
        self.load_costs = [first_load_seconds]  # the first load pays the engine's warm-up, the rest less
        self.load_seconds = load_seconds
        self.loaded: dict[str, str] = {}  # name -> path

    @property
    def ready(self) -> bool:
        return time.monotonic() - self.started_at >= self.start_seconds

    @staticmethod
    def refuse(error: vllm_api.EngineError) -> web.Response:
        return web.json_response(vllm_api.error_body(error.status, error.kind, error.message, error.param),
                                 status=error.status)

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.ready else 503)

    async def models(self, request: web.Request) -> web.Response:
        if not self.ready:
            return web.Response(status=503)
        data = [{"id": BASE, "object": "model", "root": BASE, "parent": None}]
        data += [{"id": name, "object": "model", "root": path, "parent": BASE} for name, path in self.loaded.items()]
        return web.json_response({"object": "list", "data": data})

    async def load(self, request: web.Request) -> web.Response:
        body = await request.json()
        name, path = body.get("lora_name"), body.get("lora_path")
        if not (isinstance(name, str) and name and isinstance(path, str) and path):
            return self.refuse(vllm_api.names_missing())
        if name in self.loaded:
            return self.refuse(vllm_api.already_loaded(name))
        config = Path(path) / "adapter_config.json"
        if not config.is_file():
            return self.refuse(vllm_api.no_adapter_found(name, path))
        try:
            json.loads(config.read_text())
        except ValueError as exc:
            return self.refuse(vllm_api.bad_request(f"Loading lora {name} failed: {exc}"))
        await asyncio.sleep(self.load_costs.pop() if self.load_costs else self.load_seconds)
        self.loaded[name] = path
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(self, request: web.Request) -> web.Response:
        name = (await request.json()).get("lora_name")
        if not isinstance(name, str) or not name:
            return self.refuse(vllm_api.unload_name_missing())
        if name not in self.loaded:
            return self.refuse(vllm_api.adapter_not_found(name))
        del self.loaded[name]
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    async def answer(self, request: web.Request) -> web.Response:
        body = await request.json()
        model = body.get("model")
        if model != BASE and model not in self.loaded:
            return self.refuse(vllm_api.model_not_found(model))
        if request.path == "/classify":
            return web.json_response({"id": "classify-1", "object": "list", "model": model, "data": [
                {"index": 0, "label": "balance", "probs": [0.9, 0.1], "num_classes": 2}]})
        return web.json_response({"id": "cmpl-1", "object": "text_completion", "model": model, "choices": [
            {"index": 0, "text": " ok", "finish_reason": "stop", "logprobs": None}]})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/load_lora_adapter", self.load)
        app.router.add_post("/v1/unload_lora_adapter", self.unload)
        app.router.add_post("/classify", self.answer)
        app.router.add_post("/v1/completions", self.answer)
        return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kubetune_testing.lora_standin",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--start-seconds", type=float, default=0.0, help="/health answers 503 this long")
    parser.add_argument("--first-load-seconds", type=float, default=0.0, help="what the first load takes")
    parser.add_argument("--load-seconds", type=float, default=0.0, help="what each later load takes")
    args = parser.parse_args(argv)
    standin = StandIn(args.start_seconds, args.first_load_seconds, args.load_seconds)
    web.run_app(standin.app(), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()

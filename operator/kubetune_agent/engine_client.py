"""The agent's client of the engine's control API (health, loaded adapters, load, unload), speaking the
dialect a serving runtime describes (`kubetune.runtimes.EngineApi`)."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

from kubetune.runtimes import EngineApi
from kubetune_agent import plan


class EngineUnavailable(Exception):
    """The engine did not answer (connection refused, timeout): nothing to blame a version for."""


class EngineError(Exception):
    """The engine answered with an error status; `message` is its own words."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


class EngineClient:
    """The control calls of one engine, in its runtime's dialect."""

    def __init__(self, url: str, session: aiohttp.ClientSession, api: EngineApi, timeout: float = 120.0):
        self.url = url.rstrip("/")
        self.api = api
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
            status, _ = await self._call("GET", self.api.health)
        except EngineUnavailable:
            return False
        return status == 200

    async def adapters(self) -> set[str]:
        status, body = await self._call("GET", self.api.models)
        if status != 200:
            raise EngineError(status, _message(body))
        try:
            return plan.lora_names(json.loads(body))
        except ValueError as exc:
            raise EngineError(status, f"{self.api.models} is not JSON: {exc}") from exc

    async def load(self, name: str, path: Path) -> None:
        status, body = await self._call("POST", self.api.load, {"lora_name": name, "lora_path": str(path)})
        if status != 200 and self.api.already_loaded not in _message(body):
            raise EngineError(status, _message(body))

    async def unload(self, name: str) -> None:
        status, body = await self._call("POST", self.api.unload, {"lora_name": name})
        if status == 404 or self.api.not_found in _message(body):  # gone already
            return
        if status != 200:
            raise EngineError(status, _message(body))


def _message(body: bytes) -> str:
    """The engine's error message, whichever shape carries it: vLLM >= 0.10.1 (the pinned v0.11.0 and
    the CPU engine) nests it, `{"error": {"message", "type", "param", "code"}}`; older vLLM sends it
    flat, `{"object": "error", "message", ...}`; FastAPI's own errors `{"detail": ...}`."""
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

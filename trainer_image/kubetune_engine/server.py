"""The HTTP shell of the CPU engine: its runtime's control API (`kubetune.runtimes.cpu`, vLLM's) and the
OpenAI-compatible inference paths (`kubetune.api.serving`), with vLLM's status codes and error bodies
(`vllm_api`). Handlers take one lock and run torch in a thread, so `/health` answers during a
generation; 503 until the base model is loaded. `--embedding-model DIR` adds `POST /v1/embeddings`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import struct
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from kubetune.api import serving
from kubetune.logs import configure_logging
from kubetune.runtimes import cpu

from . import model_source
from .embeddings import Embedded, SentenceEncoder
from .models import MAX_LOGPROBS, TASKS, Classification, Generation, ModelHost, quiet_libraries
from .vllm_api import (
    FIDELITIES,
    VLLM,
    EngineError,
    bad_request,
    cpu_loras_error,
    error_body,
    model_not_found,
    names_missing,
    not_found,
    unload_name_missing,
)

log = logging.getLogger("kubetune_engine")

EMBEDDINGS = "/v1/embeddings"  # OpenAI's (and vLLM's) path; served with --embedding-model
EMBEDDING_MODEL_NAME = "all-MiniLM-L6-v2"
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit of inputs per request
ENGINE_API = cpu.RUNTIME.api
# vLLM's FlexibleArgumentParser, on `vllm serve --model X` (it then takes X as the positional model)
MODEL_OPTION_DEPRECATED = ("With `vllm serve`, you should provide the model as a positional argument or in a "
                           "config file instead of via the `--model` option. The `--model` option will be "
                           "removed in v0.13.")


def error_response(error: EngineError) -> web.Response:
    return web.json_response(error_body(error.status, error.kind, error.message, error.param), status=error.status)


class ModelServer:
    """The aiohttp application around a `ModelHost`."""

    def __init__(self, host: ModelHost, *, root: str, encoder: SentenceEncoder | None = None):
        self.host = host
        self.root = root  # the model directory as given (vLLM's `root` of the base model)
        self.encoder = encoder  # --embedding-model: /v1/embeddings
        self.ready = False
        self.lock = asyncio.Lock()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=16 * 1024 * 1024)
        app.router.add_get(ENGINE_API.health, self.health)
        app.router.add_get(ENGINE_API.models, self.models)
        app.router.add_post(ENGINE_API.load, self.load)
        app.router.add_post(ENGINE_API.unload, self.unload)
        app.router.add_post(serving.ENGINE_COMPLETIONS, self.completions)
        app.router.add_post(serving.ENGINE_CHAT, self.chat)
        app.router.add_post(serving.ENGINE_CLASSIFY, self.classify)
        app.router.add_post(EMBEDDINGS, self.embeddings)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        if not self.ready and request.path != ENGINE_API.health:
            loading = error_body(503, "ServiceUnavailableError", "The engine is loading the base model.")
            return web.json_response(loading, status=503)
        try:
            return await handler(request)
        except EngineError as exc:
            return error_response(exc)
        except web.HTTPException as exc:
            if exc.status >= 400:  # unknown path or method: FastAPI's shape, as vLLM answers
                return web.json_response({"detail": exc.reason}, status=exc.status)
            raise
        except Exception as exc:
            log.exception("request failed", extra={"path": request.path})
            return web.json_response(error_body(500, "InternalServerError", f"{type(exc).__name__}: {exc}"),
                                     status=500)

    async def call(self, fn: Callable, *args):
        """Run `fn` in a worker thread, one at a time. A cancelled request (the client left, or shutdown)
        asks a generation to stop early and keeps the lock until the thread is done: a torch call cannot
        be interrupted, and the next one must not overlap it."""
        async with self.lock:
            self.host.cancelled.clear()
            future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
            try:
                return await asyncio.shield(future)
            except asyncio.CancelledError:
                self.host.cancelled.set()  # a generation stops at its next token
                await asyncio.wait({future})
                if not future.cancelled():
                    future.exception()  # retrieved: nobody is waiting for it any more
                raise

    # --- management ------------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.ready else 503)

    async def models(self, request: web.Request) -> web.Response:
        host = self.host
        data = [{"id": host.served_name, "object": "model", "created": host.created, "owned_by": "kubetune",
                 "root": self.root, "parent": None, "max_model_len": host.max_model_len}]
        data += [{"id": a.name, "object": "model", "created": a.created, "owned_by": "kubetune", "root": a.path,
                  "parent": host.served_name, "max_model_len": None} for a in host.listing()]
        if self.encoder is not None:  # another base model (parent null): agents count only adapters
            data.append({"id": self.encoder.name, "object": "model", "created": host.created, "owned_by": "kubetune",
                         "root": str(self.encoder.model_dir), "parent": None,
                         "max_model_len": self.encoder.max_seq_length})
        return web.json_response({"object": "list", "data": data})

    async def load(self, request: web.Request) -> web.Response:
        body = await _body(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not (isinstance(name, str) and name and isinstance(path, str) and path):
            raise names_missing()
        await self.call(self.host.load_adapter, name, path)
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(self, request: web.Request) -> web.Response:
        body = await _body(request)
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            raise unload_name_missing()
        await self.call(self.host.unload_adapter, name)
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    # --- inference -------------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await _body(request)
        prompts = _prompts(body.get("prompt"))
        options = _sampling(body, default_max_tokens=16)
        top_n = _optional_int(body, "logprobs", 0, MAX_LOGPROBS)
        if body.get("echo"):
            raise bad_request("echo is not supported by the CPU engine.")
        host = self.host

        def work() -> list[Generation]:
            instance, adapter = host.resolve(body.get("model"))
            results = []
            for prompt in prompts:
                ids = host.encode(prompt, special_tokens=True) if isinstance(prompt, str) else _checked_ids(
                    prompt, len(host.tokenizer))
                results.append(host.generate(instance, adapter, ids, top_n=top_n, **options))
            return results

        results = await self.call(work)
        model = body.get("model") or host.served_name
        created, request_id = int(time.time()), f"cmpl-{uuid.uuid4().hex}"
        choices = [{"index": i, "text": g.text, "logprobs": _completion_logprobs(g) if top_n is not None else None,
                    "finish_reason": g.finish_reason, "stop_reason": None} for i, g in enumerate(results)]
        usage = _usage(results)
        if body.get("stream"):
            events = []
            for i, g in enumerate(results):
                logprobs = _completion_logprobs(g) if top_n is not None else None
                for piece, start, end in _stream_steps(g):
                    events.append({"index": i, "text": piece, "finish_reason": None,
                                   "logprobs": {k: v[start:end] for k, v in logprobs.items()} if logprobs else None})
                events.append({"index": i, "text": "", "logprobs": None, "finish_reason": g.finish_reason})
            chunks = [{"id": request_id, "object": "text_completion", "created": created, "model": model,
                       "choices": [event]} for event in events]
            return await _sse(request, chunks, body, usage, request_id, "text_completion", created, model)
        return web.json_response({"id": request_id, "object": "text_completion", "created": created, "model": model,
                                  "choices": choices, "usage": usage})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await _body(request)
        messages = _messages(body.get("messages"))
        if "max_completion_tokens" in body and "max_tokens" not in body:
            body["max_tokens"] = body["max_completion_tokens"]
        options = _sampling(body, default_max_tokens=None)
        want_logprobs = body.get("logprobs") or False
        if not isinstance(want_logprobs, bool):
            raise bad_request("logprobs must be a boolean for chat completions.")
        top_n = _optional_int(body, "top_logprobs", 0, MAX_LOGPROBS) or 0
        if top_n and not want_logprobs:
            raise bad_request("top_logprobs needs logprobs: true.")
        host = self.host

        def work() -> Generation:
            instance, adapter = host.resolve(body.get("model"))
            ids = host.encode(host.render_chat(messages), special_tokens=False)
            if options["max_tokens"] is None:  # vLLM: the rest of the context; here at most 256
                options["max_tokens"] = max(1, min(256, host.max_model_len - len(ids)))
            return host.generate(instance, adapter, ids, top_n=top_n if want_logprobs else None, **options)

        g = await self.call(work)
        model = body.get("model") or host.served_name
        created, request_id = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        usage = _usage([g])
        if body.get("stream"):
            chunks = [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                       "finish_reason": None}]
            content = _chat_logprobs(g)["content"] if want_logprobs else None
            chunks += [{"index": 0, "delta": {"content": piece}, "finish_reason": None,
                        "logprobs": {"content": content[start:end]} if content is not None else None}
                       for piece, start, end in _stream_steps(g)]
            chunks.append({"index": 0, "delta": {}, "logprobs": None, "finish_reason": g.finish_reason})
            chunks = [{"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [c]} for c in chunks]
            return await _sse(request, chunks, body, usage, request_id, "chat.completion.chunk", created, model)
        choice = {"index": 0, "message": {"role": "assistant", "content": g.text},
                  "logprobs": _chat_logprobs(g) if want_logprobs else None, "finish_reason": g.finish_reason,
                  "stop_reason": None}
        return web.json_response({"id": request_id, "object": "chat.completion", "created": created, "model": model,
                                  "choices": [choice], "usage": usage})

    async def classify(self, request: web.Request) -> web.Response:
        body = await _body(request)
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise bad_request("input must be a string or a non-empty list of strings.")
        host = self.host

        def work():
            instance, adapter = host.resolve(body.get("model"))
            return host.classify(instance, adapter, texts)

        results = await self.call(work)
        return web.json_response(classification_body(results, body.get("model") or host.served_name))

    async def embeddings(self, request: web.Request) -> web.Response:
        encoder = self.encoder
        if encoder is None:
            raise not_found("This engine serves no embedding model: start it with --embedding-model DIR.")
        body = await _body(request)
        model = body.get("model")
        if model is not None and model != encoder.name:
            raise model_not_found(model)
        texts = _embedding_inputs(body.get("input"))
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise bad_request(f"encoding_format must be 'float' or 'base64', got {encoding!r}.")
        dimensions = body.get("dimensions")
        if dimensions is not None and dimensions != encoder.dimension:
            raise bad_request(f"dimensions: {encoder.name} embeds into {encoder.dimension} dimensions only, "
                              f"got {dimensions!r}.")
        embedded = await self.call(encoder.embed, texts)
        return web.json_response(embeddings_body(embedded, encoder.name, encoding))


def classification_body(results: list[Classification], model: str) -> dict:
    """`/classify`'s answer (vLLM's shape)."""
    tokens = sum(r.prompt_tokens for r in results)
    data = [{"index": i, "label": r.label, "probs": r.probs, "num_classes": len(r.probs)}
            for i, r in enumerate(results)]
    return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": model,
            "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                                    "prompt_tokens_details": None}}


def embeddings_body(embedded: Embedded, model: str, encoding: str = "float") -> dict:
    """`/v1/embeddings`' answer (OpenAI's and vLLM's shape); base64: little-endian float32 bytes."""
    def encode(vector: list[float]) -> list[float] | str:
        if encoding == "base64":
            return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        return vector

    data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(embedded.vectors)]
    return {"id": f"embd-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": model,
            "data": data, "usage": {"prompt_tokens": embedded.tokens, "total_tokens": embedded.tokens,
                                    "completion_tokens": 0, "prompt_tokens_details": None}}


# --- request fields ------------------------------------------------------------------------------------


async def _body(request: web.Request) -> dict:
    try:
        body = await request.json()
    except ValueError as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    return body


def _embedding_inputs(value: object) -> list[str]:
    """A string or a non-empty list of strings (token-id inputs are not accepted: text only)."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise bad_request("input must be a string or a non-empty list of strings (the CPU engine embeds text, "
                          "not token ids).")
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise bad_request(f"input holds {len(texts)} texts; at most {MAX_EMBEDDING_INPUTS} per request.")
    return texts


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional_int(body: dict, key: str, minimum: int, maximum: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
        bounds = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise bad_request(f"{key} must be an integer {bounds}, got {value!r}.")
    return value


def _sampling(body: dict, *, default_max_tokens: int | None) -> dict:
    """Greedy decoding only: temperature/top_p/seed are accepted (and do not change the result)."""
    if body.get("n") not in (None, 1) or body.get("best_of") not in (None, 1):
        raise bad_request("The CPU engine decodes greedily: n and best_of must be 1.")
    temperature = body.get("temperature")
    if temperature is not None and (not isinstance(temperature, (int, float)) or temperature < 0):
        raise bad_request(f"temperature must be a number >= 0, got {temperature!r}.")
    max_tokens = _optional_int(body, "max_tokens", 1)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)):
        raise bad_request("stop must be a string or a list of strings.")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad_request("ignore_eos must be a boolean.")
    return {"max_tokens": max_tokens if max_tokens is not None else default_max_tokens, "stop": stop or None,
            "ignore_eos": ignore_eos}


def _prompts(prompt: object) -> list[str | list[int]]:
    """A string, a list of strings, a list of token ids, or a list of lists of token ids (as vLLM)."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(_is_int(t) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt):
            return [list(p) for p in prompt]
    raise bad_request("prompt must be a string, a list of strings or a list of token ids.")


def _checked_ids(ids: list[int], vocab: int) -> list[int]:
    if any(t < 0 or t >= vocab for t in ids):
        raise bad_request(f"Token id out of vocabulary (size {vocab}).")
    return ids


def _messages(messages: object) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list.")
    result = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad_request("every message needs a role and a content.")
        content = message.get("content")
        if isinstance(content, list):  # OpenAI content parts: the text ones
            parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
                raise bad_request("the CPU engine accepts text content parts only.")
            content = "\n".join(parts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise bad_request("message content must be a string or a list of text parts.")
        result.append({"role": message["role"], "content": content})
    return result


# --- response pieces ------------------------------------------------------------------------------------


def _usage(results: list[Generation]) -> dict:
    prompt = sum(g.prompt_tokens for g in results)
    completion = sum(g.completion_tokens for g in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion_logprobs(g: Generation) -> dict:
    offsets, position = [], 0
    for piece in g.tokens:
        offsets.append(position)
        position += len(piece)
    top = [{**dict(row), token: value} for row, token, value in zip(g.top, g.tokens, g.logprobs, strict=False)]
    if not g.top:
        top = [{token: value} for token, value in zip(g.tokens, g.logprobs, strict=True)]
    return {"text_offset": offsets, "token_logprobs": g.logprobs, "tokens": g.tokens, "top_logprobs": top}


def _chat_logprobs(g: Generation) -> dict:
    content = []
    for i, (token, value) in enumerate(zip(g.tokens, g.logprobs, strict=True)):
        alternatives = g.top[i] if i < len(g.top) else []
        content.append({"token": token, "logprob": value, "bytes": list(token.encode()),
                        "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                                         for t, v in alternatives]})
    return {"content": content}


def _stream_steps(g: Generation) -> list[tuple[str, int, int]]:
    """The text in token-sized chunks, each with the tokens [start, end) it carries, whose logprobs go
    with it as vLLM streams them: a token without text goes with the next one (the last with the one
    before); one chunk when a stop string cut a token in two."""
    text_pieces = g.tokens[:-1] if g.ends_with_eos else g.tokens  # the end-of-sequence has no text
    if "".join(text_pieces) != g.text:
        return [(g.text, 0, len(g.tokens))] if g.text or g.tokens else []
    steps: list[tuple[str, int, int]] = []
    start = 0
    for end, piece in enumerate(text_pieces, 1):
        if piece:
            steps.append((piece, start, end))
            start = end
    if start < len(g.tokens):  # trailing tokens without text
        steps[-1:] = [(steps[-1][0], steps[-1][1], len(g.tokens))] if steps else [("", 0, len(g.tokens))]
    return steps


async def _sse(request: web.Request, chunks: list[dict], body: dict, usage: dict, request_id: str, kind: str,
               created: int, model: str) -> web.StreamResponse:
    """Server-sent events as vLLM streams them. The whole generation is done before the first event."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    for chunk in chunks:
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        final = {"id": request_id, "object": kind, "created": created, "model": model, "choices": [], "usage": usage}
        await response.write(f"data: {json.dumps(final)}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


# --- the process ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kubetune_engine",
                                     description="kubetune's CPU engine: vLLM's OpenAI-compatible API with runtime "
                                                 "LoRA loading, on transformers + peft.")
    parser.add_argument("model", nargs="?", help="the base model directory (config.json, weights, tokenizer), "
                                                 "positional as `vllm serve` takes it")
    parser.add_argument("--model", dest="model_option", default=None, metavar="MODEL",
                        help="deprecated (as in vLLM): give the model as the positional argument")
    parser.add_argument("--fidelity", choices=FIDELITIES, default=VLLM,
                        help="vllm: refuse what vLLM v0.11.0 refuses; kubetune (the kubetune-cpu runtime): also "
                             "serve classification adapters (modules_to_save, labels.json, /classify)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--task", choices=TASKS, default="auto",
                        help="auto: from the base's config (ForCausalLM -> causal-lm, else classification); "
                             "each adapter then serves its own kind (labels.json -> classification)")
    parser.add_argument("--max-loras", type=int, default=4,
                        help="vLLM's adapters per batch; met by construction (one request, one adapter at a time)")
    parser.add_argument("--max-cpu-loras", type=int, default=None,
                        help="adapters whose weights stay in memory, least recently used evicted and reloaded from "
                             "their lora_path on next use (default: --max-loras); loads are never refused for count")
    parser.add_argument("--max-lora-rank", type=int, default=64, help="adapters of a higher rank are refused")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="prompt + completion tokens (default: the model's max_position_embeddings)")
    parser.add_argument("--served-model-name", default=None, help="the base model's name in the API (default: --model)")
    parser.add_argument("--embedding-model", default=None, metavar="DIR",
                        help="also serve POST /v1/embeddings from this sentence-encoder directory (mean pooling, "
                             "L2-normalised: the all-MiniLM-L6-v2 recipe)")
    parser.add_argument("--embedding-model-name", default=EMBEDDING_MODEL_NAME,
                        help=f"the embedding model's name in the API (default: {EMBEDDING_MODEL_NAME})")
    parser.add_argument("--download-dir", default=None, metavar="DIR",
                        help="where an s3:// or hf:// model is fetched to before loading (a complete copy is reused)")
    parser.add_argument("--revision", default=None, help="revision of an hf:// model (default: main)")
    parser.add_argument("--verbose", action="store_true", help="debug logs and the access log")
    args = parser.parse_args(argv)
    if args.model_option is not None and args.model is not None:
        parser.error("the model is given twice: as the positional argument and with --model")
    args.model_option_used = args.model_option is not None
    args.model = args.model if args.model is not None else args.model_option
    if args.model is None:
        parser.error("the model (a positional argument) is required")
    if args.max_loras < 1 or args.max_lora_rank < 1 or (args.max_cpu_loras is not None and args.max_cpu_loras < 1):
        parser.error("--max-loras, --max-cpu-loras and --max-lora-rank must be at least 1")
    if error := cpu_loras_error(args.max_loras, args.max_cpu_loras):
        parser.error(error)
    return args


async def serve(args: argparse.Namespace) -> int:
    try:  # before listening: the startup probe waits, as it does for vLLM's own download
        model_dir = model_source.local_model_dir(args.model, args.download_dir, args.revision)
    except model_source.ModelSourceError as exc:
        log.error("the base model could not be fetched", extra={"model": args.model, "error": str(exc)})
        return 1
    host = ModelHost(model_dir, served_name=args.served_model_name or args.model, task=args.task,
                     max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras, max_lora_rank=args.max_lora_rank,
                     max_model_len=args.max_model_len, fidelity=args.fidelity)
    encoder = SentenceEncoder(Path(args.embedding_model), name=args.embedding_model_name) \
        if args.embedding_model else None
    engine = ModelServer(host, root=args.model, encoder=encoder)
    # handler_cancellation: a client that gives up cancels its request, which stops its generation
    runner = web.AppRunner(engine.app(), handle_signals=False, shutdown_timeout=10, handler_cancellation=True,
                           access_log=logging.getLogger("aiohttp.access") if args.verbose else None)
    await runner.setup()
    try:
        await web.TCPSite(runner, args.host, args.port).start()
    except OSError as exc:
        log.error("cannot listen", extra={"host": args.host, "port": args.port, "error": str(exc)})
        await runner.cleanup()
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    address = runner.addresses[0]
    url = f"http://{address[0]}:{address[1]}"
    log.info("kubetune engine starting: loading the base model", extra={"url": url, "model": args.model})

    # The base loads in a daemon thread: a SIGTERM during a long load exits without waiting for it.
    loaded: asyncio.Future = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if not loaded.done():
            loaded.set_exception(error) if error else loaded.set_result(None)

    def load() -> None:
        error = None
        try:
            host.load_base()
            if encoder is not None:
                encoder.load()
        except BaseException as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is gone: we were stopped during the load
            loop.call_soon_threadsafe(settle, error)

    threading.Thread(target=load, name="load-base", daemon=True).start()
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({loaded, stopping}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if loaded.done() and loaded.exception() is not None:
        error = loaded.exception()
        log.error("the base model could not be loaded" if host.tokenizer is None or encoder is None
                  else "the embedding model could not be loaded",
                  extra={"model": args.model, "embedding_model": args.embedding_model,
                         "error": f"{type(error).__name__}: {error}"})
        code = 1
    elif loaded.done():
        engine.ready = True
        log.info(f"kubetune engine ready on {url}", extra={
            "url": url, "model": host.served_name, "task": host.task, "fidelity": host.fidelity,
            "max_loras": host.max_loras, "max_cpu_loras": host.max_cpu_loras,
            "max_lora_rank": host.max_lora_rank, "max_model_len": host.max_model_len,
            "embedding_model": encoder.name if encoder else None})
        await stopping
    log.info("kubetune engine stopping")
    stopping.cancel()
    await runner.cleanup()
    log.info("kubetune engine stopped", extra={"exit_code": code})
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.verbose)
    if args.model_option_used:
        log.warning(MODEL_OPTION_DEPRECATED)
    logging.captureWarnings(True)  # library warnings as JSON log lines too
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local directories only: never reach for the hub
    quiet_libraries()
    return asyncio.run(serve(args))

"""vLLM's answers as the CPU engine imitates them (`kubetune_engine.vllm_api`), and the agent reading
both error shapes: nested since vLLM 0.10.1 (the pinned v0.11.0), flat before it."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from kubetune import runtimes
from kubetune_agent.engine_client import EngineClient, EngineError
from kubetune_agent.proxy import _model_missing
from kubetune_engine import vllm_api
from kubetune_operator.clients.embeddings import _detail
from kubetune_operator.local import processes
from kubetune_testing.factories import adapterdeployment, set_path

VLLM_API = runtimes.vllm.RUNTIME.api


def nested(status: int, kind: str, message: str) -> dict:
    return vllm_api.error_body(status, kind, message)


def flat(status: int, kind: str, message: str) -> dict:
    return {"object": "error", "message": message, "type": kind, "param": None, "code": status}


# --- vllm_api -----------------------------------------------------------------------------------------


def test_error_body_is_vllms_error_response():
    assert vllm_api.error_body(404, "NotFoundError", "gone", "model") == {
        "error": {"message": "gone", "type": "NotFoundError", "param": "model", "code": 404}}


def test_load_answers_use_vllms_words_and_status_codes():
    cases = [(vllm_api.names_missing(), 400, "InvalidUserInput", "Both 'lora_name' and 'lora_path' must be provided."),
             (vllm_api.already_loaded("a"), 400, "InvalidUserInput", "The lora adapter 'a' has already been loaded."),
             (vllm_api.adapter_not_found("a"), 404, "NotFoundError", "The lora adapter 'a' cannot be found."),
             (vllm_api.no_adapter_found("a", "/x"), 404, "NotFoundError",
              "Loading lora a failed: No adapter found for /x")]
    for error, status, kind, message in cases:
        assert (error.status, error.kind, error.message) == (status, kind, message)
    # the runtime's words for "no change", which the agent's engine client matches, are in them
    assert VLLM_API.already_loaded in vllm_api.already_loaded("a").message
    assert VLLM_API.not_found in vllm_api.adapter_not_found("a").message


CONFIG = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "bias": "none"}


@pytest.mark.parametrize("changes, fidelity, refusals", [
    ({}, "vllm", []),
    ({"modules_to_save": ["score"]}, "vllm", ["vLLM only supports modules_to_save being None."]),
    ({"modules_to_save": ["score"]}, "kubetune", []),
    ({"modules_to_save": ["score"], "use_dora": True}, "kubetune", ["vLLM does not yet support DoRA."]),
    ({"r": 32}, "kubetune", ["LoRA rank 32 is greater than max_lora_rank 16."]),
    ({"rank_pattern": {"q_proj": 64}}, "vllm", ["LoRA rank 64 is greater than max_lora_rank 16."]),
    ({"bias": "lora_only"}, "vllm", ["Adapter bias cannot be used without bias_enabled."]),
    ({"r": None, "target_modules": None}, "vllm", ["Missing required configuration fields: {'r', 'target_modules'}"]),
    ({"r": 0}, "vllm", ["The adapter's ranks (r, rank_pattern) must be positive integers."]),
    ({"modules_to_save": ["lm_head"], "use_dora": True, "r": 32, "bias": "all"}, "vllm",
     ["vLLM only supports modules_to_save being None.", "vLLM does not yet support DoRA.",
      "LoRA rank 32 is greater than max_lora_rank 16.", "Adapter bias cannot be used without bias_enabled."]),
])
def test_peft_helper_refusals(changes, fidelity, refusals):
    config = {key: value for key, value in {**CONFIG, **changes}.items() if value is not None}
    assert vllm_api.peft_refusals(config, max_lora_rank=16, fidelity=fidelity) == refusals


def test_the_cpu_cache_holds_a_batch_at_least():
    assert vllm_api.cpu_loras_error(2, None) is None and vllm_api.cpu_loras_error(2, 2) is None
    assert vllm_api.cpu_loras_error(2, 1) == "max_cpu_loras (1) must be >= max_loras (2)"


def test_engine_arguments_as_vllm_serve_takes_them():
    from kubetune_engine.server import parse_args

    args = parse_args(["/models/base", "--max-loras", "2"])
    assert (args.model, args.model_option_used, args.fidelity, args.max_cpu_loras) == ("/models/base", False,
                                                                                       "vllm", None)
    deprecated = parse_args(["--model", "/models/base", "--fidelity", "kubetune", "--max-cpu-loras", "8"])
    assert (deprecated.model, deprecated.model_option_used, deprecated.fidelity) == ("/models/base", True, "kubetune")
    with pytest.raises(SystemExit):
        parse_args([])


# --- the agent ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [nested, flat])
def test_the_engine_client_reads_both_error_shapes(shape):
    async def handler(request: web.Request) -> web.Response:
        body = await request.json()
        if request.path == VLLM_API.load and body["lora_name"] == "dup":
            return web.json_response(shape(400, "InvalidUserInput", "The lora adapter 'dup' has already been loaded."),
                                     status=400)
        if request.path == VLLM_API.load:
            return web.json_response(shape(404, "NotFoundError", "Loading lora x failed: No adapter found for /c/x"),
                                     status=404)
        gone = f"The lora adapter '{body['lora_name']}' cannot be found."
        return web.json_response(shape(404, "NotFoundError", gone), status=404)

    async def scenario() -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            async with aiohttp.ClientSession() as session:
                client = EngineClient(f"http://127.0.0.1:{port}", session, VLLM_API)
                await client.load("dup", Path("/c/dup"))  # already loaded: what was wanted
                await client.unload("gone")  # cannot be found: gone already
                with pytest.raises(EngineError) as refused:
                    await client.load("x", Path("/c/x"))
                assert (refused.value.status, refused.value.message) == (
                    404, "Loading lora x failed: No adapter found for /c/x")  # the words, not the JSON
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


@pytest.mark.parametrize("shape", [nested, flat])
def test_the_proxy_tells_a_missing_model_from_other_404s(shape):
    version = "team-a/bot@0123456789ab"
    missing = json.dumps(shape(404, "NotFoundError", f"The model `{version}` does not exist.")).encode()
    assert _model_missing(missing, version)
    assert _model_missing(json.dumps(shape(404, "NotFoundError", "The model `x` does not exist.")).encode(), version)
    assert not _model_missing(json.dumps({"detail": "Not Found"}).encode(), version)  # an unknown path
    assert not _model_missing(json.dumps(shape(404, "NotFoundError", "This engine serves no embedding model")).encode(),
                              version)


@pytest.mark.parametrize("shape", [nested, flat])
def test_the_operators_embedding_client_reads_both_error_shapes(shape):
    assert _detail(json.dumps(shape(404, "NotFoundError", "The model `x` does not exist.")).encode()) == \
        "The model `x` does not exist."
    assert _detail(b'{"detail": "Not Found"}') == "Not Found" and _detail(b"bad gateway") == "bad gateway"


# --- kubetune local -----------------------------------------------------------------------------------


@pytest.mark.parametrize("engine, fidelity", [(None, "vllm"), ("vllm", "vllm"), ("kubetune-cpu", "kubetune")])
def test_kubetune_local_starts_the_engine_as_its_runtime(engine, fidelity, tmp_path):
    adep = set_path(adapterdeployment(), "spec.baseModel.uri", f"file://{tmp_path}/base")
    adep = set_path(adep, "spec.runtime.managed.maxLoras", 2)
    if engine:
        adep = set_path(adep, "spec.runtime.engine", engine)
    child, _ = processes._engine(adep, tmp_path, {})
    assert child.command[:4] == [sys.executable, "-m", "kubetune_engine", f"{tmp_path}/base"]
    assert "--model" not in child.command
    assert child.command[child.command.index("--fidelity") + 1] == fidelity
    assert child.command[child.command.index("--max-loras") + 1] == "2"

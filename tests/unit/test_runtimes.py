"""The serving runtimes registry: the API's choices, what each runtime renders, the limits pre-flight
applies and the control API the agent's engine client speaks."""

from __future__ import annotations

import asyncio

import aiohttp
import kubernetes_validate
import pytest
from aiohttp import web

from kubetune import runtimes
from kubetune.api import serving
from kubetune.api import v1alpha1 as api
from kubetune.api.validation import validate
from kubetune_agent.engine_client import EngineClient, EngineError
from kubetune_operator.reconcile import adapterdeployment as adp
from kubetune_operator.render import serving as render
from kubetune_testing.factories import adapterdeployment

DIGEST = "sha256:" + "b" * 64


def defaulted(engine: str | None = None, **runtime) -> dict:
    doc = adapterdeployment()
    doc["spec"]["runtime"] = {**doc["spec"]["runtime"], **runtime}
    if engine:
        doc["spec"]["runtime"]["engine"] = engine
    result = validate(doc)
    assert result.ok, result.errors
    return {**doc, "metadata": {**doc["metadata"], "uid": "uid-1"}, "spec": result.defaulted["spec"]}


def test_the_api_offers_exactly_the_registered_runtimes_and_defaults_to_vllm():
    engine = api.ADAPTERDEPLOYMENT_SPEC["properties"]["runtime"]["properties"]["engine"]
    assert sorted(engine["enum"]) == sorted(runtimes.RUNTIMES)
    assert engine["default"] == runtimes.DEFAULT_ENGINE == "vllm"
    assert all(name == runtime.name for name, runtime in runtimes.RUNTIMES.items())
    # objects written before the field existed keep vLLM
    assert runtimes.runtime_of({"runtime": {"managed": {}}}) is runtimes.RUNTIMES["vllm"]
    assert defaulted()["spec"]["runtime"]["engine"] == "vllm"


@pytest.mark.parametrize("name", sorted(runtimes.RUNTIMES))
def test_each_runtime_renders_its_engine(name: str):
    runtime = runtimes.RUNTIMES[name]
    adep = defaulted(name)
    settings = render.ServingSettings().with_engine_image(name, f"example.com/{name}:1")
    children = render.render_children(adep, settings, serving.DesiredState(generation=1), 16)
    for child in children:
        kubernetes_validate.validate(child, "1.34", strict=True)
    kinds = [child["kind"] for child in children]
    deployment = children[kinds.index("Deployment")]
    engine = deployment["spec"]["template"]["spec"]["containers"][0]
    assert engine["name"] == "engine" and engine["image"] == f"example.com/{name}:1"
    assert engine["readinessProbe"]["httpGet"]["path"] == runtime.api.health
    assert engine["ports"] == [{"name": "engine", "containerPort": render.ENGINE_PORT}]


def test_the_cpu_engine_speaks_vllms_control_api_and_ships_in_the_trainer_image():
    cpu, vllm = runtimes.RUNTIMES["kubetune-cpu"], runtimes.RUNTIMES["vllm"]
    assert cpu.api == vllm.api and cpu.lora_ranks == vllm.lora_ranks
    assert "trainer" in cpu.default_image


@pytest.mark.parametrize("name", sorted(runtimes.RUNTIMES))
def test_preflight_derives_the_rank_from_the_selected_runtimes_limits(name: str):
    runtime = runtimes.RUNTIMES[name]
    adep = defaulted(name)
    for needed in (1, 12, runtime.lora_ranks[-1]):
        assert adp.runtime_max_rank(adep["spec"], [needed]) == runtime.smallest_rank_for(needed)
    too_big = runtime.lora_ranks[-1] + 1
    assert adp.runtime_max_rank(adep["spec"], [too_big]) is None
    source = adp.Source(manifest_uri="s3://adapters/x/manifest.json", digest=DIGEST, rank=too_big,
                        base_model={"uri": adep["spec"]["baseModel"]["uri"]})
    adapter = adep["spec"]["adapters"][0]
    reasons = adp.preflight(adep, adapter, source, adp.Settings(), None)
    assert ("RankTooHigh", f"adapters[{adapter['name']}]: rank {too_big} is above every --max-lora-rank "
            f"{runtime.title} accepts ({runtime.lora_ranks[-1]})") in reasons


def test_the_engine_client_speaks_the_dialect_it_is_given():
    dialect = runtimes.EngineApi(health="/ping", models="/lora/list", load="/lora/add", unload="/lora/remove",
                                 already_loaded="exists", not_found="unknown adapter")
    calls: list[tuple[str, dict | None]] = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else None
        calls.append((request.path, body))
        if request.path == dialect.models:
            return web.json_response({"data": [{"id": "a", "parent": "base"}]})
        if request.path == dialect.load and body["lora_name"] == "dup":
            return web.json_response({"message": "adapter dup exists"}, status=400)
        if request.path == dialect.unload:
            return web.json_response({"message": "unknown adapter"}, status=404)
        if request.path == dialect.load and body["lora_name"] == "bad":
            return web.json_response({"message": "no such file"}, status=400)
        return web.json_response({})

    async def scenario() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            async with aiohttp.ClientSession() as session:
                client = EngineClient(f"http://127.0.0.1:{port}", session, dialect)
                assert await client.ready()
                assert await client.adapters() == {"a"}
                await client.load("dup", "/cache/dup")  # "already loaded" in this dialect: success
                await client.unload("gone")  # "not found" in this dialect: success
                with pytest.raises(EngineError, match="no such file"):
                    await client.load("bad", "/cache/bad")
        finally:
            await runner.cleanup()

    asyncio.run(scenario())
    assert [path for path, _ in calls] == ["/ping", "/lora/list", "/lora/add", "/lora/remove", "/lora/add"]

"""The rollout bench's engine stand-in keeps vLLM's runtime LoRA API and refuses what vLLM refuses."""

from __future__ import annotations

import json

from aiohttp.test_utils import TestClient, TestServer

from kubetune_testing.lora_standin import BASE, StandIn


async def test_the_standin_loads_unloads_serves_and_refuses_as_vllm(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    async with TestClient(TestServer(StandIn(0.0, 0.0, 0.0).app())) as client:
        async def post(path: str, body: dict) -> tuple[int, dict | str]:
            response = await client.post(path, json=body)
            text = await response.text()
            return response.status, json.loads(text) if text.startswith("{") else text

        assert (await client.get("/health")).status == 200
        assert (await post("/v1/load_lora_adapter", {"lora_name": "v1", "lora_path": str(adapter)}))[0] == 200
        status, body = await post("/v1/load_lora_adapter", {"lora_name": "v1", "lora_path": str(adapter)})
        assert (status, body["error"]["message"]) == (400, "The lora adapter 'v1' has already been loaded.")
        status, body = await post("/v1/load_lora_adapter", {"lora_name": "v2", "lora_path": str(tmp_path / "none")})
        assert status == 404 and "No adapter found" in body["error"]["message"]
        assert (await post("/v1/load_lora_adapter", {"lora_name": "v3"}))[0] == 400
        models = await (await client.get("/v1/models")).json()
        assert [(m["id"], m["parent"]) for m in models["data"]] == [(BASE, None), ("v1", BASE)]
        status, body = await post("/classify", {"model": "v1", "input": "hello"})
        assert status == 200 and body["model"] == "v1"
        assert (await post("/classify", {"model": "v2", "input": "hello"}))[0] == 404
        assert (await post("/v1/unload_lora_adapter", {"lora_name": "v1"}))[0] == 200
        status, body = await post("/v1/unload_lora_adapter", {"lora_name": "v1"})
        assert (status, body["error"]["message"]) == (404, "The lora adapter 'v1' cannot be found.")


async def test_the_standin_is_not_ready_during_its_start_up_cost():
    async with TestClient(TestServer(StandIn(60.0, 0.0, 0.0).app())) as client:
        assert (await client.get("/health")).status == 503
        assert (await client.get("/v1/models")).status == 503

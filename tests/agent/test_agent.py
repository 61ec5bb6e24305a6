"""The agent on real sockets: a fake vLLM engine, adapters published into a file:// store with the real
storage client, desired state and report as files (the cluster's ConfigMap and annotation carry the same
documents)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from kubetune.api import serving, storage_layout
from kubetune.api.answer_scores import TOP_LOGPROBS
from tests.agent.conftest import NS, desired_state, eventually, publish, read_report, stored_file, write_desired

ALIAS = f"{NS}/intents"


async def test_loads_the_desired_versions_from_verified_copies(harness, engine, tmp_path):
    stable = publish(tmp_path, "intents", b"\x01" * 2048, 90)
    canary = publish(tmp_path, "intents", b"\x02" * 2048, 10, "canary")
    other = publish(tmp_path, "summaries", b"\x03" * 1024)
    harness.set_desired(desired_state(3, {ALIAS: [stable, canary], f"{NS}/summaries": [other]}))
    async with harness.run():
        await eventually(lambda: set(engine.loaded) == {stable.name, canary.name, other.name}, message="loads")
        for version in (stable, canary, other):
            lora_path = Path(engine.loaded[version.name])
            assert lora_path == harness.cache_dir / version.digest.partition(":")[2]
            assert (lora_path / "adapter_model.safetensors").read_bytes() == \
                stored_file(version, "adapter_model.safetensors").read_bytes()
        report = await eventually(lambda: (r := harness.report()) and r.generation == 3 and len(r.loaded) == 3 and r,
                                  message="report")
        assert report.engine_ready and report.errors == {}
        assert report.loaded == {v.name: v.digest for v in (stable, canary, other)}
        async with harness.http.get(harness.url + "/v1/models") as response:
            models = {m["id"]: m for m in (await response.json())["data"]}
        assert models[ALIAS]["ready"] and models[canary.name]["parent"] == ALIAS
        assert set(models) == {ALIAS, f"{NS}/summaries", stable.name, canary.name, other.name}
        assert (await harness.get_text("/readyz"))[0] == 200
        downloads = harness.store.downloads
        assert downloads == 6  # two files per adapter, once
        # nothing changes: nothing is downloaded or loaded again
        await asyncio.sleep(0.4)
        assert harness.store.downloads == downloads and len(engine.loads) == 3


async def test_the_merged_model_beside_an_adapter_is_never_fetched(harness, engine, tmp_path):
    version = publish(tmp_path, "intents", b"\x04" * 2048, merged=b"\x05" * 65536)
    manifest = json.loads(Path(storage_layout.split_uri(version.manifest_uri)[2]).read_text())
    assert manifest["merged"]["digest"] != version.digest  # published: the manifest references it
    harness.set_desired(desired_state(1, {ALIAS: [version]}))
    async with harness.run():
        await eventually(lambda: version.name in engine.loaded, message="load")
        adapter_prefix = version.manifest_uri.rsplit("/", 1)[0] + "/" + manifest["adapterPath"]
        assert sorted(harness.store.fetched) == [adapter_prefix + "adapter_config.json",
                                                 adapter_prefix + "adapter_model.safetensors"]
        copy = Path(engine.loaded[version.name])
        assert sorted(p.name for p in copy.rglob("*")) == ["adapter_config.json", "adapter_model.safetensors"]


async def test_a_tampered_adapter_is_refused_and_never_loaded(harness, engine, tmp_path):
    good = publish(tmp_path, "intents", b"\x01" * 2048, 100)
    tampered = publish(tmp_path, "summaries", b"\x02" * 2048)
    path = stored_file(tampered, "adapter_model.safetensors")
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF  # one byte, same size
    path.write_bytes(bytes(data))
    impostor = publish(tmp_path, "other", b"\x04" * 64)  # a real manifest, but not the digest asked for
    asked = "sha256:" + "d" * 64
    wrong_digest = serving.Version(serving.version_name(NS, "other", asked), asked, impostor.manifest_uri, 100)
    missing = serving.Version(serving.version_name(NS, "gone", "sha256:" + "e" * 64), "sha256:" + "e" * 64,
                              f"file://{tmp_path}/store/{NS}/gone/uid/manifest.json", 100)
    harness.set_desired(desired_state(1, {ALIAS: [good], f"{NS}/summaries": [tampered], f"{NS}/other": [wrong_digest],
                                          f"{NS}/gone": [missing]}))
    async with harness.run():
        report = await eventually(lambda: (r := harness.report()) and len(r.errors) == 3 and r, message="errors")
        assert report.errors[tampered.name]["reason"] == "DigestMismatch"
        assert "adapter_model.safetensors" in report.errors[tampered.name]["message"]
        assert report.errors[wrong_digest.name]["reason"] == "DigestMismatch"
        assert report.errors[missing.name]["reason"] == "ManifestMissing"
        assert report.loaded == {good.name: good.digest}
        await asyncio.sleep(0.5)  # retried with backoff, refused every time
        assert engine.loads == [good.name]
        assert not (harness.cache_dir / tampered.digest.partition(":")[2]).exists()
        assert not list(harness.cache_dir.glob(".partial-*"))
        status, text = await harness.get_text("/metrics")
        assert 'kubetune_agent_sync_errors_total{reason="DigestMismatch"}' in text
        assert (await harness.get_text("/readyz"))[0] == 503  # summaries has nothing to serve
        status, body, _ = await harness.post("/v1/completions", {"model": "summaries", "prompt": "x"})
        assert status == 503 and body["error"]["code"] == 503
        # the store is repaired (the original bytes are uploaded again): the version comes up
        data[100] ^= 0xFF
        path.write_bytes(bytes(data))
        await eventually(lambda: tampered.name in engine.loaded, timeout=5, message="repaired version loaded")
        await eventually(lambda: tampered.name not in (harness.report() or report).errors, message="error cleared")


async def test_the_engine_refusing_a_load_is_reported_and_retried(harness, engine, tmp_path):
    version = publish(tmp_path, "intents", b"\x01" * 256)
    engine.refuse[version.name] = "LoRA rank 64 is greater than max_lora_rank 16."
    harness.set_desired(desired_state(1, {ALIAS: [version]}))
    async with harness.run():
        report = await eventually(lambda: (r := harness.report()) and r.errors and r, message="load error")
        assert report.errors[version.name] == {"reason": "LoadFailed",
                                               "message": "LoRA rank 64 is greater than max_lora_rank 16."}
        del engine.refuse[version.name]
        await eventually(lambda: version.name in engine.loaded, message="retried load")
        assert harness.store.downloads == 2  # the verified copy was reused for the retry


async def test_weighted_routing_and_tenant_isolation(harness, engine, tmp_path):
    stable = publish(tmp_path, "intents", b"\x01" * 256, 90)
    canary = publish(tmp_path, "intents", b"\x02" * 256, 10, "canary")
    only = publish(tmp_path, "summaries", b"\x03" * 256, 100)
    idle = publish(tmp_path, "summaries", b"\x04" * 256, 0, "canary")
    harness.set_desired(desired_state(1, {ALIAS: [stable, canary], f"{NS}/summaries": [only, idle]}))
    async with harness.run():
        await eventually(lambda: len(engine.loaded) == 4, message="loads")
        await eventually(lambda: len(harness.agent.engine_loaded) == 4, message="agent sees loads")
        counts = Counter()
        for i in range(500):
            status, body, header = await harness.post("/v1/completions",
                                                      {"model": ALIAS if i % 2 else "intents", "prompt": "hi"})
            assert status == 200 and body["model"] == header
            counts[header] += 1
        assert set(counts) == {stable.name, canary.name}
        assert 0.05 <= counts[canary.name] / 500 <= 0.15, counts
        assert engine.requests[-1]["model"] in (stable.name, canary.name)  # the engine saw a version, not the alias
        # 100/0: everything to the stable version
        for _ in range(50):
            status, _, header = await harness.post("/classify", {"model": "summaries", "input": ["a"]})
            assert status == 200 and header == only.name
        # a version by name goes straight to it, even at weight 0
        status, _, header = await harness.post("/v1/chat/completions", {"model": idle.name, "messages": []})
        assert status == 200 and header == idle.name
        # unknown names and other tenants' names are 404, never forwarded
        before = len(engine.requests)
        for model in ("nope", f"{NS}/nope", "team-b/intents", "team-b/intents@" + stable.name[-12:],
                      "team-b/" + stable.name.split("/", 1)[1], f"{NS}/intents@" + "0" * 12, "base-model"):
            status, body, header = await harness.post("/v1/completions", {"model": model, "prompt": "x"})
            assert status == 404 and body["error"]["code"] == 404 and header is None, model
        assert len(engine.requests) == before
        async with harness.http.post(harness.url + "/v1/completions", data=b"{not json") as response:
            assert response.status == 400
        status, body, _ = await harness.post("/v1/completions", {"prompt": "no model"})
        assert status == 400


async def test_streamed_completions_pass_through(harness, engine, tmp_path):
    version = publish(tmp_path, "intents", b"\x01" * 256)
    harness.set_desired(desired_state(1, {ALIAS: [version]}))
    async with harness.run():
        await eventually(lambda: version.name in harness.agent.engine_loaded, message="load")
        async with harness.http.post(harness.url + "/v1/completions",
                                     json={"model": "intents", "prompt": "x", "stream": True}) as response:
            assert response.status == 200 and response.headers["x-kubetune-version"] == version.name
            text = await response.text()
        assert json.loads(text.split("\n\n")[0][len("data: "):])["model"] == version.name
        assert text.endswith("data: [DONE]\n\n") and "logprobs" not in engine.requests[-1]  # not sampled: as is
        assert harness.agent.telemetry.versions[version.name].requests == 1


async def test_engine_restart_and_outage_heal(harness, engine, tmp_path):
    version = publish(tmp_path, "intents", b"\x01" * 256)
    harness.set_desired(desired_state(1, {ALIAS: [version]}))
    async with harness.run():
        await eventually(lambda: version.name in engine.loaded, message="first load")
        downloads = harness.store.downloads
        engine.restart()  # came back between two ticks, without its adapters
        await eventually(lambda: engine.loads.count(version.name) == 2, timeout=3, message="reload after restart")
        # an outage: /health fails for a while, then the engine is back, empty
        engine.healthy = False
        engine.restart()
        await eventually(lambda: (r := harness.report()) and not r.engine_ready and r.loaded == {}, message="down")
        status, _, _ = await harness.post("/v1/completions", {"model": "intents", "prompt": "x"})
        assert status == 503
        engine.healthy = True
        await eventually(lambda: engine.loads.count(version.name) == 3, timeout=3, message="reload after outage")
        await eventually(lambda: (r := harness.report()) and r.engine_ready and version.name in r.loaded,
                         message="ready again")
        assert harness.store.downloads == downloads  # reloaded from the verified cache
        # a restart the agent has not noticed yet: the request fails once (503, counted), the agent reloads
        await eventually(lambda: version.name in harness.agent.engine_loaded, message="agent sees the load")
        harness.agent.config.sync_seconds = 30  # only the proxy's wake-up can trigger the next sync
        await asyncio.sleep(0.3)
        engine.restart()
        status, _, header = await harness.post("/v1/completions", {"model": "intents", "prompt": "x"})
        assert status == 503 and header == version.name
        await eventually(lambda: engine.loads.count(version.name) == 4, timeout=3, message="reload on demand")
        await eventually(lambda: version.name in harness.agent.engine_loaded, message="agent sees the reload")
        status, _, _ = await harness.post("/v1/completions", {"model": "intents", "prompt": "x"})
        assert status == 200


async def test_engine_down_at_start_is_not_fatal(harness, engine, tmp_path):
    version = publish(tmp_path, "intents", b"\x01" * 256)
    harness.set_desired(desired_state(1, {ALIAS: [version]}))
    engine.healthy = False
    async with harness.run():
        report = await eventually(harness.report, message="first report")
        assert not report.engine_ready and report.generation == -1
        await asyncio.sleep(0.3)
        assert engine.loads == []
        engine.healthy = True
        await eventually(lambda: version.name in engine.loaded, message="load once the engine is up")


async def test_desired_change_unloads_removed_versions(harness, engine, tmp_path):
    stable = publish(tmp_path, "intents", b"\x01" * 256, 50)
    canary = publish(tmp_path, "intents", b"\x02" * 256, 50, "canary")
    harness.set_desired(desired_state(1, {ALIAS: [stable, canary]}))
    async with harness.run():
        await eventually(lambda: len(engine.loaded) == 2, message="loads")
        harness.set_desired(desired_state(2, {ALIAS: [serving.Version(**{**stable.__dict__, "weight": 100})]}))
        await eventually(lambda: engine.unloads == [canary.name], message="unload")
        report = await eventually(lambda: (r := harness.report()) and r.generation == 2 and r, message="gen 2")
        assert report.loaded == {stable.name: stable.digest}
        await eventually(lambda: not (harness.cache_dir / canary.digest.partition(":")[2]).exists(), message="evict")
        for _ in range(20):
            _, _, header = await harness.post("/v1/completions", {"model": "intents", "prompt": "x"})
            assert header == stable.name
        status, _, _ = await harness.post("/v1/completions", {"model": canary.name, "prompt": "x"})
        assert status == 404
        # an invalid desired state is ignored (the last good one stays)
        harness.desired_path.write_text('{"api": "wrong"}')
        await asyncio.sleep(0.3)
        assert engine.loaded.keys() == {stable.name}
        assert 'reason="DesiredInvalid"' in (await harness.get_text("/metrics"))[1]


async def test_metrics_and_report_count_per_version(harness, engine, tmp_path):
    stable = publish(tmp_path, "intents", b"\x01" * 256, 50)
    canary = publish(tmp_path, "intents", b"\x02" * 256, 50, "canary")
    harness.set_desired(desired_state(1, {ALIAS: [stable, canary]}))
    engine.failing.add(canary.name)
    async with harness.run():
        await eventually(lambda: len(harness.agent.engine_loaded) == 2, message="loads")
        for _ in range(5):
            assert (await harness.post("/v1/completions", {"model": stable.name, "prompt": "x", "logprobs": 1}))[0] \
                == 200
        for _ in range(3):
            assert (await harness.post("/classify", {"model": stable.name, "input": ["a", "b"]}))[0] == 200
        for _ in range(4):
            status, body, header = await harness.post("/v1/completions", {"model": canary.name, "prompt": "x"})
            assert status == 500 and header == canary.name and body["message"] == "engine failure"
        report = await eventually(lambda: (r := harness.report()) and stable.name in r.metrics
                                  and r.metrics[stable.name].requests == 8 and canary.name in r.metrics
                                  and r.metrics[canary.name].requests == 4 and r, message="metrics in the report")
        ours = report.metrics[stable.name]
        assert ours.errors == 0 and sum(ours.latency_buckets) == 8 and ours.latency_sum > 0
        assert ours.confidence_count == 5 + 6  # 5 completions with logprobs, 3 x 2 classified inputs
        assert ours.confidence_sum == pytest.approx(5 * 0.7 + 6 * 0.8)
        assert report.metrics[canary.name].errors == 4 and report.metrics[canary.name].confidence_count == 0
        _, text = await harness.get_text("/metrics")
        labels = f'alias="{ALIAS}",version="{stable.name}"'
        assert f"kubetune_agent_requests_total{{{labels}}} 8.0" in text
        assert f'kubetune_agent_errors_total{{alias="{ALIAS}",version="{canary.name}"}} 4.0' in text
        assert f"kubetune_agent_request_seconds_count{{{labels}}} 8.0" in text
        assert f"kubetune_agent_confidence_count{{{labels}}} 11.0" in text
        assert f'kubetune_agent_loaded{{version="{stable.name}"}} 1.0' in text
        assert 'kubetune_agent_rejected_total' in text
        assert "kubetune_agent_engine_ready 1.0" in text


async def test_sampling_writes_jsonl_batches(harness, engine, tmp_path):
    version = publish(tmp_path, "intents", b"\x01" * 256)
    samples = tmp_path / "samples"
    harness.set_desired(desired_state(1, {ALIAS: [version]}, sampling_rate=1.0, sampling_uri=f"file://{samples}"))
    async with harness.run():
        await eventually(lambda: version.name in harness.agent.engine_loaded, message="load")
        for i in range(25):
            assert (await harness.post("/classify", {"model": "intents", "input": [f"text {i}"]}))[0] == 200
        # 10 and 10 by count, the last 5 by age
        await eventually(lambda: sum(len(p.read_text().splitlines()) for p in samples.rglob("*.jsonl")) == 25,
                         timeout=3, message="25 sampled records")
        objects = sorted(samples.rglob("*.jsonl"))
        assert len(objects) == 3
        for path in objects:
            relative = path.relative_to(samples).parts
            assert relative[:2] == (NS, "serve-0") and len(relative) == 4
            assert relative[3].endswith(".jsonl") and relative[3].startswith(relative[2].replace("-", ""))
        records = [json.loads(line) for path in objects for line in path.read_text().splitlines()]
        assert {r["version"] for r in records} == {version.name} and {r["alias"] for r in records} == {ALIAS}
        assert sorted(r["request"]["input"][0] for r in records) == sorted(f"text {i}" for i in range(25))
        assert records[0]["request"]["model"] == "intents"  # what the client sent
        assert records[0]["response"]["data"][0]["probs"] == [0.8, 0.2]
        assert records[0]["confidence"] == 0.8 and records[0]["latency"] > 0 and records[0]["time"].endswith("Z")


async def test_a_sampled_stream_reaches_the_client_event_by_event_without_the_agents_logprobs(harness, engine,
                                                                                            tmp_path):
    version = publish(tmp_path, "intents", b"\x01" * 256)
    samples = tmp_path / "samples"
    harness.set_desired(desired_state(1, {ALIAS: [version]}, sampling_rate=1.0, sampling_uri=f"file://{samples}"))
    engine.stream_gate = asyncio.Event()
    async with harness.run():
        await eventually(lambda: version.name in harness.agent.engine_loaded, message="load")
        body = {"model": "intents", "prompt": "x", "stream": True}
        async with harness.http.post(harness.url + "/v1/completions", json=body) as response:
            # the first event arrives while the engine still holds the second one back
            first = await asyncio.wait_for(response.content.readline(), 5)
            engine.stream_gate.set()
            rest = await response.read()
        assert engine.requests[-1]["logprobs"] == TOP_LOGPROBS  # asked for the drift statistics
        events = [json.loads(line[6:]) for line in (first + rest).split(b"\n\n") if line.startswith(b"data: {")]
        assert [e["choices"][0]["text"] for e in events] == [" o", "k"]
        assert [e["choices"][0]["logprobs"] for e in events] == [None, None]  # the client asked for none
        assert rest.endswith(b"data: [DONE]\n\n")
        await eventually(lambda: list(samples.rglob("*.jsonl")), message="the sample record")
    [record] = [json.loads(line) for path in samples.rglob("*.jsonl") for line in path.read_text().splitlines()]
    [choice] = record["response"]["choices"]  # the stream, assembled
    assert choice["text"] == " ok" and choice["finish_reason"] == "stop"
    assert choice["logprobs"]["tokens"] == [" o", "k"] and record["confidence"] == pytest.approx(0.7)
    assert record["entropy"] > 0 and record["request"] == body


async def test_sampling_storage_failures_never_fail_requests(harness, engine, tmp_path):
    version = publish(tmp_path, "intents", b"\x01" * 256)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    harness.set_desired(desired_state(1, {ALIAS: [version]}, sampling_rate=1.0, sampling_uri=f"file://{blocker}"))
    async with harness.run():
        await eventually(lambda: version.name in harness.agent.engine_loaded, message="load")
        for _ in range(25):
            assert (await harness.post("/v1/completions", {"model": "intents", "prompt": "x"}))[0] == 200

        async def failures():
            return 'kubetune_agent_sync_errors_total{reason="SamplingWriteFailed"}' in (
                await harness.get_text("/metrics"))[1]

        for _ in range(100):
            if await failures():
                break
            await asyncio.sleep(0.03)
        assert await failures()


async def test_a_restarted_agent_reuses_its_verified_cache(harness, engine, tmp_path):
    version = publish(tmp_path, "intents", b"\x01" * 256)
    harness.set_desired(desired_state(1, {ALIAS: [version]}))
    async with harness.run():
        await eventually(lambda: version.name in engine.loaded, message="load")
    assert harness.store.downloads == 2
    engine.restart()
    async with harness.run():
        await eventually(lambda: version.name in engine.loaded, message="reload")
    assert harness.store.downloads == 2  # re-hashed locally, not downloaded
    copy = harness.cache_dir / version.digest.partition(":")[2] / "adapter_model.safetensors"
    copy.write_bytes(b"\x09" * 256)  # the local copy went bad while the agent was down
    engine.restart()
    async with harness.run():
        await eventually(lambda: version.name in engine.loaded, message="reload")
    assert harness.store.downloads == 4
    assert copy.read_bytes() == b"\x01" * 256


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_the_agent_process(engine, tmp_path):
    """`python -m kubetune_agent` in local mode: desired file in, report file out, SIGTERM exits cleanly."""
    stable = publish(tmp_path, "intents", b"\x01" * 256, 100)
    desired, report = tmp_path / "desired.json", tmp_path / "report.json"
    write_desired(desired, desired_state(7, {ALIAS: [stable]}))
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[2]),
                                                                      os.environ.get("PYTHONPATH")])),
           "KUBETUNE_SYNC_SECONDS": "0.2", "POD_NAMESPACE": NS, "POD_NAME": "serve-1"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kubetune_agent", "--engine-url", engine.url, "--port", str(port),
        "--desired-file", str(desired), "--report-file", str(report), "--cache-dir", str(tmp_path / "cache"),
        "--report-seconds", "0.2", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        written = await eventually(lambda: (r := read_report(report)) and r.generation == 7 and r.loaded and r,
                                   timeout=15, message="the process's report")
        assert written.loaded == {stable.name: stable.digest}
        async with aiohttp.ClientSession() as http, http.post(f"http://127.0.0.1:{port}/v1/completions",
                                                             json={"model": "intents", "prompt": "x"}) as response:
            assert response.status == 200 and response.headers["x-kubetune-version"] == stable.name
        process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), 10)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, output.decode()
    lines = [json.loads(line) for line in output.decode().splitlines() if line.startswith("{")]
    assert any(line["message"] == "adapter loaded" and line["version"] == stable.name for line in lines)
    final = read_report(report)
    assert final.metrics[stable.name].requests == 1  # the last report is written on the way out
    assert storage_layout.split_uri(stable.manifest_uri)[0] == "file"

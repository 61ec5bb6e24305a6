"""The agent in front of the real CPU engine, both real processes: verified loads, weighted routing,
metrics, self-healing after an engine crash, and an Immediate rollout over two pods driven by the
operator's own decision (`adapterdeployment.decide`) without a cluster. Adapters come from the real
trainer (MiniLM intent classifiers, see conftest.py)."""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import Counter

import pytest

from kubetune.api import serving
from kubetune.runtimes import cpu

from .conftest import (
    ADAPTER,
    ALIAS,
    NS,
    SYNC_SECONDS,
    LocalOperator,
    desired,
    eventually,
    publish,
)

ENGINE_API = cpu.RUNTIME.api  # the control API the CPU engine serves


def texts(version) -> list[str]:
    return [text for text, _ in version.classifier.examples]


def engine_log_lines(engine) -> list[dict]:
    lines = []
    for line in engine.log().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


def prometheus(text: str, metric: str, **labels: str) -> float | None:
    """One sample of the Prometheus text format, labels in any order."""
    for line in text.splitlines():
        match = re.fullmatch(rf"{metric}(?:\{{(.*)\}})? (\S+)", line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(1) or ""))
        if found == labels:
            return float(match.group(2))
    return None


def test_a_desired_version_is_verified_loaded_and_served_through_the_alias(engine, versions, make_agent):
    v1, _ = versions
    agent = make_agent(engine, desired(1, v1.version()))
    report = agent.wait_loaded({v1.name})
    assert report.generation == 1 and report.errors == {} and report.loaded == {v1.name: v1.digest}

    # the engine loaded the agent's verified copy: <cache>/<digest hex>/, the published bytes
    [base, adapter] = engine.get(ENGINE_API.models).json["data"]
    copy = agent.cache_dir / v1.digest.partition(":")[2]
    assert (adapter["id"], adapter["parent"], adapter["root"]) == (v1.name, base["id"], str(copy))
    for entry in v1.document["files"]:
        assert (copy / entry["path"]).read_bytes() == v1.stored(entry["path"]).read_bytes()
    assert (copy / "labels.json").is_file()

    # the alias (qualified or bare) is answered by the engine through the agent, as the version
    for model in (ALIAS, ADAPTER):
        answer = agent.classify(texts(v1), model)
        assert answer.status == 200, answer.text
        assert answer.version == v1.name and answer.json["model"] == v1.name
        direct = engine.post(serving.ENGINE_CLASSIFY, {"model": v1.name, "input": texts(v1)})
        assert answer.json["data"] == direct.json["data"]
        assert all(item["label"] in v1.classifier.labels for item in answer.json["data"])
    # the version by its own name too; the base, other tenants and unknown names never reach the engine
    assert agent.classify(texts(v1)[0], v1.name).version == v1.name
    for model in ("minilm", f"team-b/{ADAPTER}", f"{NS}/nope"):
        answer = agent.classify("hello", model)
        assert answer.status == 404 and answer.version is None, (model, answer.text)

    models = {m["id"]: m for m in agent.get("/v1/models").json["data"]}
    assert models[ALIAS]["ready"] and models[v1.name]["parent"] == ALIAS and models[v1.name]["digest"] == v1.digest
    assert agent.get("/readyz").status == 200


def test_a_tampered_adapter_never_reaches_the_engine_and_the_good_version_keeps_serving(engine, versions,
                                                                                        make_agent, tmp_path):
    v1, v2 = versions
    tampered = publish(tmp_path / "store", v2.classifier, "tampered")
    weights = tampered.stored("adapter_model.safetensors")
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one byte after publishing, same size
    weights.write_bytes(bytes(data))

    agent = make_agent(engine, desired(1, v1.version(50), tampered.version(50, "canary")))
    report = eventually(lambda: (r := agent.report()) and tampered.name in r.errors and v1.name in r.loaded and r,
                        message="the refusal in the report")
    error = report.errors[tampered.name]
    assert error["reason"] == "DigestMismatch" and "adapter_model.safetensors" in error["message"], error
    assert report.loaded == {v1.name: v1.digest} and report.engine_ready

    # retried with backoff (at most 1 s here) and refused every time; the canary's share goes to the stable
    deadline = time.monotonic() + 2.5
    served = Counter()
    while time.monotonic() < deadline:
        assert engine.model_ids()[1:] == [v1.name]
        answer = agent.classify(texts(v1)[0])
        assert answer.status == 200, answer.text
        served[answer.version] += 1
    assert set(served) == {v1.name}
    loads = [line.get("lora_name") for line in engine_log_lines(engine) if line.get("message") == "adapter loaded"]
    assert tampered.name not in loads and v1.name in loads
    assert not (agent.cache_dir / tampered.digest.partition(":")[2]).exists()
    assert not list(agent.cache_dir.glob(".partial-*"))
    metrics = agent.get("/metrics").text
    assert prometheus(metrics, "kubetune_agent_sync_errors_total", reason="DigestMismatch") >= 2  # retried
    assert prometheus(metrics, "kubetune_agent_loaded", version=tampered.name) == 0
    final = agent.report()
    assert final.errors[tampered.name]["reason"] == "DigestMismatch" and tampered.name not in final.loaded


def test_weighted_routing_across_two_loaded_versions(engine, versions, make_agent):
    v1, v2 = versions
    agent = make_agent(engine, desired(1, v1.version(70), v2.version(30, "canary")))
    agent.wait_loaded({v1.name, v2.name})
    text = texts(v1)[0]
    counts = Counter()
    for _ in range(300):
        answer = agent.classify(text)
        assert answer.status == 200, answer.text
        assert answer.json["model"] == answer.version
        counts[answer.version] += 1
    assert set(counts) == {v1.name, v2.name}
    assert 0.62 <= counts[v1.name] / 300 <= 0.78, counts  # 70 % +- 8 points (about 3 standard deviations)

    agent.set_desired(desired(2, v1.version(100), v2.version(0, "canary")))
    eventually(lambda: (r := agent.report()) and r.generation == 2, message="generation 2 applied")
    assert set(engine.model_ids()[1:]) == {v1.name, v2.name}  # weight 0 stays loaded, but serves nothing
    assert {agent.classify(text).version for _ in range(50)} == {v1.name}
    assert agent.classify(text, v2.name).version == v2.name  # by name, whatever its weight


def test_per_version_metrics_match_the_requests_sent(engine, versions, make_agent):
    v1, v2 = versions
    agent = make_agent(engine, desired(1, v1.version(60), v2.version(40, "canary")))
    agent.wait_loaded({v1.name, v2.name})
    sent = {name: {"requests": 0, "inputs": 0, "confidence": 0.0} for name in (v1.name, v2.name)}
    started = time.monotonic()
    inputs = texts(v1)
    for i in range(40):
        batch = inputs[: 1 + i % 3]  # 1 to 3 inputs per request
        answer = agent.classify(batch, ALIAS if i % 4 else v2.name)
        assert answer.status == 200, answer.text
        tally = sent[answer.version]
        tally["requests"] += 1
        tally["inputs"] += len(batch)
        tally["confidence"] += sum(max(item["probs"]) for item in answer.json["data"])
    client_seconds = time.monotonic() - started
    assert agent.classify("x", f"{NS}/nope").status == 404  # rejected: no version's request

    text = agent.get("/metrics").text
    for name, tally in sent.items():
        labels = {"alias": ALIAS, "version": name}
        assert prometheus(text, "kubetune_agent_requests_total", **labels) == tally["requests"], name
        assert prometheus(text, "kubetune_agent_errors_total", **labels) in (None, 0.0)
        assert prometheus(text, "kubetune_agent_request_seconds_count", **labels) == tally["requests"]
        assert prometheus(text, "kubetune_agent_request_seconds_bucket", **labels, le="+Inf") == tally["requests"]
        assert prometheus(text, "kubetune_agent_confidence_count", **labels) == tally["inputs"]
        assert abs(prometheus(text, "kubetune_agent_confidence_sum", **labels) - tally["confidence"]) < 1e-6
        assert prometheus(text, "kubetune_agent_loaded", version=name) == 1
    assert prometheus(text, "kubetune_agent_rejected_total", code="404") == 1
    assert prometheus(text, "kubetune_agent_engine_ready") == 1

    def settled():
        report = agent.report()
        return report and all(report.metrics.get(n) and report.metrics[n].requests == t["requests"]
                              for n, t in sent.items()) and report
    report = eventually(settled, timeout=5, message="the report's metrics")
    for name, tally in sent.items():
        metrics = report.metrics[name]
        assert metrics.errors == 0 and metrics.confidence_count == tally["inputs"]
        assert abs(metrics.confidence_sum - tally["confidence"]) < 1e-6
        assert 1 / 5 <= metrics.confidence_sum / metrics.confidence_count <= 1  # the top of 5 probabilities
        assert len(metrics.latency_buckets) == len(serving.LATENCY_BUCKETS) + 1
        assert sum(metrics.latency_buckets) == tally["requests"]  # per-bucket counts, not cumulative
        assert metrics.latency_sum > 0
    assert sum(m.latency_sum for m in report.metrics.values()) <= client_seconds  # measured inside the client's


def test_completions_chat_and_streams_through_the_agent_on_a_causal_engine(llama_engine, lm_version, make_agent):
    writer = lm_version
    agent = make_agent(llama_engine, desired(1, writer.version(), alias=writer.alias))
    agent.wait_loaded({writer.name})
    body = {"prompt": "alpha beta gamma", "max_tokens": 4, "logprobs": 0, "ignore_eos": True}
    answer = agent.post(serving.ENGINE_COMPLETIONS, {"model": "writer", **body})
    assert answer.status == 200, answer.text
    assert answer.version == writer.name and answer.json["model"] == writer.name
    direct = llama_engine.post(serving.ENGINE_COMPLETIONS, {"model": writer.name, **body}).json
    assert answer.json["choices"] == direct["choices"]
    completion_lps = answer.json["choices"][0]["logprobs"]["token_logprobs"]
    assert len(completion_lps) == 4

    chat = agent.post(serving.ENGINE_CHAT, {"model": writer.alias, "max_tokens": 3, "logprobs": True,
                                            "ignore_eos": True, "messages": [{"role": "user", "content": "red"}]})
    assert chat.status == 200 and chat.version == writer.name, chat.text
    chat_lps = [token["logprob"] for token in chat.json["choices"][0]["logprobs"]["content"]]
    assert len(chat_lps) == 3
    stream = agent.post(serving.ENGINE_COMPLETIONS, {"model": "writer", **body, "stream": True})
    assert stream.status == 200 and stream.version == writer.name
    assert stream.headers["content-type"].startswith("text/event-stream") and "data: [DONE]" in stream.text
    plain = agent.post(serving.ENGINE_COMPLETIONS, {"model": "writer", "prompt": "alpha", "max_tokens": 2})
    assert plain.status == 200 and plain.json["choices"][0]["logprobs"] is None  # none added by the agent

    def mean_probability(logprobs: list[float]) -> float:
        return sum(math.exp(lp) for lp in logprobs) / len(logprobs)

    report = eventually(lambda: (r := agent.report()) and writer.name in r.metrics
                        and r.metrics[writer.name].requests == 4 and r, timeout=5, message="the report's metrics")
    metrics = report.metrics[writer.name]
    # the stream carries the completion's logprobs, assembled from its events; the plain request none
    assert metrics.errors == 0 and metrics.confidence_count == 3
    assert metrics.confidence_sum == pytest.approx(2 * mean_probability(completion_lps) + mean_probability(chat_lps))


def test_the_agent_reloads_every_desired_version_after_an_engine_crash(engine, versions, make_agent):
    v1, v2 = versions
    agent = make_agent(engine, desired(1, v1.version(70), v2.version(30, "canary")))
    agent.wait_loaded({v1.name, v2.name})
    assert agent.classify(texts(v1)[0]).status == 200

    engine.kill()  # SIGKILL: no goodbye, every runtime-loaded adapter is gone
    eventually(lambda: (r := agent.report()) and not r.engine_ready and r.loaded == {} and r, timeout=5,
               message="the agent sees the engine down")
    down = agent.classify(texts(v1)[0])
    assert down.status == 503 and down.json["error"]["code"] == 503, down.text
    assert agent.get("/readyz").status == 503

    engine.start()  # the same port, an empty engine
    back = time.monotonic()
    report = agent.wait_loaded({v1.name, v2.name}, timeout=10)
    healed = time.monotonic() - back
    assert healed < 10 * SYNC_SECONDS + 3, healed  # a few ticks (plus two adapter loads)
    assert report.errors == {} and report.loaded == {v1.name: v1.digest, v2.name: v2.digest}
    # reloaded from the verified cache: nothing downloaded again
    assert agent.log().count('"adapter downloaded and verified"') == 2, agent.log()[-2000:]
    served = Counter()
    for _ in range(20):
        answer = agent.classify(texts(v1)[0])
        assert answer.status == 200, answer.text
        served[answer.version] += 1
    assert set(served) <= {v1.name, v2.name}
    assert agent.get("/readyz").status == 200
    assert engine.starts >= 2


def test_an_immediate_rollout_decided_by_the_operator_reaches_every_pod(engines, versions, make_agent):
    v1, v2 = versions
    agents = [make_agent(engine, pod=f"serve-{i}") for i, engine in enumerate(engines)]
    operator = LocalOperator(agents, v1)
    plan = operator.reconcile()  # the first version is stable at once
    assert plan.desired.generation == 1 and operator.record()["stable"]["digest"] == v1.digest
    for agent in agents:
        agent.wait_loaded({v1.name})
    operator.reconcile()
    assert operator.status["phase"] == "Ready" and operator.record()["podsReady"] == 2

    # a steady trickle of client requests through both agents for the whole rollout
    failures, seen, stop = [], [Counter() for _ in agents], threading.Event()

    def trickle(index: int) -> None:
        while not stop.is_set():
            answer = agents[index].classify(texts(v1)[index])
            if answer.status != 200:
                failures.append((index, answer.status, answer.text[:200]))
            seen[index][answer.version] += 1
            time.sleep(0.01)

    threads = [threading.Thread(target=trickle, args=(i,), daemon=True) for i in range(len(agents))]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.3)
        operator.set_source(v2)  # the spec changes
        plan = operator.reconcile()
        assert plan.desired.generation == 2
        assert {v.name: v.weight for v in plan.desired.versions().values()} == {v1.name: 0, v2.name: 100}
        assert operator.record()["canary"]["digest"] == v2.digest
        for agent in agents:
            eventually(lambda a=agent: a.classify(texts(v2)[0]).version == v2.name, timeout=15,
                       message=f"{agent.pod} serves v2")
        # once every report shows v2 loaded, the decision promotes it (grace 0: v1 leaves the desired state)
        eventually(lambda: operator.reconcile() and "canary" not in operator.record(), timeout=10,
                   message="promotion")
        record = operator.record()
        assert record["stable"]["digest"] == v2.digest and record["stable"]["podsLoaded"] == 2
        assert {v.name: v.weight for v in operator.desired.versions().values()} == {v2.name: 100}
        for agent in agents:
            agent.wait_loaded({v2.name})
        time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert failures == []
    for counts in seen:
        assert counts[v1.name] > 0 and counts[v2.name] > 0, counts
    operator.reconcile()
    assert operator.status["phase"] == "Ready"
    assert [e.reason for e in operator.events] == ["Deploying", "RolloutStarted", "Promoted"]
    for agent in agents:
        for _ in range(10):
            assert agent.classify(texts(v2)[0]).version == v2.name
        report = agent.report()
        assert report.loaded == {v2.name: v2.digest} and report.generation == operator.desired.generation
        assert not (agent.cache_dir / v1.digest.partition(":")[2]).exists()  # evicted with the unload


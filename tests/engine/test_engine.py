"""The CPU engine speaks vLLM's API (kubetune.api.serving) to the agent: runtime LoRA loading and
unloading, completions, chat, classification, refusals, restarts. Every test runs against a real
engine process and adapters the real trainer published."""

from __future__ import annotations

import json
import math
import shutil
import signal
import threading
import time
from contextlib import contextmanager

import pytest

from kubetune.api import serving
from kubetune.runtimes import cpu

from .conftest import EngineProcess

ENGINE_API = cpu.RUNTIME.api  # the control API the CPU engine serves

PROMPT = "alpha beta gamma"


@contextmanager
def loaded(engine: EngineProcess, **adapters):
    """Adapters loaded for the body of a `with`, unloaded after it (whatever the test left)."""
    names = {key.replace("_", "/", 1) + "@0123456789ab": path for key, path in adapters.items()}
    try:
        for name, path in names.items():
            reply = engine.load(name, path)
            assert reply.status == 200, reply.text
            assert reply.text == f"Success: LoRA adapter '{name}' added successfully."
        yield list(names)
    finally:
        for name in engine.model_ids()[1:]:
            engine.unload(name)


def complete(engine: EngineProcess, model: str, prompt=PROMPT, **fields) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": 6, "logprobs": 1, "ignore_eos": True, **fields}
    reply = engine.post(serving.ENGINE_COMPLETIONS, body)
    assert reply.status == 200, reply.text
    return reply.json


def token_logprobs(response: dict) -> list[float]:
    return response["choices"][0]["logprobs"]["token_logprobs"]


def assert_error(reply, status: int, kind: str, *fragments: str) -> dict:
    """vLLM's error body since 0.10.1: {"error": {"message", "type", "param", "code"}}."""
    assert reply.status == status, reply.text
    body = reply.json
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert error["type"] == kind and error["code"] == status, body
    for fragment in fragments:
        assert fragment in error["message"], body
    return error


# --- management ---------------------------------------------------------------------------------------


def test_health_and_models_list_the_base(llama_engine):
    health = llama_engine.get(ENGINE_API.health)
    assert (health.status, health.text) == (200, "")
    models = llama_engine.get(ENGINE_API.models).json
    assert models["object"] == "list"
    [base] = models["data"]
    assert base["id"] == llama_engine.served_name and base["root"] == str(llama_engine.model)
    assert base["object"] == "model" and base["parent"] is None


def test_two_adapters_serve_side_by_side_until_one_is_unloaded(llama_engine, lm_adapters):
    base = llama_engine.served_name
    before = complete(llama_engine, base)
    with loaded(llama_engine, test_r4=lm_adapters[4], test_r8=lm_adapters[8]) as (r4, r8):
        data = llama_engine.get(ENGINE_API.models).json["data"]
        assert [(m["id"], m["parent"], m["root"]) for m in data] == [
            (base, None, str(llama_engine.model)), (r4, base, str(lm_adapters[4])), (r8, base, str(lm_adapters[8]))]

        outputs = {model: complete(llama_engine, model) for model in (base, r4, r8)}
        for model, response in outputs.items():
            assert response["object"] == "text_completion" and response["model"] == model
            choice = response["choices"][0]
            assert choice["finish_reason"] == "length" and len(choice["logprobs"]["tokens"]) == 6
            assert all(lp <= 0 for lp in choice["logprobs"]["token_logprobs"])
            assert response["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
        # the base with adapters loaded is the base without them; each adapter changes the logits its own way
        assert token_logprobs(outputs[base]) == token_logprobs(before)
        lp_base, lp_r4, lp_r8 = (token_logprobs(outputs[m]) for m in (base, r4, r8))
        assert lp_r4 != pytest.approx(lp_base, abs=1e-3) and lp_r8 != pytest.approx(lp_base, abs=1e-3)
        assert lp_r4 != pytest.approx(lp_r8, abs=1e-3)

        batch = complete(llama_engine, r8, prompt=[PROMPT, "red green blue"])
        assert [c["index"] for c in batch["choices"]] == [0, 1]
        assert batch["choices"][0] == outputs[r8]["choices"][0]

        reply = llama_engine.unload(r4)
        assert (reply.status, reply.text) == (200, f"Success: LoRA adapter '{r4}' removed successfully.")
        assert llama_engine.model_ids() == [base, r8]
        gone = llama_engine.post(serving.ENGINE_COMPLETIONS, {"model": r4, "prompt": PROMPT})
        assert_error(gone, 404, "NotFoundError", f"The model `{r4}` does not exist.")
        assert complete(llama_engine, r8)["choices"] == outputs[r8]["choices"]
        assert complete(llama_engine, base)["choices"] == outputs[base]["choices"]


def test_load_refusals_leave_the_engine_serving(llama_engine, lm_adapters, intent_classifier, tmp_path):
    base = llama_engine.served_name
    before = complete(llama_engine, base)
    too_big = shutil.copytree(lm_adapters[8], tmp_path / "rank-16")
    config = json.loads((too_big / "adapter_config.json").read_text())
    (too_big / "adapter_config.json").write_text(json.dumps({**config, "r": 16}))
    no_config = shutil.copytree(lm_adapters[4], tmp_path / "no-config")
    (no_config / "adapter_config.json").unlink()
    corrupt = shutil.copytree(lm_adapters[4], tmp_path / "corrupt")
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    with loaded(llama_engine, test_a=lm_adapters[4], test_b=lm_adapters[8]) as (a, b):
        assert_error(llama_engine.load(a, lm_adapters[4]), 400, "InvalidUserInput",
                     f"The lora adapter '{a}' has already been loaded.")
        assert llama_engine.unload(b).status == 200

        assert_error(llama_engine.load("test/big@1", too_big), 400, "BadRequestError",
                     "LoRA rank 16 is greater than max_lora_rank 8.")
        # vLLM answers 404 for a load error saying "No adapter found" (no directory, no adapter_config.json)
        assert_error(llama_engine.load("test/nowhere@1", tmp_path / "nowhere"), 404, "NotFoundError",
                     f"Loading lora test/nowhere@1 failed: No adapter found for {tmp_path / 'nowhere'}")
        assert_error(llama_engine.load("test/noconfig@1", no_config), 404, "NotFoundError", "No adapter found for")
        assert_error(llama_engine.load("test/corrupt@1", corrupt), 400, "BadRequestError",
                     "Loading lora test/corrupt@1 failed", "SafetensorError")
        # the classifier's head is in modules_to_save, which vLLM refuses (the vllm fidelity, the default)
        assert_error(llama_engine.load("test/intents@1", intent_classifier.path), 400, "BadRequestError",
                     "vLLM only supports modules_to_save being None.")
        assert_error(llama_engine.post(ENGINE_API.load, {"lora_name": "x"}), 400, "InvalidUserInput",
                     "Both 'lora_name' and 'lora_path' must be provided.")
        assert_error(llama_engine.request("POST", ENGINE_API.load, raw=b"{not json"), 400, "BadRequestError",
                     "not valid JSON")

        assert llama_engine.model_ids() == [base, a]
        assert complete(llama_engine, base)["choices"] == before["choices"]
        assert token_logprobs(complete(llama_engine, a)) != pytest.approx(token_logprobs(before), abs=1e-3)
        # the slot freed by the unload is usable: the refusals took none
        assert llama_engine.load(b, lm_adapters[8]).status == 200


def test_unknown_models_and_adapters_are_404(llama_engine):
    name = "nobody/nothing@000000000000"
    expected = {"error": {"message": f"The model `{name}` does not exist.", "type": "NotFoundError", "param": None,
                          "code": 404}}
    for path, body in ((serving.ENGINE_COMPLETIONS, {"prompt": PROMPT}),
                       (serving.ENGINE_CHAT, {"messages": [{"role": "user", "content": "hi"}]}),
                       (serving.ENGINE_CLASSIFY, {"input": "hi"})):
        reply = llama_engine.post(path, {"model": name, **body})
        assert (reply.status, reply.json) == (404, expected)
    assert_error(llama_engine.unload(name), 404, "NotFoundError", f"The lora adapter '{name}' cannot be found.")


def test_bad_requests_are_400(llama_engine):
    base = llama_engine.served_name
    assert_error(llama_engine.post(serving.ENGINE_COMPLETIONS, {"model": base, "prompt": PROMPT, "max_tokens": 0}),
                 400, "BadRequestError", "max_tokens")
    assert_error(llama_engine.post(serving.ENGINE_COMPLETIONS, {"model": base, "prompt": PROMPT, "max_tokens": 5000}),
                 400, "BadRequestError", "maximum context length is 4096 tokens")
    assert_error(llama_engine.post(serving.ENGINE_CLASSIFY, {"model": base, "input": PROMPT}), 400,
                 "BadRequestError", "does not support classification")
    assert llama_engine.get("/v1/nothing").status == 404


# --- generation ---------------------------------------------------------------------------------------


def test_greedy_generation_is_deterministic(llama_engine, lm_adapters):
    with loaded(llama_engine, test_r8=lm_adapters[8]) as [r8]:
        for model in (llama_engine.served_name, r8):
            first, second = complete(llama_engine, model, max_tokens=8), complete(llama_engine, model, max_tokens=8)
            assert first["choices"] == second["choices"]
            # temperature is accepted and decoding stays greedy
            assert complete(llama_engine, model, max_tokens=8, temperature=0.9)["choices"] == first["choices"]
        # a stop string cuts the text where it first appears
        full = complete(llama_engine, llama_engine.served_name, max_tokens=8, logprobs=None)["choices"][0]["text"]
        words = full.split()
        assert len(words) >= 3, full
        stopped = complete(llama_engine, llama_engine.served_name, max_tokens=8, stop=[words[2]])["choices"][0]
        assert (stopped["text"], stopped["finish_reason"]) == (full[: full.find(words[2])], "stop")
        # without ignore_eos, generation ends at the end-of-sequence token (the adapters learned to emit it)
        natural = complete(llama_engine, r8, max_tokens=8, ignore_eos=False)
        assert natural["choices"][0]["finish_reason"] in ("stop", "length")
        assert natural["usage"]["completion_tokens"] <= 8


def test_chat_completions_with_logprobs(llama_engine, lm_adapters):
    messages = [{"role": "system", "content": "one two three"}, {"role": "user", "content": PROMPT}]
    with loaded(llama_engine, test_r4=lm_adapters[4]) as [r4]:
        body = {"model": r4, "messages": messages, "max_tokens": 4, "logprobs": True, "top_logprobs": 2,
                "ignore_eos": True}
        reply = llama_engine.post(serving.ENGINE_CHAT, body)
        assert reply.status == 200, reply.text
        response = reply.json
        assert response["object"] == "chat.completion" and response["model"] == r4
        [choice] = response["choices"]
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] == "length" and response["usage"]["completion_tokens"] == 4
        content = choice["logprobs"]["content"]
        assert len(content) == 4
        for entry in content:
            assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 2
            assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]
            assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"])
        assert sum(math.exp(e["logprob"]) for e in content) > 0

        # the base answers differently; without logprobs there are none
        base = llama_engine.post(serving.ENGINE_CHAT, {**body, "model": llama_engine.served_name}).json
        assert [e["logprob"] for e in base["choices"][0]["logprobs"]["content"]] != pytest.approx(
            [e["logprob"] for e in content], abs=1e-3)
        plain = llama_engine.post(serving.ENGINE_CHAT, {**body, "logprobs": False, "top_logprobs": None}).json
        assert plain["choices"][0]["logprobs"] is None
        assert plain["choices"][0]["message"] == choice["message"]

        # streamed: server-sent chunks that add up to the same message
        stream = llama_engine.post(serving.ENGINE_CHAT, {**body, "stream": True})
        assert stream.status == 200
        events = [line[len("data: "):] for line in stream.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert text == choice["message"]["content"]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_health_answers_during_a_generation_and_an_abandoned_request_stops(llama_engine):
    long = {"model": llama_engine.served_name, "prompt": PROMPT, "max_tokens": 3000, "ignore_eos": True}
    result: dict = {}

    def generate():
        started = time.monotonic()
        result["reply"] = llama_engine.post(serving.ENGINE_COMPLETIONS, long)
        result["seconds"] = time.monotonic() - started

    worker = threading.Thread(target=generate)
    worker.start()
    time.sleep(0.2)
    latencies = []
    while worker.is_alive():
        started = time.monotonic()
        assert llama_engine.get(ENGINE_API.health).status == 200
        assert llama_engine.get(ENGINE_API.models).status == 200
        latencies.append(time.monotonic() - started)
        time.sleep(0.1)
    worker.join()
    assert result["reply"].status == 200 and result["reply"].json["usage"]["completion_tokens"] == 3000
    assert latencies and max(latencies) < min(1.0, result["seconds"] / 2), (latencies, result["seconds"])

    # a client that gives up cancels its request: the generation stops and the next request is served at once
    with pytest.raises(OSError):  # the read timed out
        llama_engine.request("POST", serving.ENGINE_COMPLETIONS, long, timeout=0.3)
    started = time.monotonic()
    complete(llama_engine, llama_engine.served_name)
    assert time.monotonic() - started < result["seconds"] / 2


# --- classification -----------------------------------------------------------------------------------


def test_classify_with_minilm_adapters(minilm_engine, intent_classifier, small_classifier):
    probe = {"model": "minilm", "input": intent_classifier.examples[0][0]}
    base_before = minilm_engine.post(serving.ENGINE_CLASSIFY, probe).json["data"]
    with loaded(minilm_engine, test_intents=intent_classifier.path, test_small=small_classifier.path) as (big, small):
        texts = [text for text, _ in intent_classifier.examples]
        reply = minilm_engine.post(serving.ENGINE_CLASSIFY, {"model": big, "input": texts})
        assert reply.status == 200, reply.text
        response = reply.json
        assert response["object"] == "list" and response["model"] == big
        assert response["usage"]["prompt_tokens"] == response["usage"]["total_tokens"] > len(texts)
        assert [d["index"] for d in response["data"]] == list(range(len(texts)))
        for item in response["data"]:
            assert item["num_classes"] == len(item["probs"]) == len(intent_classifier.labels) == 5
            assert sum(item["probs"]) == pytest.approx(1.0, abs=1e-4)
            assert item["label"] in intent_classifier.labels
            assert item["label"] == intent_classifier.labels[max(range(5), key=item["probs"].__getitem__)]
        assert [d["label"] for d in response["data"]] == [label for _, label in intent_classifier.examples]

        # another label list: its own head size, side by side with the first
        one = minilm_engine.post(serving.ENGINE_CLASSIFY, {"model": small, "input": small_classifier.examples[0][0]})
        [item] = one.json["data"]
        assert item["num_classes"] == 3 and item["label"] in small_classifier.labels
        assert sum(item["probs"]) == pytest.approx(1.0, abs=1e-4)

        # the base has its own (untrained) head of the base config's size
        base = minilm_engine.post(serving.ENGINE_CLASSIFY, probe).json["data"]
        assert base == base_before  # adapters loaded or not
        assert base[0]["num_classes"] == 2 and sum(base[0]["probs"]) == pytest.approx(1.0, abs=1e-4)

        assert_error(minilm_engine.post(serving.ENGINE_COMPLETIONS, {"model": big, "prompt": "hi"}), 400,
                     "BadRequestError", "does not support text generation")

        # unloading one classifier leaves the other's answers unchanged
        assert minilm_engine.unload(small).status == 200
        again = minilm_engine.post(serving.ENGINE_CLASSIFY, {"model": big, "input": texts}).json
        assert again["data"] == response["data"]
    assert minilm_engine.post(serving.ENGINE_CLASSIFY, probe).json["data"] == base_before


# --- restarts -----------------------------------------------------------------------------------------


def test_restart_forgets_adapters_and_sigterm_stops_cleanly(llama_engine, lm_adapters):
    assert llama_engine.load("test/r4@0123456789ab", lm_adapters[4]).status == 200
    assert llama_engine.stop(signal.SIGKILL) == -signal.SIGKILL
    llama_engine.start()  # same port
    assert llama_engine.model_ids() == [llama_engine.served_name]  # the agent re-loads what it wants

    assert llama_engine.stop(signal.SIGTERM) == 0
    log = [json.loads(line) for line in llama_engine.log().splitlines() if line.startswith("{")]
    messages = [entry["message"] for entry in log]
    assert any(m.startswith("kubetune engine ready on http://127.0.0.1:") for m in messages)
    assert messages[-1] == "kubetune engine stopped"
    llama_engine.start()

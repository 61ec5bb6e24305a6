"""The end-of-sequence token that stops an answer, as vLLM returns it: the last of the answer's tokens and
logprobs (vLLM's output token ids end with it, `vllm/v1/engine/detokenizer.py` leaves it out of the text
only), streamed or not, completions and chat; never in the text."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from kubetune.api import serving
from kubetune_testing import cycle_lm

from .conftest import EngineProcess

PROMPT = "one two three"  # the taught model continues the cycle a few words, then ends the answer


@pytest.fixture(scope="module")
def taught_engine(tmp_path_factory):
    """The CPU engine on a tiny Llama taught to end its answers (60 steps: a few seconds)."""
    model = cycle_lm.taught_llama(tmp_path_factory.mktemp("eos-model"), steps=60)
    engine = EngineProcess(model, tmp_path_factory.mktemp("eos-logs"), served_name="cycle").start()
    yield engine, AutoTokenizer.from_pretrained(model).eos_token
    engine.stop()


def events(engine: EngineProcess, path: str, body: dict) -> list[dict]:
    reply = engine.post(path, {**body, "stream": True})
    assert reply.status == 200, reply.text
    data = [line[len("data: "):] for line in reply.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1] if json.loads(d)["choices"]]


def test_the_end_of_sequence_is_the_last_logprob_and_not_in_the_text(taught_engine):
    engine, eos = taught_engine
    body = {"model": "cycle", "prompt": PROMPT, "max_tokens": 16, "logprobs": 2}
    reply = engine.post(serving.ENGINE_COMPLETIONS, body)
    assert reply.status == 200, reply.text
    [choice], usage = reply.json["choices"], reply.json["usage"]
    logprobs = choice["logprobs"]
    assert choice["finish_reason"] == "stop" and choice["text"].strip() and eos not in choice["text"]
    assert logprobs["tokens"][-1] == eos and eos in logprobs["top_logprobs"][-1]
    assert "".join(logprobs["tokens"][:-1]) == choice["text"] and logprobs["text_offset"][-1] == len(choice["text"])
    assert len(logprobs["token_logprobs"]) == len(logprobs["tokens"]) == usage["completion_tokens"]

    chunks = events(engine, serving.ENGINE_COMPLETIONS, body)
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert [t for c in chunks if c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["tokens"]] \
        == logprobs["tokens"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"

    chat = {"model": "cycle", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16,
            "logprobs": True, "top_logprobs": 2}
    reply = engine.post(serving.ENGINE_CHAT, chat)
    assert reply.status == 200, reply.text
    [choice] = reply.json["choices"]
    content = choice["logprobs"]["content"]
    assert choice["finish_reason"] == "stop" and eos not in choice["message"]["content"]
    assert content[-1]["token"] == eos and len(content) == reply.json["usage"]["completion_tokens"]
    assert "".join(t["token"] for t in content[:-1]) == choice["message"]["content"]
    streamed = [t for c in events(engine, serving.ENGINE_CHAT, chat) if c["choices"][0].get("logprobs")
                for t in c["choices"][0]["logprobs"]["content"]]
    assert streamed == content

    # ignore_eos: the answer runs to max_tokens, and an end-of-sequence it passes is not the last token
    plain = engine.post(serving.ENGINE_COMPLETIONS, {**body, "ignore_eos": True}).json["choices"][0]
    assert plain["finish_reason"] == "length" and len(plain["logprobs"]["tokens"]) == 16

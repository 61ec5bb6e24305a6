"""The `openai` Python client's own calls (models, completions, chat, streams, logprobs, errors) against
the CPU engine and through the agent, both real processes on the tiny Llama; through the agent with every
request sampled: the client gets only the logprobs it asked for, the sample records hold scored answers."""

from __future__ import annotations

import dataclasses
import json

import openai
import pytest

from kubetune.api import serving
from kubetune.api.answer_scores import TOP_LOGPROBS
from kubetune_operator import stats

from .conftest import desired

PROMPT = "alpha beta gamma"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "red green"}]
TOKENS = 4
GREEDY = {"ignore_eos": True}  # always TOKENS tokens: answers compare across calls


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def streamed_completion(api: openai.OpenAI, model: str, **options) -> tuple[str, list[str], list, object]:
    """(text, tokens, top logprobs, usage) of a streamed completion, assembled from its chunks."""
    text, tokens, tops, usage = "", [], [], None
    for chunk in api.completions.create(model=model, prompt=PROMPT, max_tokens=TOKENS, stream=True,
                                        stream_options={"include_usage": True}, extra_body=GREEDY, **options):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text += choice.text
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens
                tops += choice.logprobs.top_logprobs
    return text, tokens, tops, usage


def streamed_chat(api: openai.OpenAI, model: str, **options) -> tuple[str, list, object]:
    """(text, logprobs content or None per chunk, usage) of a streamed chat completion."""
    text, logprobs, usage = "", [], None
    for chunk in api.chat.completions.create(model=model, messages=MESSAGES, max_tokens=TOKENS, stream=True,
                                             stream_options={"include_usage": True}, extra_body=GREEDY, **options):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            logprobs.append(choice.logprobs.content if choice.logprobs is not None else None)
    return text, logprobs, usage


def test_the_openai_client_against_the_cpu_engine(llama_engine):
    api = client(llama_engine.url)
    model = llama_engine.served_name
    assert model in [m.id for m in api.models.list()]

    plain = api.completions.create(model=model, prompt=PROMPT, max_tokens=TOKENS, extra_body=GREEDY)
    assert plain.choices[0].logprobs is None and plain.usage.completion_tokens == TOKENS
    scored = api.completions.create(model=model, prompt=PROMPT, max_tokens=TOKENS, logprobs=2, extra_body=GREEDY)
    [choice] = scored.choices
    assert choice.text == plain.choices[0].text and len(choice.logprobs.tokens) == TOKENS
    assert all(2 <= len(top) <= 3 for top in choice.logprobs.top_logprobs)  # the chosen token and 2 others
    text, tokens, tops, usage = streamed_completion(api, model, logprobs=2)
    assert (text, tokens, tops) == (choice.text, choice.logprobs.tokens, choice.logprobs.top_logprobs)
    assert usage.completion_tokens == TOKENS

    chat = api.chat.completions.create(model=model, messages=MESSAGES, max_tokens=TOKENS, logprobs=True,
                                       top_logprobs=2, extra_body=GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == TOKENS and all(len(t.top_logprobs) == 2 for t in content)
    assert content[0].top_logprobs[0].logprob == pytest.approx(content[0].logprob)  # greedy: the top one
    text, logprobs, usage = streamed_chat(api, model, logprobs=True, top_logprobs=2)
    assert text == chat.choices[0].message.content and usage.completion_tokens == TOKENS
    assert [t for chunk in logprobs if chunk for t in chunk] == content
    assert streamed_chat(api, model)[1] == [None] * len(logprobs)  # none asked, none sent

    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=1)


def test_the_openai_client_through_the_agent_with_every_request_sampled(llama_engine, lm_version, make_agent,
                                                                       tmp_path):
    writer = lm_version
    samples = tmp_path / "samples"
    state = dataclasses.replace(desired(1, writer.version(), alias=writer.alias), sampling_rate=1.0,
                                sampling_uri=f"file://{samples}")
    agent = make_agent(llama_engine, state)
    agent.wait_loaded({writer.name})
    api = client(agent.url)
    assert writer.alias in [m.id for m in api.models.list()]

    # not asked: no logprobs, although the agent had the engine compute them
    plain = api.completions.create(model="writer", prompt=PROMPT, max_tokens=TOKENS, extra_body=GREEDY)
    assert plain.choices[0].logprobs is None
    one = api.completions.create(model="writer", prompt=PROMPT, max_tokens=TOKENS, logprobs=1, extra_body=GREEDY)
    assert one.choices[0].text == plain.choices[0].text
    assert all(1 <= len(top) <= 2 for top in one.choices[0].logprobs.top_logprobs)  # chosen + 1, not 5
    chat = api.chat.completions.create(model="writer", messages=MESSAGES, max_tokens=TOKENS, extra_body=GREEDY)
    assert chat.choices[0].logprobs is None
    chat_one = api.chat.completions.create(model="writer", messages=MESSAGES, max_tokens=TOKENS, logprobs=True,
                                           top_logprobs=1, extra_body=GREEDY)
    assert [len(t.top_logprobs) for t in chat_one.choices[0].logprobs.content] == [1] * TOKENS
    text, tokens, _, usage = streamed_completion(api, "writer")
    assert (text, tokens, usage.completion_tokens) == (plain.choices[0].text, [], TOKENS)
    chat_text, chat_logprobs, _ = streamed_chat(api, "writer")
    assert chat_text == chat.choices[0].message.content and set(map(type, chat_logprobs)) == {type(None)}
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="someone-else", messages=MESSAGES, max_tokens=1)
    with pytest.raises(openai.BadRequestError) as refused:  # the engine's own error, sampled, passed as it came
        api.completions.create(model="writer", prompt=PROMPT, max_tokens=TOKENS, temperature=-1)
    assert "temperature" in str(refused.value)

    agent.stop()  # flushes the samples and writes a last report
    records = [json.loads(line) for path in sorted(samples.rglob("*.jsonl")) for line in path.read_text().splitlines()]
    [failed] = [r for r in records if r["status"] != 200]
    assert failed["status"] == 400 and "temperature" in failed["response"] and stats.observations(failed) == []
    records.remove(failed)
    assert len(records) == 6 and {r["status"] for r in records} == {200}
    for record in records:
        [choice] = record["response"]["choices"]  # the engine's answer (a stream's assembled)
        if record["path"] == serving.ENGINE_CHAT:
            assert choice["message"]["content"] == chat.choices[0].message.content
            tops = [t["top_logprobs"] for t in choice["logprobs"]["content"]]
        else:
            assert choice["text"] == plain.choices[0].text
            tops = choice["logprobs"]["top_logprobs"]
        assert len(tops) == TOKENS and all(len(top) >= TOP_LOGPROBS for top in tops)
        [observation] = stats.observations(record)
        assert observation.entropy is not None and observation.entropy > 0
        assert observation.confidence == pytest.approx(record["confidence"], abs=1e-6)
    streamed = [r for r in records if r["request"].get("stream")]
    assert len(streamed) == 2 and all(r["response"]["usage"]["completion_tokens"] == TOKENS for r in streamed)
    metrics = agent.report().metrics[writer.name]
    assert metrics.requests == 7 and metrics.confidence_count == 6  # every answer scored, streams too


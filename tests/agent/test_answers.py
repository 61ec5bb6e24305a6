"""A sampled generative request (kubetune_agent.answers): the logprobs asked of the engine, the client's
answer cut back to what it asked for, streams rewritten and assembled event by event."""

from __future__ import annotations

import json
import math

import pytest

from kubetune.api import serving
from kubetune.api.answer_scores import TOP_LOGPROBS
from kubetune_agent import answers, plan

K = TOP_LOGPROBS


@pytest.mark.parametrize(("body", "forwarded", "asked"), [
    ({"prompt": "x"}, {"logprobs": K}, answers.Asked(False, False)),
    ({"prompt": "x", "logprobs": 0}, {"logprobs": K}, answers.Asked(False, True, 0)),
    ({"prompt": "x", "logprobs": 2}, {"logprobs": K}, answers.Asked(False, True, 2)),
    ({"prompt": "x", "logprobs": K + 3}, {"logprobs": K + 3}, None),  # a larger ask is never lowered
    ({"prompt": "x", "logprobs": "many"}, {"logprobs": "many"}, None),  # the engine answers its own 400
    ({"prompt": "x", "logprobs": True}, {"logprobs": True}, None),
    ({"prompt": "x", "echo": True}, {"echo": True}, None),  # logprobs would score the prompt too
])
def test_completions_ask_for_top_logprobs(body, forwarded, asked):
    sent, found = answers.with_top_logprobs(serving.ENGINE_COMPLETIONS, body)
    assert found == asked
    assert sent == {**body, **forwarded}


@pytest.mark.parametrize(("body", "forwarded", "asked"), [
    ({}, {"logprobs": True, "top_logprobs": K}, answers.Asked(True, False)),
    ({"logprobs": False}, {"logprobs": True, "top_logprobs": K}, answers.Asked(True, False)),
    ({"logprobs": True}, {"logprobs": True, "top_logprobs": K}, answers.Asked(True, True, 0)),
    ({"logprobs": True, "top_logprobs": 2}, {"logprobs": True, "top_logprobs": K}, answers.Asked(True, True, 2)),
    ({"logprobs": True, "top_logprobs": 20}, {"logprobs": True, "top_logprobs": 20}, None),
    ({"top_logprobs": 2}, {"top_logprobs": 2}, None),  # vLLM refuses top_logprobs without logprobs
    ({"logprobs": "yes"}, {"logprobs": "yes"}, None),
])
def test_chats_ask_for_top_logprobs(body, forwarded, asked):
    sent, found = answers.with_top_logprobs(serving.ENGINE_CHAT, {"messages": [], **body})
    assert found == asked
    assert sent == {"messages": [], **body, **forwarded}


def test_which_client_requests_carry_logprobs():
    assert answers.carries_logprobs(serving.ENGINE_COMPLETIONS, {"logprobs": 0})
    assert not answers.carries_logprobs(serving.ENGINE_COMPLETIONS, {"prompt": "x"})
    assert answers.carries_logprobs(serving.ENGINE_CHAT, {"logprobs": True})
    assert not answers.carries_logprobs(serving.ENGINE_CHAT, {"logprobs": False, "top_logprobs": 3})
    assert not answers.carries_logprobs(serving.ENGINE_CLASSIFY, {"logprobs": 1})


def test_classify_is_forwarded_as_is():
    body = {"input": "x"}
    assert answers.with_top_logprobs(serving.ENGINE_CLASSIFY, body) == (body, None)


def completion_logprobs(tokens: list[str]) -> dict:
    """vLLM's completion logprobs for `logprobs: K`: the chosen token first, then the others."""
    top = {t: math.log(0.5) for t in tokens[:1]} | {f"alt{i}": math.log(0.1) for i in range(K)}
    return {"text_offset": list(range(len(tokens))), "token_logprobs": [math.log(0.5)] * len(tokens),
            "tokens": tokens, "top_logprobs": [dict(top) for _ in tokens]}


def chat_logprobs(tokens: list[str]) -> dict:
    top = [{"token": f"alt{i}", "logprob": math.log(0.1), "bytes": []} for i in range(K)]
    return {"content": [{"token": t, "logprob": math.log(0.5), "bytes": [], "top_logprobs": top} for t in tokens]}


def test_the_client_gets_what_it_asked_for():
    answer = {"id": "cmpl-1", "choices": [{"index": 0, "text": "ab", "logprobs": completion_logprobs(["a", "b"])}]}
    assert answers.for_client(answer, answers.Asked(False, False))["choices"][0]["logprobs"] is None
    kept = answers.for_client(answer, answers.Asked(False, True, 2))["choices"][0]["logprobs"]
    assert [list(top) for top in kept["top_logprobs"]] == [["a", "alt0", "alt1"]] * 2  # chosen + 2
    assert kept["token_logprobs"] == answer["choices"][0]["logprobs"]["token_logprobs"]
    assert answer["choices"][0]["logprobs"]["top_logprobs"][0].keys() >= {"alt4"}  # the engine's answer is kept
    chat = {"choices": [{"index": 0, "message": {"content": "ab"}, "logprobs": chat_logprobs(["a", "b"])}]}
    assert answers.for_client(chat, answers.Asked(True, False))["choices"][0]["logprobs"] is None
    content = answers.for_client(chat, answers.Asked(True, True, 0))["choices"][0]["logprobs"]["content"]
    assert [t["top_logprobs"] for t in content] == [[], []] and [t["token"] for t in content] == ["a", "b"]
    content = answers.for_client(chat, answers.Asked(True, True, 1))["choices"][0]["logprobs"]["content"]
    assert [[x["token"] for x in t["top_logprobs"]] for t in content] == [["alt0"], ["alt0"]]
    error = {"error": {"message": "bad", "code": 400}}
    assert answers.for_client(error, answers.Asked(True, False)) == error


def events(chunks: list[dict], usage: dict | None = None) -> bytes:
    text = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks)
    if usage is not None:
        text += f"data: {json.dumps({'id': 'x', 'choices': [], 'usage': usage})}\n\n"
    return (text + "data: [DONE]\n\n").encode()


def chat_stream(tokens: list[str], logprobs: bool) -> bytes:
    chunks = [{"id": "chatcmpl-1", "created": 1, "model": "m", "object": "chat.completion.chunk",
               "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None}]}]
    chunks += [{"id": "chatcmpl-1", "created": 1, "model": "m", "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None,
                             "logprobs": chat_logprobs([t]) if logprobs else None}]} for t in tokens]
    chunks.append({"id": "chatcmpl-1", "created": 1, "model": "m", "object": "chat.completion.chunk",
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "length", "logprobs": None}]})
    return events(chunks, {"prompt_tokens": 3, "completion_tokens": len(tokens)})


def parsed(stream: bytes) -> list:
    return [json.loads(e[6:]) if e != b"data: [DONE]" else "[DONE]" for e in stream.split(b"\n\n") if e]


@pytest.mark.parametrize("piece", [1, 7, 10_000])
def test_a_stream_is_rewritten_event_by_event_and_assembled(piece):
    stream = chat_stream(["he", "llo", "!"], logprobs=True)
    relay = answers.StreamAnswer(serving.ENGINE_CHAT, answers.Asked(True, False))
    out = b""
    for start in range(0, len(stream), piece):  # however the bytes arrive
        written = relay.feed(stream[start:start + piece])
        assert written.count(b"\n\n") == len(written.split(b"\n\n")) - 1  # whole events only
        out += written
    out += relay.rest()
    assert out.endswith(b"data: [DONE]\n\n")
    assert parsed(out) == parsed(chat_stream(["he", "llo", "!"], logprobs=False))  # as if never asked
    answer = relay.answer()
    [choice] = answer["choices"]
    assert choice["message"] == {"role": "assistant", "content": "hello!"} and choice["finish_reason"] == "length"
    assert [t["token"] for t in choice["logprobs"]["content"]] == ["he", "llo", "!"]
    assert answer["usage"] == {"prompt_tokens": 3, "completion_tokens": 3} and answer["id"] == "chatcmpl-1"
    [(confidence, entropy)] = plan.scores(serving.ENGINE_CHAT, answer)
    assert confidence == pytest.approx(0.1) and entropy == pytest.approx(math.log(K))


def test_an_unsampled_stream_is_assembled_without_rewriting():
    chunks = [{"id": "cmpl-1", "choices": [{"index": i % 2, "text": t, "logprobs": completion_logprobs([t])}]}
              for i, t in enumerate(["a", "b", "c", "d"])]
    stream = events(chunks)
    relay = answers.StreamAnswer(serving.ENGINE_COMPLETIONS, None)
    assert relay.feed(stream) == stream
    first, second = relay.answer()["choices"]
    assert (first["index"], first["text"], second["text"]) == (0, "ac", "bd")
    assert first["logprobs"]["tokens"] == ["a", "c"] and len(first["logprobs"]["top_logprobs"]) == 2
    assert chunks[0]["choices"][0]["logprobs"]["tokens"] == ["a"]  # the chunks are not changed


def test_errors_and_foreign_lines_in_a_stream_pass_unchanged():
    stream = b': keep-alive\n\ndata: not json\n\ndata: {"error": {"message": "boom", "code": 500}}\n\ndata: [DONE]'
    relay = answers.StreamAnswer(serving.ENGINE_COMPLETIONS, answers.Asked(False, False))
    assert relay.feed(stream) + relay.rest() == stream
    assert relay.answer()["error"] == {"message": "boom", "code": 500} and relay.answer()["choices"] == []

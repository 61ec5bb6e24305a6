"""A sampled generative request, without I/O: the top logprobs the agent asks of the engine for drift
(`answer_scores.TOP_LOGPROBS`), the engine's answer cut back to what the client asked for, and a
server-sent event stream assembled into one answer as it passes. vLLM's shapes (v0.11.0
`entrypoints/openai/serving_completion.py`, `serving_chat.py`); docs/drift.md says why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from kubetune.api import serving
from kubetune.api.answer_scores import TOP_LOGPROBS

DONE = b"[DONE]"


@dataclass(frozen=True)
class Asked:
    """The logprobs a client asked for, where the agent asked the engine for more. `top`: completions'
    `logprobs` (vLLM answers the chosen token and the first `top` others), chat's `top_logprobs`."""

    chat: bool
    logprobs: bool  # False: the client's answer gets `logprobs: null`, as vLLM answers when not asked
    top: int = 0


def with_top_logprobs(path: str, body: dict) -> tuple[dict, Asked | None]:
    """The body to forward for a sampled request and what the client asked (to restore its answer);
    (body, None) when it is forwarded as is: not a generative path, the client already asked for
    `TOP_LOGPROBS` or more, a malformed logprobs field (the engine answers its own error), or `echo`
    (vLLM's logprobs would then score the prompt's tokens too)."""
    if path == serving.ENGINE_COMPLETIONS:
        asked = body.get("logprobs")
        if body.get("echo") or not (asked is None or _count(asked)) or (asked or 0) >= TOP_LOGPROBS:
            return body, None
        return {**body, "logprobs": TOP_LOGPROBS}, Asked(False, asked is not None, asked or 0)
    if path == serving.ENGINE_CHAT:
        asked, top = body.get("logprobs"), body.get("top_logprobs")
        if asked not in (None, False, True) or not (top is None or _count(top)) or (top and not asked):
            return body, None
        if asked and (top or 0) >= TOP_LOGPROBS:
            return body, None
        return {**body, "logprobs": True, "top_logprobs": TOP_LOGPROBS}, Asked(True, bool(asked), top or 0)
    return body, None


def carries_logprobs(path: str, body: dict) -> bool:
    """Whether the client's own request asks for logprobs (its answer can be scored without the agent's)."""
    if path == serving.ENGINE_COMPLETIONS:
        return body.get("logprobs") is not None
    return path == serving.ENGINE_CHAT and body.get("logprobs") is True


def for_client(answer: dict, asked: Asked) -> dict:
    """The engine's answer (or one streamed chunk) as the client would have had it without the agent's
    logprobs: `logprobs: null` when not asked, else each position's top list cut to the client's count
    (its first entries: vLLM lists the chosen token, then the most likely)."""
    choices = answer.get("choices")
    if not isinstance(choices, list):
        return answer
    return {**answer, "choices": [_choice_for_client(c, asked) if isinstance(c, dict) else c for c in choices]}


def _choice_for_client(choice: dict, asked: Asked) -> dict:
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        return choice
    if not asked.logprobs:
        return {**choice, "logprobs": None}
    if asked.chat:
        content = [{**t, "top_logprobs": _list(t.get("top_logprobs"))[:asked.top]} if isinstance(t, dict) else t
                   for t in _list(logprobs.get("content"))]
        return {**choice, "logprobs": {**logprobs, "content": content}}
    tops = [dict(list(top.items())[:asked.top + 1]) if isinstance(top, dict) else top
            for top in _list(logprobs.get("top_logprobs"))]
    return {**choice, "logprobs": {**logprobs, "top_logprobs": tops}}


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    role: str = "assistant"
    finish_reason: object = None
    logprobs: dict | None = None


class StreamAnswer:
    """Server-sent events (vLLM's `data: {...}\\n\\n` chunks, `data: [DONE]`) as they pass: `feed` takes
    the bytes read so far and returns the bytes for the client (every complete event, rewritten by
    `for_client` when `asked`; an incomplete one waits for its end); `answer` is the stream assembled
    into the non-streamed answer's shape (text and per-position logprobs per choice, usage)."""

    def __init__(self, path: str, asked: Asked | None):
        self.chat = path == serving.ENGINE_CHAT
        self.asked = asked
        self._pending = b""
        self._choices: dict[int, _Choice] = {}
        self._head: dict = {}
        self._usage: object = None
        self._error: object = None

    def feed(self, data: bytes) -> bytes:
        self._pending += data
        *events, self._pending = self._pending.split(b"\n\n")
        return b"".join(self._event(event) + b"\n\n" for event in events)

    def rest(self) -> bytes:
        """What is left at the end of the stream (an event without its blank line), unchanged."""
        rest, self._pending = self._pending, b""
        return rest

    def _event(self, event: bytes) -> bytes:
        if not event.startswith(b"data:"):
            return event
        payload = event[5:].strip()
        try:
            chunk = json.loads(payload) if payload != DONE else None
        except ValueError:
            return event
        if not isinstance(chunk, dict):
            return event
        self._take(chunk)
        if self.asked is None or not isinstance(chunk.get("choices"), list):
            return event
        return b"data: " + json.dumps(for_client(chunk, self.asked), separators=(",", ":")).encode()

    def _take(self, chunk: dict) -> None:
        if "error" in chunk:
            self._error = chunk["error"]
        for key in ("id", "created", "model"):
            self._head.setdefault(key, chunk.get(key))
        if chunk.get("usage") is not None:
            self._usage = chunk["usage"]
        for position, choice in enumerate(_list(chunk.get("choices"))):
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", position)
            state = self._choices.setdefault(index if isinstance(index, int) else position, _Choice())
            if self.chat:
                delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
                state.role = delta.get("role") or state.role
                text = delta.get("content")
            else:
                text = choice.get("text")
            if isinstance(text, str):
                state.text.append(text)
            if choice.get("finish_reason") is not None:
                state.finish_reason = choice["finish_reason"]
            if isinstance(choice.get("logprobs"), dict):
                state.logprobs = _extend(state.logprobs, choice["logprobs"])

    def answer(self) -> dict:
        choices = []
        for index, state in sorted(self._choices.items()):
            text = "".join(state.text)
            body = {"message": {"role": state.role, "content": text}} if self.chat else {"text": text}
            choices.append({"index": index, **body, "logprobs": state.logprobs,
                            "finish_reason": state.finish_reason})
        answer = {**self._head, "object": "chat.completion" if self.chat else "text_completion",
                  "choices": choices, "usage": self._usage}
        if self._error is not None:
            answer["error"] = self._error
        return answer


def _extend(assembled: dict | None, delta: dict) -> dict:
    """Per-position lists of one chunk's logprobs appended (in place) to those of the chunks before it."""
    merged = assembled if assembled is not None else {}
    for key, value in delta.items():
        if not isinstance(value, list):
            merged.setdefault(key, value)
            continue
        if not isinstance(merged.get(key), list):
            merged[key] = []
        merged[key].extend(value)
    return merged


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _list(value: object) -> list:
    return value if isinstance(value, list) else []

"""Sampled traffic records -> scored `Observation`s, and a dataset line's user input (pure).

The method (what is tested, and why) is described in docs/drift.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kubetune.api import answer_scores, serving

VALUE_DECIMALS = 6  # the profile's values are rounded so; window values too, so ties stay ties
ENTROPY_FLOOR = 1e-12  # as the trainer: p * log(max(p, 1e-12))


@dataclass(frozen=True)
class Observation:
    """One scored input from sampled traffic."""

    text: str  # what the user sent (classification: the input; generation: prompt / non-assistant messages)
    confidence: float  # classification: max prob; generation: mean top-1 token probability (answer_scores)
    entropy: float | None  # predictive entropy (nats): of the class probs; generation: mean top-K entropy


def observations(record: dict) -> list[Observation]:
    """The scored inputs of one sample record (`kubetune_agent.proxy` writes them): one per input of a
    `/classify` (batched inputs included), one per choice of a completion or chat completion that carries
    logprobs (scored as `kubetune_agent.plan.scores`: `answer_scores.answer_score`). A streamed answer's
    record holds the stream assembled into the non-streamed shape; older agents' stream records hold
    none. None for failed requests (status != 200, or an error inside the stream) and answers without
    probabilities."""
    if not isinstance(record, dict) or record.get("status") != 200:
        return []
    request, response = record.get("request"), record.get("response")
    if not isinstance(request, dict) or not isinstance(response, dict) or "error" in response:
        return []
    path = record.get("path")
    if path == serving.ENGINE_CLASSIFY:
        return _classified(request, response)
    if path == serving.ENGINE_COMPLETIONS:
        prompt = request.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else (
            [p if isinstance(p, str) else "" for p in prompt]  # token-id prompts have no text
            if isinstance(prompt, list) and prompt and not all(_is_int(t) for t in prompt) else [""])
        return _generated(response, prompts, request.get("n"), chat=False)
    if path == serving.ENGINE_CHAT:
        return _generated(response, [_chat_input(request.get("messages"))], request.get("n"), chat=True)
    return []


def _classified(request: dict, response: dict) -> list[Observation]:
    inputs = request.get("input")
    texts = [inputs] if isinstance(inputs, str) else (inputs if isinstance(inputs, list) else [])
    found = []
    for position, item in enumerate(_list(response.get("data"))):
        if not isinstance(item, dict):
            continue
        index = item.get("index", position)
        probs = [float(p) for p in _list(item.get("probs")) if _number(p)]
        if not probs or not _is_int(index) or not 0 <= index < len(texts) or not isinstance(texts[index], str):
            continue
        entropy = -sum(p * math.log(max(p, ENTROPY_FLOOR)) for p in probs)
        found.append(Observation(texts[index], round(max(probs), VALUE_DECIMALS), round(entropy, VALUE_DECIMALS)))
    return found


def _generated(response: dict, prompts: list[str], n: object, *, chat: bool) -> list[Observation]:
    per_prompt = n if _is_int(n) and n >= 1 else 1
    found = []
    for position, choice in enumerate(_list(response.get("choices"))):
        score = answer_scores.answer_score(answer_scores.choice_positions(choice, chat=chat))
        if score is None:
            continue
        index = choice.get("index", position)
        prompt = index // per_prompt if _is_int(index) else -1
        text = prompts[prompt] if 0 <= prompt < len(prompts) else ""
        found.append(Observation(text, round(score[0], VALUE_DECIMALS), round(score[1], VALUE_DECIMALS)))
    return found


def example_input(fields: dict) -> str:
    """What a user sends in one dataset line of any format (never the completion or the label): the
    holdout texts a reference compares windows with."""
    if isinstance(fields.get("messages"), list):
        return _chat_input(fields["messages"])
    return str(fields.get("prompt") or fields.get("text") or "")


def _chat_input(messages: object) -> str:
    """The non-assistant messages' text, joined as the trainer joins them for the profile's vocabulary."""
    parts = []
    for message in _list(messages):
        if not isinstance(message, dict) or message.get("role") == "assistant":
            continue
        content = message.get("content")
        if isinstance(content, list):  # OpenAI content parts: the text ones
            content = "\n".join(p["text"] for p in content
                                if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str))
        if isinstance(content, str):
            parts.append(content)
    return " ".join(parts)


def _list(value: object) -> list:
    return value if isinstance(value, list) else []


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)



def rounded_values(values: object) -> list[float]:
    """The finite numbers of a profile's list, rounded as window values are."""
    return [round(float(v), VALUE_DECIMALS) for v in _list(values) if _number(v)]

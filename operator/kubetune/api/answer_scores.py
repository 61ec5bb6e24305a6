"""How a generated answer is scored for drift, alike in the trainer's reference and in sampled traffic.

Per generated position: the probability of the most likely next token (confidence) and the entropy of
the top `TOP_LOGPROBS` next-token distribution, renormalised (entropy). An answer scores the mean over
its positions. The top-1 probability, unlike the chosen token's, means the same under sampled and greedy
decoding. docs/drift.md explains the choice.
"""

from __future__ import annotations

import math

TOP_LOGPROBS = 5  # top logprobs per position the agent asks of the engine (vLLM's default cap is 20)
REFERENCE_MAX_TOKENS = 32  # tokens the trainer generates per holdout prompt for the reference


def position_score(top: list[float]) -> tuple[float, float] | None:
    """(top-1 probability, entropy in nats of the top-`TOP_LOGPROBS` renormalised) from one position's
    top logprobs, in any order; None when there is no finite value."""
    values = sorted((v for v in top if _finite(v)), reverse=True)[:TOP_LOGPROBS]
    if not values:
        return None
    probs = [math.exp(v) for v in values]
    total = sum(probs)
    entropy = -sum((p / total) * math.log(p / total) for p in probs if p > 0)
    return probs[0], max(0.0, entropy)


def answer_score(positions: list[list[float]]) -> tuple[float, float] | None:
    """(mean confidence, mean entropy) over an answer's positions; None for an answer without any."""
    scored = [s for s in (position_score(top) for top in positions) if s is not None]
    if not scored:
        return None
    return (sum(c for c, _ in scored) / len(scored), sum(e for _, e in scored) / len(scored))


def choice_positions(choice: object, *, chat: bool) -> list[list[float]]:
    """Each generated position's top logprobs from one OpenAI-shaped choice (vLLM's answer): a chat
    choice's `logprobs.content[].top_logprobs[].logprob`, a completion's `logprobs.top_logprobs[]`
    ({token: logprob}). A position without top logprobs falls back to its chosen token's logprob alone
    (then the entropy of that position is 0). [] when the choice has no logprobs."""
    logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
    if not isinstance(logprobs, dict):
        return []
    positions = []
    if chat:
        for token in _list(logprobs.get("content")):
            if not isinstance(token, dict):
                continue
            top = [t.get("logprob") for t in _list(token.get("top_logprobs")) if isinstance(t, dict)]
            positions.append(_values(top) or _values([token.get("logprob")]))
    else:
        chosen = _list(logprobs.get("token_logprobs"))
        tops = _list(logprobs.get("top_logprobs"))
        for index, value in enumerate(chosen):
            top = tops[index] if index < len(tops) else None
            positions.append(_values(list(top.values())) if isinstance(top, dict) and top else _values([value]))
    return [p for p in positions if p]


def _values(items: list) -> list[float]:
    return [float(v) for v in items if _finite(v)]


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _list(value: object) -> list:
    return value if isinstance(value, list) else []

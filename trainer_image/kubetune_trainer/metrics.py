"""Evaluation metrics and the drift reference profile: plain Python, so they are unit-tested without torch."""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass

WORD = re.compile(r"[a-z0-9']+")


def accuracy(predictions: list[int], labels: list[int]) -> float:
    return sum(p == y for p, y in zip(predictions, labels, strict=True)) / max(len(labels), 1)


def macro_f1(predictions: list[int], labels: list[int]) -> float:
    """Mean F1 over the classes present in the labels or the predictions."""
    classes = set(labels) | set(predictions)
    if not classes:
        return 0.0
    scores = []
    for c in classes:
        tp = sum(p == c and y == c for p, y in zip(predictions, labels, strict=True))
        fp = sum(p == c and y != c for p, y in zip(predictions, labels, strict=True))
        fn = sum(p != c and y == c for p, y in zip(predictions, labels, strict=True))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def perplexity(mean_loss: float) -> float:
    return math.exp(min(mean_loss, 50.0))  # capped: exp overflows long before it means anything


def improved(metric: str, value: float, best: float | None, min_delta: float) -> bool:
    """Whether `value` beats `best` by more than `min_delta` (loss and perplexity go down)."""
    if best is None:
        return True
    if metric in ("eval_loss", "perplexity"):
        return value < best - min_delta
    return value > best + min_delta


def summary_stats(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]

    return {
        "count": len(values),
        "mean": statistics.fmean(values),
        "std": statistics.pstdev(values),
        "min": ordered[0],
        "p05": pct(0.05),
        "p50": pct(0.5),
        "p95": pct(0.95),
        "max": ordered[-1],
    }


def histogram(values: list[float], edges: list[float]) -> list[int]:
    counts = [0] * (len(edges) - 1)
    for value in values:
        for i in range(len(counts)):
            last = i == len(counts) - 1
            if edges[i] <= value < edges[i + 1] or (last and value == edges[-1]):
                counts[i] += 1
                break
    return counts


def vocabulary(texts: list[str], limit: int = 20_000) -> dict[str, int]:
    """Lower-cased word counts of the training inputs (for out-of-vocabulary rates in drift analysis)."""
    counts = Counter(word for text in texts for word in WORD.findall(text.lower()))
    return dict(counts.most_common(limit))


def drift_profile(*, input_lengths: list[int], texts: list[str], confidences: list[float], entropies: list[float],
                  kind: str, decoding: dict | None = None,
                  teacher_forced: tuple[list[float], list[float]] | None = None, sample_limit: int = 5000) -> dict:
    """The reference the drift detector compares production windows against.

    Raw per-example values are kept (up to `sample_limit`) so thresholds can be calibrated later by
    bootstrapping windows from the holdout, not just compared to a mean. `decoding`: how generated
    answers were scored (causal LM); `teacher_forced`: (confidences, entropies) of the reference tokens,
    kept as a diagnostic next to the generated answers' values.
    """
    unit = [i / 10 for i in range(11)]
    profile = {
        # classification: max softmax probability; causal LM: top-1 probability of its own greedy answers
        # (with `decoding`), or of the reference tokens (profiles published before answers were scored)
        "kind": kind,
        "holdoutSize": len(confidences),
        "inputTokens": summary_stats([float(n) for n in input_lengths]),
        "vocabulary": vocabulary(texts),
        "confidence": {
            **summary_stats(confidences),
            "histogram": {"edges": unit, "counts": histogram(confidences, unit)},
            "values": [round(v, 6) for v in confidences[:sample_limit]],
        },
        "entropy": {**summary_stats(entropies), "values": [round(v, 6) for v in entropies[:sample_limit]]},
    }
    if decoding is not None:
        profile["decoding"] = decoding
    if teacher_forced is not None:
        profile["teacherForced"] = {
            name: {**summary_stats(values), "values": [round(v, 6) for v in values[:sample_limit]]}
            for name, values in zip(("confidence", "entropy"), teacher_forced, strict=True)}
    return profile


# --- decisions the training loop takes (pure, unit-tested) -------------------------------------------

SPIKE_WINDOW = 20  # steps of history before the loss-spike guard is armed
SPIKE_FACTOR = 4.0  # a step loss this many times the recent mean stops the run...
SPIKE_MIN_RISE = 1.0  # ...if it is also this much above it (near-zero losses jitter by large factors)


def loss_guard(step: int, loss: float, recent: list[float]) -> tuple[str, str] | None:
    """(reason, message) when training must stop: a NaN/inf loss, or a spike over the recent mean."""
    if not math.isfinite(loss):
        return "NonFiniteLoss", f"loss became {loss} at step {step}; lower the learning rate or use FP32/BF16"
    if len(recent) < SPIKE_WINDOW:
        return None
    mean = sum(recent) / len(recent)
    if loss > max(SPIKE_FACTOR * mean, mean + SPIKE_MIN_RISE):
        return "LossSpike", (f"loss {loss:.4f} at step {step} is over {SPIKE_FACTOR}x the mean of the last "
                             f"{len(recent)} steps ({mean:.4f}); lower the learning rate")
    return None


@dataclass(frozen=True)
class EvalDecision:
    best: float | None
    stale: int  # evaluations without an improvement that counts for early stopping
    plateau: int  # evaluations without an improvement that counts for freeze-thaw
    thaw: bool  # unfreeze more blocks now
    stop: bool  # stop training now


def after_evaluation(value: float, *, metric: str, best: float | None, stale: int, plateau: int,
                     stop_patience: int | None, stop_min_delta: float, thaw_patience: int | None,
                     thaw_min_delta: float, can_thaw: bool) -> EvalDecision:
    """Early stopping and freeze-thaw after one evaluation.

    A plateau thaws more blocks (when any are left) instead of stopping: new capacity gets a fresh
    patience. Early stopping fires only when nothing is left to thaw.
    """
    new_best = value if improved(metric, value, best, 0.0) else best
    stale = 0 if improved(metric, value, best, stop_min_delta) else stale + 1
    plateau = 0 if improved(metric, value, best, thaw_min_delta) else plateau + 1
    thaw = bool(thaw_patience) and can_thaw and plateau >= thaw_patience
    if thaw:
        stale, plateau = 0, 0
    stop = bool(stop_patience) and stale >= stop_patience
    return EvalDecision(new_best, stale, plateau, thaw, stop)


HISTORY_POINTS = 500  # the manifest's training.history (the loss chart of `kubetune local`'s report)


def bounded_history(history: list[dict], limit: int = HISTORY_POINTS) -> list[dict]:
    """At most `limit` entries of the trainer's history, over the whole run: every evaluation and thaw
    entry (they are few) and the per-step training entries thinned evenly, the first and the last kept,
    in step order. A long run keeps its start (the last `limit` entries alone would lose it)."""
    if len(history) <= limit:
        return list(history)
    steps = [i for i, entry in enumerate(history) if "trainLoss" in entry]
    others = [i for i, entry in enumerate(history) if "trainLoss" not in entry][-limit:]
    room = max(0, limit - len(others))
    if room == 0:
        kept = set()
    elif room == 1 or len(steps) <= room:
        kept = set(steps[-room:])
    else:
        kept = {steps[round(k * (len(steps) - 1) / (room - 1))] for k in range(room)}
    return [history[i] for i in sorted(kept | set(others))]

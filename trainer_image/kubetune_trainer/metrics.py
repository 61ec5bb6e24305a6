"""Evaluation metrics and the drift reference profile: plain Python, so they are unit-tested without torch."""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter

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
                  kind: str, sample_limit: int = 5000) -> dict:
    """The reference the drift detector compares production windows against.

    Raw per-example values are kept (up to `sample_limit`) so thresholds can be calibrated later by
    bootstrapping windows from the holdout, not just compared to a mean.
    """
    unit = [i / 10 for i in range(11)]
    return {
        "kind": kind,  # classification: max softmax probability; causal LM: mean token probability
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

"""What the data stage reports (status.data without job/state/message), computed by pure functions."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from . import leakage
from .data import TRAIN, VALIDATION, LoadedData, Record


def length_summary(lengths: Sequence[int]) -> dict[str, int]:
    """p50, p95 (nearest rank: a length some example has) and max; zeros for an empty split."""
    if not lengths:
        return {"p50": 0, "p95": 0, "max": 0}
    ordered = sorted(lengths)
    return {"p50": nearest_rank(ordered, 50), "p95": nearest_rank(ordered, 95), "max": ordered[-1]}


def nearest_rank(ordered: Sequence[int], percent: float) -> int:
    return ordered[max(0, math.ceil(percent / 100 * len(ordered)) - 1)]


def truncated_share(lengths: Sequence[int], max_tokens: int) -> float:
    """Share of examples longer than max_tokens (the trainer cuts them to it)."""
    return round(sum(length > max_tokens for length in lengths) / len(lengths), 6) if lengths else 0.0


def label_counts(labels: Sequence[str], train: Sequence[Record], validation: Sequence[Record]) -> list[dict]:
    """Every label in id order with its examples per split (text-label data; [] otherwise)."""
    counts = {split: Counter(r.fields["label"] for r in records) for split, records in
              ((TRAIN, train), (VALIDATION, validation))}
    return [{"name": name, TRAIN: counts[TRAIN][name], VALIDATION: counts[VALIDATION][name]} for name in labels]


def duplicates(loaded: LoadedData) -> dict[str, int]:
    """Repeats of normalised text within each split, and validation rows found in training (before Drop)."""
    outcome = loaded.leakage_outcome
    return {"withinTrain": leakage.repeats_within(loaded.train, loaded.fmt),
            "withinValidation": leakage.repeats_within(loaded.validation, loaded.fmt),
            "acrossSplits": outcome.matched if outcome else len(loaded.leakage)}


def build(loaded: LoadedData, lengths: dict[str, Sequence[int]], max_tokens: int, policy: str) -> dict:
    """The report of a dataset that passed validation, the leakage policy and the length check.

    `lengths`: tokens per example of each split before truncation, in the trainer's own tokenization."""
    outcome = loaded.leakage_outcome or leakage.Outcome(policy, list(loaded.leakage))
    return {
        "digest": loaded.digest,
        "examples": {TRAIN: len(loaded.train), VALIDATION: len(loaded.validation)},
        "invalidLines": sum(report.invalid for report in loaded.reports),
        "labels": label_counts(loaded.labels, loaded.train, loaded.validation) if loaded.fmt == "text-label" else [],
        "tokens": {split: length_summary(lengths[split]) for split in (TRAIN, VALIDATION)},
        "truncated": {split: truncated_share(lengths[split], max_tokens) for split in (TRAIN, VALIDATION)},
        "duplicates": duplicates(loaded),
        "leakage": outcome.as_report(),
        "findings": list(loaded.findings),
    }

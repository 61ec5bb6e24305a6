"""The manifest's training.history stays bounded over the whole run (the report's loss chart reads it)."""

from __future__ import annotations

import itertools

from kubetune_trainer import metrics


def run_history(steps: int, eval_every: int) -> list[dict]:
    history = []
    for step in range(1, steps + 1):
        history.append({"step": step, "trainLoss": 1.0 / step})
        if step % eval_every == 0:
            history.append({"step": step, "eval_loss": 0.5 / step, "accuracy": 0.9})
    history.append({"step": steps // 2, "thawedBlocks": 2})
    return sorted(history, key=lambda e: e["step"])


def test_a_short_history_is_kept_whole():
    history = run_history(100, 10)
    assert metrics.bounded_history(history) == history


def test_a_long_history_keeps_the_start_every_evaluation_and_the_end_within_the_limit():
    history = run_history(5000, 100)
    bounded = metrics.bounded_history(history)
    assert len(bounded) <= metrics.HISTORY_POINTS == 500
    train = [e["step"] for e in bounded if "trainLoss" in e]
    assert train[0] == 1 and train[-1] == 5000  # the whole run, not its last 500 entries
    gaps = {b - a for a, b in itertools.pairwise(train)}
    assert max(gaps) - min(gaps) <= 1  # thinned evenly
    assert [e for e in bounded if "eval_loss" in e] == [e for e in history if "eval_loss" in e]
    assert any("thawedBlocks" in e for e in bounded)
    assert [e["step"] for e in bounded] == sorted(e["step"] for e in bounded)


def test_more_evaluations_than_the_limit_keep_the_latest_evaluations():
    history = run_history(1000, 1)
    bounded = metrics.bounded_history(history, limit=50)
    assert len(bounded) == 50 and bounded[-1]["step"] == 1000

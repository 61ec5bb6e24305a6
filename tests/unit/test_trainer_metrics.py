"""The trainer's pure decisions and metrics (no torch)."""

from __future__ import annotations

import math

import pytest

from kubetune_trainer import metrics


def test_accuracy_and_macro_f1():
    assert metrics.accuracy([0, 1, 1, 2], [0, 1, 2, 2]) == 0.75
    # class 0: f1 1; class 1: tp1 fp1 fn0 -> 2/3; class 2: tp1 fp0 fn1 -> 2/3
    assert metrics.macro_f1([0, 1, 1, 2], [0, 1, 2, 2]) == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert metrics.perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert metrics.perplexity(1e9) == math.exp(50)


def test_improved_knows_the_direction_of_each_metric():
    assert metrics.improved("eval_loss", 0.9, 1.0, 0.05)
    assert not metrics.improved("eval_loss", 0.97, 1.0, 0.05)
    assert metrics.improved("accuracy", 0.8, 0.7, 0.05) and not metrics.improved("accuracy", 0.72, 0.7, 0.05)
    assert metrics.improved("perplexity", 3.0, None, 0.0)


def test_loss_guard_nan_and_spike():
    assert metrics.loss_guard(7, float("nan"), [])[0] == "NonFiniteLoss"
    assert "step 7" in metrics.loss_guard(7, float("inf"), [1.0] * 30)[1]
    recent = [2.0] * metrics.SPIKE_WINDOW
    assert metrics.loss_guard(30, 7.9, recent) is None  # under 4x
    reason, message = metrics.loss_guard(30, 8.5, recent)
    assert reason == "LossSpike" and "step 30" in message
    assert metrics.loss_guard(30, 100.0, [2.0] * 5) is None  # not armed yet
    assert metrics.loss_guard(30, 0.05, [0.004] * 30) is None  # tiny losses jitter: needs a real rise too


def _decide(value, **kw):
    args = {"metric": "eval_loss", "best": 1.0, "stale": 0, "plateau": 0, "stop_patience": 2,
            "stop_min_delta": 0.0, "thaw_patience": None, "thaw_min_delta": 0.0, "can_thaw": False}
    args.update(kw)
    return metrics.after_evaluation(value, **args)


def test_early_stopping_after_patience_evaluations_without_improvement():
    first = _decide(1.1)
    assert (first.stale, first.stop, first.best) == (1, False, 1.0)
    second = _decide(1.2, stale=first.stale)
    assert second.stop
    better = _decide(0.5, stale=1)
    assert (better.stale, better.stop, better.best) == (0, False, 0.5)


def test_a_plateau_thaws_before_it_stops_and_resets_patience():
    decision = _decide(1.1, stale=1, plateau=1, thaw_patience=2, can_thaw=True)
    assert decision.thaw and not decision.stop and decision.stale == 0 and decision.plateau == 0
    exhausted = _decide(1.1, stale=1, plateau=1, thaw_patience=2, can_thaw=False)
    assert not exhausted.thaw and exhausted.stop


def test_min_delta_counts_small_gains_as_no_improvement():
    decision = _decide(0.99, stop_min_delta=0.05)
    assert decision.stale == 1 and decision.best == 0.99  # the best is still tracked


def test_drift_profile_keeps_raw_values_for_bootstrapping():
    profile = metrics.drift_profile(input_lengths=[3, 5, 7], texts=["Hello there", "hello again"],
                                    confidences=[0.9, 0.5, 1.0], entropies=[0.1, 0.7, 0.0], kind="classification")
    assert profile["vocabulary"] == {"hello": 2, "there": 1, "again": 1}
    assert profile["inputTokens"]["mean"] == 5 and profile["inputTokens"]["p50"] == 5
    assert profile["confidence"]["values"] == [0.9, 0.5, 1.0]
    assert sum(profile["confidence"]["histogram"]["counts"]) == 3
    assert profile["holdoutSize"] == 3
    assert "decoding" not in profile and "teacherForced" not in profile
    answered = metrics.drift_profile(input_lengths=[3], texts=["hi"], confidences=[0.8], entropies=[0.4],
                                     kind="causal-lm", decoding={"method": "greedy"},
                                     teacher_forced=([0.3, 0.2], [2.0, 2.5]))
    assert answered["confidence"]["values"] == [0.8] and answered["decoding"] == {"method": "greedy"}
    assert answered["teacherForced"]["confidence"]["values"] == [0.3, 0.2]
    assert answered["teacherForced"]["entropy"]["mean"] == 2.25


def test_launcher_exit_codes_keep_the_retry_contract():
    from kubetune_trainer.launch import exit_code_of

    assert exit_code_of(2) == 2  # bad input: never retried by restartPolicy ExitCode
    assert exit_code_of(143) == 143  # retryable
    assert exit_code_of(-15) == 143 and exit_code_of(-9) == 137  # killed by a signal: retried
    assert exit_code_of(0) == 1  # a failure reported without a code is still a failure

"""The shared score of a generated answer (kubetune.api.answer_scores)."""

import math

import pytest

from kubetune.api import answer_scores as scores


def test_position_score_is_top1_probability_and_renormalised_top_k_entropy():
    confidence, entropy = scores.position_score([math.log(0.25), math.log(0.5), math.log(0.25)])
    assert confidence == pytest.approx(0.5)
    assert entropy == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))


def test_position_score_keeps_only_the_top_k_and_skips_non_finite_values():
    values = [math.log(0.9)] + [math.log(0.01)] * 10 + [float("nan"), None]
    confidence, entropy = scores.position_score(values)
    assert confidence == pytest.approx(0.9)
    kept = [0.9] + [0.01] * (scores.TOP_LOGPROBS - 1)
    total = sum(kept)
    assert entropy == pytest.approx(-sum(p / total * math.log(p / total) for p in kept))
    assert scores.position_score([float("-inf"), "x"]) is None


def test_answer_score_averages_positions_and_is_none_without_any():
    assert scores.answer_score([]) is None
    confidence, entropy = scores.answer_score([[0.0], [math.log(0.5), math.log(0.5)]])
    assert confidence == pytest.approx(0.75)
    assert entropy == pytest.approx(math.log(2) / 2)


def test_choice_positions_reads_completion_and_chat_shapes():
    completion = {"logprobs": {"tokens": ["a", "b"], "token_logprobs": [-0.1, -0.2],
                               "top_logprobs": [{"a": -0.1, "c": -2.0}, None]}}
    assert scores.choice_positions(completion, chat=False) == [[-0.1, -2.0], [-0.2]]
    chat = {"logprobs": {"content": [
        {"token": "a", "logprob": -0.1, "top_logprobs": [{"token": "a", "logprob": -0.1},
                                                         {"token": "c", "logprob": -2.0}]},
        {"token": "b", "logprob": -0.3, "top_logprobs": []}]}}
    assert scores.choice_positions(chat, chat=True) == [[-0.1, -2.0], [-0.3]]
    assert scores.choice_positions({"logprobs": None}, chat=True) == []
    assert scores.choice_positions("junk", chat=False) == []

"""Drift statistics (kubetune_operator.stats) on synthetic data: record parsing, calibration, false-positive
rate on windows from the reference distribution, power on shifted windows, diagnostics vs triggers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kubetune.api import answer_scores, serving
from kubetune_agent import plan
from kubetune_operator import stats
from kubetune_operator.stats import Observation, Thresholds

CLASSES = 10
DIM = 32
WORDS = [f"w{i}" for i in range(300)]
VOCABULARY = {w: 3 for w in WORDS[:250]}  # w250..w299 are out of vocabulary


# --- a synthetic classifier's world -------------------------------------------------------------------


class World:
    """Inputs of 10 topics: a text of 3-11 words, an embedding near its topic's centre, and the answer of a
    classifier whose margin on the right topic is `margin` (smaller: less confident)."""

    def __init__(self, seed: int = 1):
        self.rng = np.random.default_rng(seed)
        self.centres = self.rng.normal(0, 1, (CLASSES, DIM)) * 3 / math.sqrt(DIM)

    def sample(self, size: int, *, margin: float = 6.0, topics: list[int] | None = None, words: list[str] = WORDS[:280],
               extra_words: int = 0, offset: float = 0.0):
        rng = self.rng
        topic = rng.choice(topics or list(range(CLASSES)), size)
        logits = rng.normal(0, 1, (size, CLASSES))
        logits[np.arange(size), topic] += margin
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        vectors = self.centres[topic] + rng.normal(0, 0.6, (size, DIM)) + offset
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        texts = [" ".join(rng.choice(words, rng.integers(3, 12) + extra_words)) for _ in range(size)]
        observations = [Observation(t, round(float(p.max()), 6), round(float(-(p * np.log(p)).sum()), 6))
                        for t, p in zip(texts, probs, strict=True)]
        return observations, vectors.tolist()

    def profile(self, holdout: list[Observation], kind: str = "classification") -> dict:
        return {"kind": kind, "holdoutSize": len(holdout), "vocabulary": VOCABULARY,
                "confidence": {"values": [o.confidence for o in holdout]},
                "entropy": {"values": [o.entropy for o in holdout]}}


@pytest.fixture(scope="module")
def world() -> World:
    return World()


@pytest.fixture(scope="module")
def setup(world):
    holdout, vectors = world.sample(150)
    reference = stats.build_reference(world.profile(holdout), [o.text for o in holdout], vectors)
    return reference, stats.calibrate(reference, 100, Thresholds(), seed=0)


# --- observations -------------------------------------------------------------------------------------


def record(path: str, request: dict, response: object, status: int = 200) -> dict:
    return {"time": "2025-01-01T00:00:00.000Z", "alias": "ns/a", "version": "ns/a@0123456789ab", "path": path,
            "status": status, "latency": 0.01, "confidence": None, "request": request, "response": response}


def classified(*rows: list[float]) -> dict:
    return {"object": "list", "data": [{"index": i, "label": "x", "probs": p, "num_classes": len(p)}
                                       for i, p in enumerate(rows)], "usage": {}}


def test_classify_records_give_one_observation_per_input():
    [one] = stats.observations(record(serving.ENGINE_CLASSIFY, {"model": "ns/a", "input": "hello there"},
                                      classified([0.7, 0.2, 0.1])))
    assert one.text == "hello there" and one.confidence == 0.7
    assert one.entropy == pytest.approx(-(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)), abs=1e-6)
    batch = record(serving.ENGINE_CLASSIFY, {"model": "ns/a", "input": ["a b", "c d"]},
                   classified([0.5, 0.5], [1.0, 0.0]))
    first, second = stats.observations(batch)
    assert (first.text, first.confidence, first.entropy) == ("a b", 0.5, pytest.approx(math.log(2), abs=1e-6))
    assert (second.text, second.confidence, second.entropy) == ("c d", 1.0, pytest.approx(0.0, abs=1e-6))
    assert [(o.confidence, o.entropy) for o in stats.observations(batch)] == [
        (round(c, 6), pytest.approx(e, abs=1e-6)) for c, e in plan.scores(serving.ENGINE_CLASSIFY, batch["response"])]


def test_completion_and_chat_records_use_the_agents_scores():
    logprobs = [-0.1, -0.5, -2.0]
    completion = record(serving.ENGINE_COMPLETIONS, {"model": "ns/a", "prompt": "tell me", "logprobs": 1},
                        {"choices": [{"index": 0, "text": "x", "logprobs": {"token_logprobs": logprobs}}]})
    [one] = stats.observations(completion)
    assert one.text == "tell me" and one.entropy == 0.0  # chosen tokens only: no alternatives
    [(confidence, entropy)] = plan.scores(serving.ENGINE_COMPLETIONS, completion["response"])
    assert (one.confidence, one.entropy) == (pytest.approx(confidence, abs=1e-6), pytest.approx(entropy, abs=1e-6))
    chat = record(serving.ENGINE_CHAT, {"model": "ns/a", "logprobs": True, "messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "how are you"}]},
        {"choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                      "logprobs": {"content": [{"token": "ok", "logprob": -0.2}]}}]})
    [one] = stats.observations(chat)
    assert one.text == "be brief hi how are you"
    assert one.confidence == pytest.approx(math.exp(-0.2), abs=1e-6)
    # a list of prompts: choice i answers prompt i
    two = record(serving.ENGINE_COMPLETIONS, {"prompt": ["p one", "p two"], "logprobs": 0},
                 {"choices": [{"index": i, "text": "", "logprobs": {"token_logprobs": [-1.0]}} for i in (0, 1)]})
    assert [o.text for o in stats.observations(two)] == ["p one", "p two"]


def test_a_streamed_answers_record_is_scored_with_its_top_logprobs():
    """The agent records a stream assembled into the non-streamed shape, with the top logprobs it asked for."""
    top = [{"token": "a", "logprob": math.log(0.5)}, {"token": "b", "logprob": math.log(0.25)},
           {"token": "c", "logprob": math.log(0.25)}]
    answer = {"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "aa"},
              "logprobs": {"content": [{"token": "a", "logprob": math.log(0.5), "top_logprobs": top}] * 2},
              "finish_reason": "length"}]}
    streamed = record(serving.ENGINE_CHAT, {"model": "ns/a", "stream": True,
                                            "messages": [{"role": "user", "content": "hi"}]}, answer)
    [one] = stats.observations(streamed)
    assert (one.text, one.confidence) == ("hi", 0.5)
    assert one.entropy == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)), abs=1e-6)


@pytest.mark.parametrize("sample", [
    record(serving.ENGINE_CLASSIFY, {"input": "x"}, {"object": "error", "message": "boom"}, status=500),
    record(serving.ENGINE_CLASSIFY, {"input": "x"}, {"object": "error", "message": "bad"}, status=400),
    record(serving.ENGINE_COMPLETIONS, {"prompt": "x", "stream": True}, 'data: {"choices": []}\n\ndata: [DONE]\n\n'),
    record(serving.ENGINE_COMPLETIONS, {"prompt": "x", "stream": True}, None),
    record(serving.ENGINE_COMPLETIONS, {"prompt": "x", "stream": True}, {
        "choices": [{"index": 0, "text": "y", "logprobs": {"token_logprobs": [-0.1]}}], "error": {"code": 500}}),
    record(serving.ENGINE_COMPLETIONS, {"prompt": "x"}, {"choices": [{"index": 0, "text": "y", "logprobs": None}]}),
    record(serving.ENGINE_CHAT, {"messages": [{"role": "user", "content": "x"}]},
           {"choices": [{"index": 0, "message": {"content": "y"}, "logprobs": None}]}),
    record(serving.ENGINE_CLASSIFY, {"input": "x"}, {"data": [{"index": 0, "label": "a"}]}),
    record("/v1/models", {}, {"data": []}),
    {"status": 200},
], ids=["5xx", "4xx", "stream-text", "stream-none", "stream-error", "no-logprobs", "chat-no-logprobs", "no-probs",
        "other-path", "truncated"])
def test_records_without_scores_give_nothing(sample):
    assert stats.observations(sample) == []


def test_words_are_the_profiles_words():
    from kubetune_trainer import metrics

    assert stats.WORD.pattern == metrics.WORD.pattern


def test_thresholds_from_the_spec():
    assert Thresholds.from_spec(None) == Thresholds()
    assert Thresholds.from_spec({"sigmas": 4, "pValue": 0.05, "bootstraps": 200, "triggerOnDiagnostics": ["oov"]}) \
        == Thresholds(4.0, 0.05, 200, ("oov",))
    with pytest.raises(ValueError, match="unknown"):
        Thresholds(trigger_on_diagnostics=("lengthy",))


# --- reference and calibration -------------------------------------------------------------------------


def test_calibration_is_deterministic_and_json(world, setup):
    reference, calibration = setup
    assert stats.calibrate(reference, 100, Thresholds(), seed=0) == calibration
    assert stats.calibrate(reference, 100, Thresholds(), seed=1) != calibration
    assert json.loads(json.dumps(reference)) == reference
    assert json.loads(json.dumps(calibration)) == calibration
    window, vectors = world.sample(100)
    result = stats.analyse(reference, calibration, window, vectors, Thresholds())
    stored = stats.analyse(json.loads(json.dumps(reference)), json.loads(json.dumps(calibration)), window, vectors,
                           Thresholds())
    assert json.loads(json.dumps(result)) == result == stored
    assert set(result) == {"requests", "windowSize", "kind", "triggers", "diagnostics", "drifted", "summary"}
    assert set(result["triggers"]) == {"confidence", "entropy"}
    assert set(result["diagnostics"]) == {"inputLength", "oov", "embedding"}
    assert {"value", "reference", "threshold", "fired"} <= set(result["triggers"]["confidence"])
    assert {"statistic", "threshold", "fired"} <= set(result["triggers"]["entropy"])
    assert {"centroidCosine", "centroidThreshold", "mmd", "mmdThreshold", "fired"} <= set(
        result["diagnostics"]["embedding"])


def test_thresholds_widen_for_smaller_windows_and_stricter_settings(setup):
    reference, _ = setup
    small, large = (stats.calibrate(reference, m, Thresholds())["thresholds"] for m in (30, 1000))
    assert small["confidence"] < large["confidence"]
    assert small["twoSample"] > large["twoSample"] and small["mmd"] > large["mmd"]
    strict = stats.calibrate(reference, 100, Thresholds(sigmas=5, p_value=0.001))["thresholds"]
    loose = stats.calibrate(reference, 100, Thresholds(sigmas=2, p_value=0.1))["thresholds"]
    assert strict["confidence"] < loose["confidence"] and strict["twoSample"] >= loose["twoSample"]


def fire_rates(results: list[dict]) -> dict[str, float]:
    counts: dict[str, int] = {"drifted": sum(r["drifted"] for r in results)}
    for result in results:
        for group in ("triggers", "diagnostics"):
            for name, test in result[group].items():
                counts[name] = counts.get(name, 0) + test["fired"]
    return {name: count / len(results) for name, count in counts.items()}


@pytest.mark.parametrize(("size", "windows"), [(100, 200), (300, 60)])  # 300: larger than the holdout (150)
def test_windows_from_the_reference_distribution_seldom_fire(world, setup, size, windows):
    reference, calibration = setup
    if size != calibration["windowSize"]:
        calibration = stats.calibrate(reference, size, Thresholds())
    results = [stats.analyse(reference, calibration, *world.sample(size), Thresholds()) for _ in range(windows)]
    rates = fire_rates(results)
    # p = 0.01 per two-sample test, 3 sigma per mean test: the holdout's own sampling error is part of the
    # null, so a fresh window (not a resample of the holdout) fires at about the nominal rate
    assert rates["drifted"] <= 0.03, rates
    assert all(rate <= 0.04 for rate in rates.values()), rates


def test_a_less_confident_window_fires_the_triggers(world, setup):
    reference, calibration = setup
    window, vectors = world.sample(100, margin=4.0)
    result = stats.analyse(reference, calibration, window, vectors, Thresholds())
    assert result["triggers"]["confidence"]["fired"] and result["triggers"]["entropy"]["fired"], result
    assert result["drifted"]
    assert result["summary"].startswith("drift: confidence ")
    # 30% of the traffic on something the model cannot tell apart: the entropy tail moves
    confident, confident_vectors = world.sample(70)
    lost, lost_vectors = world.sample(30, margin=0.0)
    mixed = stats.analyse(reference, calibration, confident + lost, confident_vectors + lost_vectors, Thresholds())
    assert mixed["triggers"]["entropy"]["fired"] and mixed["drifted"], mixed
    # more confident than the holdout is not harm (one-sided tests)
    sure = stats.analyse(reference, calibration, *world.sample(100, margin=9.0), Thresholds())
    assert not sure["triggers"]["confidence"]["fired"] and not sure["triggers"]["entropy"]["fired"], sure


def test_input_drift_is_a_diagnostic_unless_configured(world, setup):
    reference, calibration = setup
    # narrower topics, longer inputs full of unknown words, moved embeddings: the model is as sure as ever
    window, vectors = world.sample(100, topics=[0, 1], words=WORDS[240:], extra_words=6, offset=0.2)
    result = stats.analyse(reference, calibration, window, vectors, Thresholds())
    diagnostics = result["diagnostics"]
    assert diagnostics["inputLength"]["fired"] and diagnostics["inputLength"]["z"] > 3
    assert diagnostics["oov"]["fired"] and diagnostics["embedding"]["fired"]
    assert set(diagnostics["embedding"]["firedTests"]) == {"centroid", "mmd"}
    assert not any(t["fired"] for t in result["triggers"].values())
    assert not result["drifted"]
    assert result["summary"].endswith("diagnostics: inputLength, oov, embedding")
    configured = Thresholds(trigger_on_diagnostics=("oov",))
    result = stats.analyse(reference, calibration, window, vectors, configured)
    assert result["drifted"] and "oov (trigger)" in result["summary"]
    # without window embeddings the embedding diagnostic is absent, the rest unchanged
    assert "embedding" not in stats.analyse(reference, calibration, window, None, Thresholds())["diagnostics"]


def test_causal_lm_runs_the_two_sample_test_on_token_probabilities(world):
    rng = np.random.default_rng(3)
    holdout = [Observation("say something", float(p), None) for p in rng.beta(8, 2, 200).round(6)]
    profile = world.profile(holdout, kind="causal-lm")
    profile["entropy"] = {"values": rng.gamma(2, 0.5, 200).round(6).tolist()}  # teacher-forced: not comparable
    reference = stats.build_reference(profile, [o.text for o in holdout], None)
    assert reference["twoSample"]["of"] == "confidence" and reference["twoSample"]["direction"] == "less"
    calibration = stats.calibrate(reference, 100, Thresholds())
    same = [Observation("say it", float(p), None) for p in rng.beta(8, 2, 100)]
    worse = [Observation("say it", float(p), None) for p in rng.beta(5, 3, 100)]
    assert not stats.analyse(reference, calibration, same, None, Thresholds())["drifted"]
    result = stats.analyse(reference, calibration, worse, None, Thresholds())
    assert result["triggers"]["entropy"]["of"] == "confidence" and result["triggers"]["entropy"]["fired"]
    assert "token-probability KS" in result["summary"] and result["drifted"]
    assert "embedding" not in result["diagnostics"]


def generated_answers(rng: np.random.Generator, count: int, *, lost: float = 0.0) -> list[Observation]:
    """Answers scored as the trainer and the agent score them (`answer_scores`): per position, top-5
    logprobs of a softmax whose leading logit stands `margin` above the rest; a `lost` share of the
    answers comes from a model that barely prefers any token."""
    found = []
    for index in range(count):
        margin = 0.3 if index < lost * count else rng.uniform(3.0, 6.0)
        positions = []
        for _ in range(int(rng.integers(4, 12))):
            logits = rng.normal(0, 0.5, 50)
            logits[0] += margin
            logprobs = logits - np.log(np.exp(logits).sum())
            positions.append(sorted(logprobs.tolist(), reverse=True)[:answer_scores.TOP_LOGPROBS])
        confidence, entropy = answer_scores.answer_score(positions)
        found.append(Observation("say something", round(confidence, 6), round(entropy, 6)))
    return found


def test_generated_answers_get_the_entropy_trigger_when_the_profile_scored_them(world):
    rng = np.random.default_rng(5)
    holdout = generated_answers(rng, 200)
    profile = {**world.profile(holdout, kind="causal-lm"),
               "decoding": {"method": "greedy", "maxTokens": 32, "topLogprobs": 5}}
    reference = stats.build_reference(profile, [o.text for o in holdout], None)
    assert reference["twoSample"]["of"] == "entropy" and reference["twoSample"]["direction"] == "greater"
    calibration = stats.calibrate(reference, 60, Thresholds())
    quiet = [stats.analyse(reference, calibration, generated_answers(rng, 60), None, Thresholds())
             for _ in range(60)]
    rates = fire_rates(quiet)
    assert rates["drifted"] <= 0.05 and rates["entropy"] <= 0.05, rates  # p 0.01 and 3 sigma: 0-2 of 60
    # a quarter of the answers lost: the entropy tail moves and the KS test fires
    shifted = stats.analyse(reference, calibration, generated_answers(rng, 60, lost=0.25), None, Thresholds())
    assert shifted["triggers"]["entropy"]["fired"] and shifted["drifted"], shifted
    assert "entropy KS" in shifted["summary"]
    # observations without entropy (an engine that gave chosen-token logprobs only): no KS statistic, the
    # confidence trigger still judges the window
    bare = [Observation(o.text, o.confidence, None) for o in generated_answers(rng, 60, lost=0.6)]
    result = stats.analyse(reference, calibration, bare, None, Thresholds())
    assert result["triggers"]["entropy"]["statistic"] is None and "entropy KS n/a" in result["summary"]
    assert result["triggers"]["confidence"]["fired"] and result["drifted"]


def test_leave_one_out_oov_for_holdouts_taken_from_the_training_data():
    vocabulary = {"book": 5, "a": 9, "flight": 1}
    assert stats.oov_rate("book a flight", vocabulary) == 0.0
    assert stats.oov_rate("book a flight", vocabulary, leave_one_out=True) == pytest.approx(1 / 3)
    assert stats.oov_rate("", vocabulary) == 0.0


def test_edge_cases(setup):
    reference, calibration = setup
    empty = stats.analyse(reference, calibration, [], None, Thresholds())
    assert empty["requests"] == 0 and not empty["drifted"] and empty["triggers"] == {}
    with pytest.raises(ValueError, match="fewer than 2"):
        stats.build_reference({"kind": "classification", "confidence": {"values": [0.9]}}, [], None)
    with pytest.raises(ValueError, match="kind"):
        stats.build_reference({"kind": "regression", "confidence": {"values": [0.9, 0.8]}}, [], None)
    window = [Observation("w1 w2", 0.9, 0.3)] * 5
    with pytest.raises(ValueError, match="window embeddings"):
        stats.analyse(reference, calibration, window, [[0.0] * DIM] * 4, Thresholds())

"""Drift of a generative adapter, end to end: the trainer's reference (its own greedy answers to holdout
prompts, scored with answer_scores) against windows of answers served by the CPU engine through the agent.

A tiny Llama is first taught a clear rule (words follow a fixed cycle; `kubetune_testing.cycle_lm`), so that it is
confident in distribution; a LoRA adapter is then trained on it with the real trainer for completions
and for chat. Windows of fresh prompts from the same generator must stay quiet at the calibrated rate;
windows of prompts in an unseen vocabulary must fire.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kubetune.api import answer_scores, serving
from kubetune_operator import stats
from kubetune_operator.stats import Observation, Thresholds
from kubetune_testing import cycle_lm
from tests.engine.conftest import EngineProcess
from tests.trainer.conftest import adapter_dir, job_spec, make_config, run_in_process, write_jsonl

from .conftest import Published, desired, publish

WINDOW = 30
QUIET_WINDOWS = 6
SHIFTED_WINDOWS = 2


@pytest.fixture(scope="module")
def taught(tmp_path_factory) -> Path:
    return cycle_lm.taught_llama(tmp_path_factory.mktemp("generative-base"))


def trained(base: Path, root: Path, fmt: str, store_root: Path) -> Published:
    data = write_jsonl(root / f"{fmt}.jsonl", cycle_lm.rows(fmt, 320, seed=1))
    spec = job_spec(base, data, root / f"out-{fmt}", dataset__format=fmt, dataset__validationSplit=0.25,
                    method__lora__rank=8, method__lora__alpha=16, training__maxSteps=10,
                    training__learningRate=1e-3, training__evalSteps=10)
    config = make_config(spec, name=f"drift-{fmt}")
    with cycle_lm.one_thread():
        manifest = run_in_process(config, root / f"work-{fmt}")
    return publish(store_root, adapter_dir(config, manifest), "v1", f"drift-{fmt.split('-')[0]}")


def observation(agent, version: Published, prompt: str, chat: bool) -> Observation | None:
    """One request through the agent, scored as the agent scores sampled answers (answer_scores)."""
    body = cycle_lm.request_body(version.alias, prompt, chat=chat, max_tokens=answer_scores.REFERENCE_MAX_TOKENS,
                                 top_logprobs=answer_scores.TOP_LOGPROBS)
    answer = agent.post(serving.ENGINE_CHAT if chat else serving.ENGINE_COMPLETIONS, body)
    assert answer.status == 200 and answer.version == version.name, answer.text
    score = answer_scores.answer_score(answer_scores.choice_positions(answer.json["choices"][0], chat=chat))
    return Observation(prompt, round(score[0], 6), round(score[1], 6)) if score else None


def verdicts(agent, version: Published, calibration: dict, reference: dict, prompts, chat: bool) -> list[dict]:
    found = []
    for window in prompts:
        observations = [o for o in (observation(agent, version, p, chat) for p in window) if o is not None]
        found.append(stats.analyse(reference, calibration, observations, None, Thresholds()))
    return found


@pytest.mark.parametrize("fmt", ["prompt-completion", "chat"])
def test_generative_drift_is_quiet_in_distribution_and_fires_on_shifted_prompts(
        fmt, taught, tmp_path, store_root, make_agent, monkeypatch):
    version = trained(taught, tmp_path, fmt, store_root)
    profile = version.document["driftProfile"]
    assert profile["decoding"]["method"] == "greedy" and profile["decoding"]["answered"] >= 60
    # the bias the reference removes: the model's own answers are more confident than the reference tokens
    assert profile["confidence"]["mean"] > profile["teacherForced"]["confidence"]["mean"]
    reference = stats.build_reference(profile, [], None)
    assert reference["twoSample"]["of"] == "entropy"
    calibration = stats.calibrate(reference, WINDOW, Thresholds())

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    engine = EngineProcess(taught, tmp_path / "engine", "--max-lora-rank", "8", served_name="tiny-llama")
    (tmp_path / "engine").mkdir()
    engine.start()
    try:
        agent = make_agent(engine, desired(1, version.version(), alias=version.alias))
        agent.wait_loaded({version.name})
        rng, chat = random.Random(11), fmt == "chat"  # fresh prompts from the training generator, not the holdout
        quiet = verdicts(agent, version, calibration, reference,
                         [[cycle_lm.pair(rng)[0] for _ in range(WINDOW)] for _ in range(QUIET_WINDOWS)], chat)
        fired = verdicts(agent, version, calibration, reference,
                         [[cycle_lm.shifted(rng) for _ in range(WINDOW)] for _ in range(SHIFTED_WINDOWS)], chat)
    finally:
        engine.stop()
    summaries = "\n".join(f"{v['requests']} answers: {v['summary']}" for v in quiet + fired)
    # the CPU engine's logprobs leave out the EOS that stopped an answer (vLLM's hold it): an answer that
    # is EOS at once has no positions there, and no score
    assert all(v["requests"] >= WINDOW - 3 for v in quiet + fired), summaries
    # p 0.01 (KS) and 3 sigma (mean): about 1.2% of quiet windows fire; 2 of 6 has odds of about 0.3%
    assert sum(v["drifted"] for v in quiet) <= 1, summaries
    assert all(v["drifted"] and v["triggers"]["entropy"]["fired"] for v in fired), summaries

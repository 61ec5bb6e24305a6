"""Drift of a generative adapter, end to end: the trainer's reference (its own greedy answers to holdout
prompts, scored with answer_scores) against windows the operator's drift pass builds from the agent's
sampled records of clients' plain and streamed requests (no logprobs asked; the agent asks for them).

A tiny Llama is first taught a clear rule (words follow a fixed cycle; `kubetune_testing.cycle_lm`), so it
is confident in distribution; LoRA adapters are trained on it with the real trainer for completions and
chat. Windows of fresh prompts of the same generator must stay quiet; prompts in an unseen vocabulary fire.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest

from kubetune.api import answer_scores, serving
from kubetune.api.validation import validate
from kubetune.clients.storage import ObjectStore, S3Settings
from kubetune_operator import stats
from kubetune_operator.clients import drift_storage
from kubetune_testing import cycle_lm
from kubetune_testing.factories import adapterdeployment
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


def ask(agent, version: Published, prompt: str, *, chat: bool, stream: bool) -> None:
    """A client's request, without logprobs: it gets none back, streamed or not."""
    body = cycle_lm.request_body(version.alias, prompt, chat=chat, max_tokens=answer_scores.REFERENCE_MAX_TOKENS,
                                 top_logprobs=0)
    body = {k: v for k, v in body.items() if k not in ("logprobs", "top_logprobs")}
    answer = agent.post(serving.ENGINE_CHAT if chat else serving.ENGINE_COMPLETIONS, {**body, "stream": stream})
    assert answer.status == 200 and answer.version == version.name, answer.text
    if stream:
        events = [line[len("data: "):] for line in answer.text.splitlines() if line.startswith("data: ")]
        choices = [c for e in events[:-1] for c in json.loads(e)["choices"]]
    else:
        choices = answer.json["choices"]
    assert choices and all(c.get("logprobs") is None for c in choices), answer.text


def drift_pass(version: Published, samples: Path) -> list[dict]:
    """The operator's drift pass over the sample store (`drift_storage.analyse_samples`, as the drift
    shell calls it): the verdicts of the windows it closes, in traffic order."""
    doc = adapterdeployment()
    doc["spec"]["trafficSampling"] = {"rate": 1.0, "uri": f"file://{samples}"}
    doc["spec"]["adapters"][0].update(name=version.adapter, drift={
        "window": {"requests": WINDOW, "minRequests": WINDOW}, "embeddings": False})
    result = validate(doc, local=True)
    assert result.ok, result.errors
    adep = {**doc, "spec": result.defaulted["spec"]}
    analysis = drift_storage.analyse_samples(drift_storage.Analyzer(), ObjectStore(S3Settings()), adep=adep,
                                             adapter=adep["spec"]["adapters"][0], stable={"version": version.name},
                                             manifest=version.document, now="2099-01-01T00:00:00Z")
    assert analysis.problem is None and analysis.open_window["requests"] == 0, analysis
    return analysis.verdicts


def sampled(samples: Path) -> dict[tuple[bool, str], stats.Observation]:
    """(streamed, prompt) -> the observation the operator scores from its sample record."""
    records = [json.loads(line) for path in sorted(samples.rglob("*.jsonl")) for line in path.read_text().splitlines()]
    found = {}
    for record in records:
        [observation] = stats.observations(record)  # every answer scored: it ends with a scored position
        found[bool(record["request"].get("stream")), observation.text] = observation
    return found


@pytest.mark.parametrize("fmt", ["prompt-completion", "chat"])
def test_generative_drift_from_sampled_plain_and_streamed_traffic(fmt, taught, tmp_path, store_root, make_agent,
                                                                 monkeypatch):
    version = trained(taught, tmp_path, fmt, store_root)
    profile = version.document["driftProfile"]
    assert profile["decoding"]["method"] == "greedy" and profile["decoding"]["answered"] >= 60
    # the bias the reference removes: the model's own answers are more confident than the reference tokens
    assert profile["confidence"]["mean"] > profile["teacherForced"]["confidence"]["mean"]

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    engine = EngineProcess(taught, tmp_path / "engine", "--max-lora-rank", "8", served_name="tiny-llama")
    (tmp_path / "engine").mkdir()
    engine.start()
    samples = tmp_path / "samples"
    try:
        agent = make_agent(engine, dataclasses.replace(desired(1, version.version(), alias=version.alias),
                                                       sampling_rate=1.0, sampling_uri=f"file://{samples}"))
        agent.wait_loaded({version.name})
        rng, chat = random.Random(11), fmt == "chat"  # fresh prompts from the training generator, not the holdout
        quiet = [[cycle_lm.pair(rng)[0] for _ in range(WINDOW)] for _ in range(QUIET_WINDOWS)]
        shifted = [[cycle_lm.shifted(rng) for _ in range(WINDOW)] for _ in range(SHIFTED_WINDOWS)]
        for windows in (quiet, shifted):
            for stream in (False, True):  # the same windows, plain then streamed
                for prompt in (p for window in windows for p in window):
                    ask(agent, version, prompt, chat=chat, stream=stream)
        agent.stop()  # flushes the samples
    finally:
        engine.stop()

    verdicts = drift_pass(version, samples)
    assert len(verdicts) == 2 * (QUIET_WINDOWS + SHIFTED_WINDOWS)
    plain_quiet, streamed_quiet = verdicts[:QUIET_WINDOWS], verdicts[QUIET_WINDOWS:2 * QUIET_WINDOWS]
    fired = verdicts[2 * QUIET_WINDOWS:]
    summaries = "\n".join(f"{v['requests']} answers: {v['summary']}" for v in verdicts)
    # streamed answers are sampled as the same scored answers as plain ones, hence the same verdicts
    observed = sampled(samples)
    for (streamed, prompt), observation in observed.items():
        if streamed:
            plain = observed[False, prompt]
            assert (observation.confidence, observation.entropy) == pytest.approx(
                (plain.confidence, plain.entropy), abs=1e-6), prompt
    assert [v["drifted"] for v in streamed_quiet] == [v["drifted"] for v in plain_quiet], summaries
    # p 0.01 (KS) and 3 sigma (mean): about 1.2% of quiet windows fire; 2 of 6 has odds of about 0.3%
    assert sum(v["drifted"] for v in plain_quiet) <= 1, summaries
    assert all(v["drifted"] and v["triggers"]["entropy"]["fired"] for v in fired), summaries
    assert all(v["requests"] == WINDOW and v["version"] == version.name for v in verdicts)
    prompts = {p for window in quiet + shifted for p in window}
    assert set(observed) == {(streamed, p) for p in prompts for streamed in (False, True)}

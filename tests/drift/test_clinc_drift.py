"""Drift detection (kubetune_operator.stats) on real data: a MiniLM LoRA intent classifier on 10 CLINC150 intents.

In-scope traffic never fires a trigger; out-of-scope traffic fires both (the model is hurt); a benign
narrowing to two intents moves the embeddings, not the confidence (a diagnostic only). What runs and
why: docs/testing.md ("Drift on real data"). `pytest -s` prints the measured figures.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from kubetune.api import serving
from kubetune_operator import stats
from tests.conftest import shared_file
from tests.trainer.conftest import adapter_dir, make_config, run_in_process
from tests.trainer.test_minilm_clinc import (
    TRAIN_PER_INTENT,
    clinc_subset,
    minilm_dir,
    minilm_spec,
    with_drift_calibrated_head,
)

WINDOW = 100
WINDOWS = 3  # of each kind of traffic
VERSION = "team-a/intents@0123456789ab"
THRESHOLDS = stats.Thresholds()


@dataclass
class Scored:
    records: list[dict]  # sample records as the agent writes them
    embeddings: list[list[float]]

    def window(self, start: int = 0, size: int = WINDOW) -> Scored:
        return Scored(self.records[start:start + size], self.embeddings[start:start + size])

    def __add__(self, other: Scored) -> Scored:
        return Scored(self.records + other.records, self.embeddings + other.embeddings)


@dataclass
class Clinc:
    manifest: dict
    train_seconds: float
    holdout: list[dict]  # the validation rows ({"text", "label"}), in the profile's order
    holdout_scored: Scored
    reference: dict
    calibration: dict
    in_scope: Scored  # shuffled test utterances of the trained intents
    out_of_scope: Scored
    narrowing: Scored
    narrow_intents: list[str]


def sample_record(text: str, response: dict) -> dict:
    """What `kubetune_agent.proxy` samples for one `/classify` request."""
    alias = VERSION.split("@")[0]
    return {"time": "2025-06-01T12:00:00.000Z", "alias": alias, "version": VERSION, "path": serving.ENGINE_CLASSIFY,
            "status": 200, "latency": 0.01, "confidence": max(response["data"][0]["probs"]),
            "request": {"model": alias, "input": text}, "response": response}


@contextlib.contextmanager
def one_torch_thread():
    """Train and score with one thread: forwards this small spend more time synchronising torch's threads
    than computing, and far more when other processes compete for the 2 cores (3 epochs here: 20 s with
    one thread, from 22 s to 225 s with two, depending on the load)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clinc(tmp_path_factory) -> Clinc:
    with one_torch_thread():
        return _clinc(tmp_path_factory.mktemp("drift-clinc"))


def _clinc(root: Path) -> Clinc:
    from kubetune_engine.embeddings import SentenceEncoder
    from kubetune_engine.models import ModelHost
    from kubetune_engine.server import classification_body

    train_path, validation_path, intents = clinc_subset(root)  # 10 intents x 30 utterances; 200 validation
    spec = with_drift_calibrated_head(minilm_spec(train_path, validation_path, f"file://{root / 'out'}", epochs=3))
    spec["training"]["evalSteps"] = 10_000  # one evaluation, at the end: the profile's holdout pass
    config = make_config(spec, name="drift-clinc")
    started = time.monotonic()
    manifest = run_in_process(config, root / "work")
    train_seconds = time.monotonic() - started

    host = ModelHost(minilm_dir(), served_name="minilm", fidelity="kubetune")  # a classifier: kubetune-cpu
    host.load_base()
    host.load_adapter(VERSION, str(adapter_dir(config, manifest)))
    instance, adapter = host.resolve(VERSION)
    encoder = SentenceEncoder(minilm_dir(), name="all-MiniLM-L6-v2")
    encoder.load()

    def score(texts: list[str]) -> Scored:
        records = [sample_record(t, classification_body(host.classify(instance, adapter, [t]), VERSION))
                   for t in texts]
        return Scored(records, encoder.embed(texts).vectors)

    data = json.loads(shared_file("datasets", "clinc150", "data_full.json").read_text())
    holdout = [json.loads(line) for line in validation_path.read_text().splitlines()]
    holdout_scored = score([row["text"] for row in holdout])
    reference = stats.build_reference(manifest["driftProfile"], [row["text"] for row in holdout],
                                      holdout_scored.embeddings)
    calibration = stats.calibrate(reference, WINDOW, THRESHOLDS, seed=0)

    in_scope = [text for text, intent in data["test"] if intent in intents]  # grouped by intent: shuffle
    random.Random(0).shuffle(in_scope)
    out_of_scope = [text for text, _ in data["oos_test"]][:WINDOWS * WINDOW]

    # narrowing: the two intents the model is surest of on its holdout; their 30 test utterances each and
    # 20 training-split utterances each that the subset did not train on
    confidence = manifest["driftProfile"]["confidence"]["values"]
    per_intent = {intent: [c for c, row in zip(confidence, holdout, strict=True) if row["label"] == intent]
                  for intent in intents}
    narrow = sorted(intents, key=lambda i: -sum(per_intent[i]) / len(per_intent[i]))[:2]
    unused = {intent: [t for t, i in data["train"] if i == intent][TRAIN_PER_INTENT:] for intent in narrow}
    narrowing = [t for t, i in data["test"] if i in narrow] + [t for i in narrow for t in unused[i][:20]]
    assert len(narrowing) == WINDOW

    return Clinc(manifest, train_seconds, holdout, holdout_scored, reference, calibration,
                 score(in_scope[:WINDOWS * WINDOW]), score(out_of_scope), score(narrowing), narrow)


def analyse(clinc: Clinc, scored: Scored, thresholds: stats.Thresholds = THRESHOLDS) -> dict:
    window = [o for record in scored.records for o in stats.observations(record)]
    assert len(window) == len(scored.records)
    return stats.analyse(clinc.reference, clinc.calibration, window, scored.embeddings, thresholds)


@pytest.fixture(scope="module")
def results(clinc: Clinc) -> dict[str, list[dict]]:
    found = {
        "in-scope": [analyse(clinc, clinc.in_scope.window(i * WINDOW)) for i in range(WINDOWS)],
        "out-of-scope": [analyse(clinc, clinc.out_of_scope.window(i * WINDOW)) for i in range(WINDOWS)],
        "narrowing": [analyse(clinc, clinc.narrowing)],
        # for the record (not asserted): in-scope traffic with a share of out-of-scope requests
        **{f"{share}% oos": [analyse(clinc, clinc.in_scope.window(0, WINDOW - share)
                                     + clinc.out_of_scope.window(0, share))] for share in (10, 20, 30)},
    }
    _print(clinc, found)
    return found


def _print(clinc: Clinc, found: dict[str, list[dict]]) -> None:
    profile, limits = clinc.manifest["driftProfile"], clinc.calibration["thresholds"]
    print(f"\nCLINC150 drift: 10 intents, trained in {clinc.train_seconds:.1f} s "
          f"(accuracy {clinc.manifest['metrics']['accuracy']:.3f}); holdout {profile['holdoutSize']} "
          f"(confidence mean {profile['confidence']['mean']:.4f}, entropy mean {profile['entropy']['mean']:.4f}); "
          f"window {WINDOW}; narrowing to {', '.join(clinc.narrow_intents)}")
    print(f"thresholds: confidence < {limits['confidence']:.4f}, entropy KS > {limits['twoSample']:.3f}, "
          f"|length z| > {limits['inputLength']:g}, oov > {limits['oov']:.3f}, centroid cosine > "
          f"{limits['centroidCosine']:.4f}, MMD^2 > {limits['mmd']:.5f}")
    print(f"{'window':12} {'conf':>6} {'KS':>6} {'len z':>6} {'oov':>6} {'cos':>7} {'MMD^2':>8}  drifted  fired")
    for name, windows in found.items():
        for result in windows:
            triggers, diagnostics = result["triggers"], result["diagnostics"]
            fired = [k for k, v in {**triggers, **diagnostics}.items() if v["fired"]]
            print(f"{name:12} {triggers['confidence']['value']:6.3f} {triggers['entropy']['statistic']:6.3f} "
                  f"{diagnostics['inputLength']['z']:+6.2f} {diagnostics['oov']['value']:6.3f} "
                  f"{diagnostics['embedding']['centroidCosine']:7.4f} {diagnostics['embedding']['mmd']:8.5f}  "
                  f"{result['drifted']!s:7}  {', '.join(fired) or '-'}")


def test_the_engine_scores_the_holdout_as_the_trainer_profiled_it(clinc):
    """The reference and the traffic are measured alike: the engine's answers on the validation rows give
    the confidences and entropies the trainer put in the drift profile (same order)."""
    observed = [o for record in clinc.holdout_scored.records for o in stats.observations(record)]
    profile = clinc.manifest["driftProfile"]
    assert [o.confidence for o in observed] == pytest.approx(profile["confidence"]["values"], abs=1e-4)
    assert [o.entropy for o in observed] == pytest.approx(profile["entropy"]["values"], abs=1e-4)
    assert clinc.manifest["metrics"]["accuracy"] >= 0.85, clinc.manifest["metrics"]


def test_in_scope_windows_never_fire_a_trigger(results):
    for result in results["in-scope"]:
        assert not result["drifted"], result["summary"]
        assert not any(t["fired"] for t in result["triggers"].values()), result["summary"]
        assert result["summary"].startswith("no trigger: ")


def test_out_of_scope_windows_fire_the_triggers(results):
    for result in results["out-of-scope"]:
        assert result["drifted"], result["summary"]
        assert result["triggers"]["confidence"]["fired"] and result["triggers"]["entropy"]["fired"], result["summary"]
        assert result["summary"].startswith("drift: ")


def test_narrowing_to_two_intents_is_a_diagnostic_not_drift(clinc, results):
    [result] = results["narrowing"]
    assert result["diagnostics"]["embedding"]["fired"], result
    assert not any(t["fired"] for t in result["triggers"].values()), result["summary"]
    assert not result["drifted"]
    # configured as a trigger, the same window counts
    configured = analyse(clinc, clinc.narrowing, stats.Thresholds(trigger_on_diagnostics=("embedding",)))
    assert configured["drifted"] and "embedding (trigger)" in configured["summary"]


def test_reference_and_calibration_survive_storage(clinc, results):
    reference, calibration = (json.loads(json.dumps(d)) for d in (clinc.reference, clinc.calibration))
    window = [o for record in clinc.out_of_scope.window().records for o in stats.observations(record)]
    stored = stats.analyse(reference, calibration, window, clinc.out_of_scope.window().embeddings, THRESHOLDS)
    assert stored == results["out-of-scope"][0]
    assert len(json.dumps(reference)) < 5_000_000

"""The final validation reuses the in-loop evaluation of the last step (the same weights), and scores the
split again when other weights were restored or the last step was not evaluated."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from kubetune_trainer import train
from kubetune_trainer.evaluation import Evaluation

from .conftest import job_spec, lm_corpus, make_config, run_in_process, write_jsonl


def _run(step: int, last: tuple[int, Evaluation] | None) -> SimpleNamespace:
    fresh = Evaluation({"eval_loss": 2.0}, [], [])
    return SimpleNamespace(val_examples=[object()], last_evaluation=last, state=SimpleNamespace(step=step),
                           validate=lambda: fresh, fresh=fresh)


def test_the_last_steps_evaluation_is_reused_and_any_other_is_scored_again():
    cached = Evaluation({"eval_loss": 1.0}, [], [])
    assert train._final_validation(_run(30, (30, cached))) is cached
    stale = _run(31, (30, cached))
    assert train._final_validation(stale) is stale.fresh
    never = _run(30, None)
    assert train._final_validation(never) is never.fresh
    assert train._final_validation(SimpleNamespace(val_examples=[])).metrics == {}


def test_restoring_the_best_weights_forgets_the_last_evaluation():
    restored = []
    runner = SimpleNamespace(best_weights={"w": 1}, restore_best=lambda: restored.append(True))
    run = SimpleNamespace(state=SimpleNamespace(step=30, best_step=20, best_metric=0.5), runner=runner,
                          last_evaluation=(30, Evaluation({}, [], [])), stop_reason="early stopping")
    train.restore_best_weights(run)
    assert restored and run.last_evaluation is None


def test_a_run_publishes_the_metrics_of_its_last_evaluation_without_scoring_twice(tiny_llama, tmp_path, caplog):
    data = write_jsonl(tmp_path / "train.jsonl", lm_corpus(48))
    config = make_config(job_spec(tiny_llama, data, tmp_path / "out", training__maxSteps=6,
                                  training__evalSteps=3), name="final")
    with caplog.at_level(logging.INFO, logger="kubetune_trainer.train"):
        manifest = run_in_process(config, tmp_path / "work")
    evaluations = [h for h in manifest["training"]["history"] if "eval_loss" in h]
    assert [e["step"] for e in evaluations] == [3, 6]
    assert manifest["metrics"]["eval_loss"] == evaluations[-1]["eval_loss"]
    assert any(r.getMessage().startswith("final validation: the evaluation of this step") for r in caplog.records)

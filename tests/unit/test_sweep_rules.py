"""The rank sweep's rules: the configs, the halving plan within the budget, marking and the choice."""

from __future__ import annotations

import math

import pytest

from kubetune.api import sweep_rules as rules
from kubetune.api.v1alpha1.finetunejob_status import SWEEP_TRIAL
from kubetune.api.validation import validate
from kubetune_testing.factories import finetunejob


def spec_of(**sweep) -> dict:
    result = validate(finetunejob(rankSweep=sweep))
    assert result.ok, [str(e) for e in result.errors]
    return result.defaulted["spec"]


def t(rank, state=rules.SUCCEEDED, metric=None, rung=0, **extra) -> dict:
    out = {"rank": rank, "state": state, "rung": rung, "learningRate": 1e-3, **extra}
    if metric is not None:
        out["metric"] = metric
    return out


# --- configs -------------------------------------------------------------------------------------------


def test_configs_are_ranks_times_learning_rates_sorted_with_proportional_alpha():
    spec = spec_of(ranks=[16, 4], learningRates=[3e-3, 1e-3])  # lora rank 16, alpha 32
    assert [(c.rank, c.alpha, c.learning_rate) for c in rules.configs(spec)] == [
        (4, 8, 1e-3), (4, 8, 3e-3), (16, 32, 1e-3), (16, 32, 3e-3)]
    assert [c.name for c in rules.configs(spec)][:2] == ["r4-lr0.001", "r4-lr0.003"]
    plain = spec_of(ranks=[4, 8])
    assert [c.learning_rate for c in rules.configs(plain)] == [2e-4] * 2  # the causal LoRA default


def test_lora_alpha_proportional_never_below_one_and_fixed_kept():
    spec = spec_of()
    assert [rules.lora_alpha(spec, r) for r in (1, 4, 8, 16, 32, 512)] == [2, 8, 16, 32, 64, 1024]
    spec["method"]["lora"]["alpha"] = 1
    assert rules.lora_alpha(spec, 4) == 1 and rules.lora_alpha(spec, 64) == 4
    assert [rules.lora_alpha(spec_of(alpha="Fixed"), r) for r in (4, 64)] == [32, 32]


def test_config_spec_sets_rank_alpha_and_learning_rate_without_touching_the_input():
    spec = spec_of()
    out = rules.config_spec(spec, 8, 5e-3)
    assert (out["method"]["lora"]["rank"], out["method"]["lora"]["alpha"], out["training"]["learningRate"]) == (
        8, 16, 5e-3)
    assert spec["method"]["lora"]["rank"] == 16 and spec["training"].get("learningRate") != 5e-3
    assert rules.config_spec(spec, 8)["training"].get("learningRate") == spec["training"].get("learningRate")


def test_retry_is_a_quarter_of_the_learning_rate_named_apart():
    retry = rules.retry_config(rules.Config(8, 16, 4e-3))
    assert (retry.rank, retry.alpha, retry.learning_rate, retry.retry_of) == (8, 16, 1e-3, "r8-lr0.004")
    assert retry.name == "r8-lr0.001-retry"  # not the name of a configured r8 at 1e-3


# --- the plan ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("configs", "sizes", "units"), [
    (2, [2], 2), (3, [3, 2], 5), (4, [4, 2], 6), (5, [5, 3, 2], 12), (8, [8, 4, 2], 16), (16, [16, 8, 4, 2], 40)])
def test_rungs_halve_until_two_remain_and_their_cost(configs, sizes, units):
    assert rules.rung_sizes(configs) == sizes
    assert rules.step_units(configs) == units


def test_plan_fits_the_budget_with_a_retry_reserve():
    plan = rules.plan(4, full_run_steps=1000, budget=0.3)  # 300 steps; 6 units + 1 retry
    assert (plan.budget_steps, plan.first_rung_steps, plan.rungs, plan.retry_reserve) == (300, 42, (42, 84), 1)
    assert plan.planned_steps == 252 and plan.final_steps == 84
    assert plan.planned_steps + plan.retry_reserve * plan.first_rung_steps <= plan.budget_steps
    assert rules.allowance(plan) == 300
    big = rules.plan(16, full_run_steps=10_000)  # 3000 steps; 40 units + 4 retries
    assert (big.first_rung_steps, big.rungs, big.retry_reserve) == (68, (68, 136, 272, 544), 4)


def test_plan_max_steps_caps_the_first_rung_and_tiny_budgets_get_one_step():
    assert rules.plan(4, 1000, 0.3, max_first_rung_steps=10).rungs == (10, 20)
    tiny = rules.plan(4, full_run_steps=10, budget=0.1)  # one step of budget for 6 units
    assert tiny.first_rung_steps == 1 and rules.allowance(tiny) == tiny.planned_steps == 6
    with pytest.raises(ValueError, match="at least two configs"):
        rules.plan(1, 100)


# --- marking -------------------------------------------------------------------------------------------


BASE = {"eval_loss": 4.3, "accuracy": 0.01}


@pytest.mark.parametrize(("metrics", "state"), [
    ({"eval_loss": float("nan")}, rules.DIVERGED),
    ({"eval_loss": None}, rules.DIVERGED),
    ({"eval_loss": 4.8, "accuracy": 0.5}, rules.DIVERGED),  # more than 10% above the base model's loss
    ({"eval_loss": 4.31, "accuracy": 0.013}, rules.AT_CHANCE),  # the r32: ln(77) = 4.34
    ({"eval_loss": 1.0, "accuracy": 0.019}, rules.AT_CHANCE),  # accuracy <= 1.5 / 77
    ({"eval_loss": 4.25}, rules.AT_CHANCE),  # no accuracy: loss >= 0.97 ln(77) = 4.21
    ({"eval_loss": 4.25, "accuracy": 0.3}, None),  # the loss lags: accuracy far above chance is learning
    ({"eval_loss": 0.76, "accuracy": 0.8}, None),
])
def test_mark_classification(metrics, state):
    verdict = rules.mark(metrics, BASE, task="SequenceClassification", classes=77)
    assert (verdict[0] if verdict else None) == state


def test_mark_two_classes_is_not_too_strict():
    # 1.5/2 would call 0.7 accuracy chance; the bound is at most 10 points above 1/classes
    assert rules.mark({"eval_loss": 0.5, "accuracy": 0.7}, {"eval_loss": 0.69}, task="SequenceClassification",
                      classes=2) is None
    verdict = rules.mark({"eval_loss": 0.5, "accuracy": 0.55}, {"eval_loss": 0.69}, task="SequenceClassification",
                         classes=2)
    assert verdict[0] == rules.AT_CHANCE and "0.55 <= 0.6" in verdict[1]


def test_mark_causal_lm_needs_an_improvement_over_the_base_model():
    assert rules.mark({"eval_loss": 2.0}, {"eval_loss": 2.5}, task="CausalLM", classes=0) is None
    verdict = rules.mark({"eval_loss": 2.5}, {"eval_loss": 2.5}, task="CausalLM", classes=0)
    assert verdict == (rules.AT_CHANCE, "holdout loss 2.5 is no better than the base model's 2.5")
    assert rules.mark({"eval_loss": 2.9}, {"eval_loss": 2.5}, task="CausalLM", classes=0)[0] == rules.DIVERGED
    assert rules.mark({"eval_loss": 2.9}, {}, task="CausalLM", classes=0) is None  # no base score: no judgement


# --- ranking and the choice ----------------------------------------------------------------------------


def test_choose_compares_only_the_configs_of_the_deepest_rung():
    # r4 scored 0.9 after 10 steps, the finalists more after 20: the lower number of r4 does not win
    trials = [t(4, rules.STOPPED, 0.9, rung=0), t(8, rules.STOPPED, 1.1, rung=1), t(16, rules.SUCCEEDED, 1.0, rung=1)]
    assert rules.choose(trials, "eval_loss")["rank"] == 16
    assert rules.choose(trials, "accuracy")["rank"] == 8  # same numbers, other direction


def test_choose_ignores_diverged_at_chance_running_and_non_finite():
    trials = [t(4, rules.DIVERGED, 0.1, rung=2), t(8, rules.AT_CHANCE, 0.2, rung=2), t(16, rules.RUNNING, 0.3, rung=2),
              t(32, rules.SUCCEEDED, float("nan"), rung=2), t(64, rules.SUCCEEDED, 1.0, rung=1)]
    assert rules.choose(trials, "eval_loss")["rank"] == 64
    assert rules.choose(trials[:4], "eval_loss") is None
    assert rules.choose([], "eval_loss") is None


def test_ties_within_tolerance_go_to_the_smallest_rank():
    trials = [t(4, metric=1.30), t(8, metric=1.12), t(16, metric=1.10), t(32, metric=1.00)]
    assert rules.choose(trials, "eval_loss", 0.0)["rank"] == 32
    assert rules.choose(trials, "eval_loss", 0.11)["rank"] == 16
    assert rules.choose(trials, "eval_loss", 0.15)["rank"] == 8
    assert rules.choose(trials, "eval_loss", 0.5)["rank"] == 4
    assert [r["rank"] for r in rules.ranked(trials, "eval_loss", 0.15)] == [8, 16, 32, 4]


def test_tie_tolerance_holds_at_its_boundary_despite_float_rounding():
    # 1.10 - 1.00 is 0.10000000000000009 in floats: still a tie at tolerance 0.1
    assert rules.choose([t(4, metric=1.10), t(16, metric=1.00)], "eval_loss", 0.1)["rank"] == 4
    accuracy = [t(8, metric=0.90), t(32, metric=0.91)]
    assert rules.choose(accuracy, "accuracy", 0.01)["rank"] == 8
    assert rules.choose(accuracy, "accuracy", 0.009)["rank"] == 32


def test_exact_tie_goes_to_the_smaller_rank():
    assert rules.choose([t(16, metric=0.9), t(8, metric=0.9)], "accuracy")["rank"] == 8


def test_states_match_the_status_schema():
    assert list(rules.TRIAL_STATES) == SWEEP_TRIAL["properties"]["state"]["enum"]
    assert math.isclose(rules.RETRY_LR_FACTOR, 0.25)

"""The rank sweep's rules (pure), shared by the trainer that runs it and the operator that reads it:
the configs (rank x learning rate), the successive-halving plan within the budget, how a config is
marked (Diverged, AtChance, Stopped, Succeeded), the retry's learning rate and the final choice.
docs/trainer.md "Rank sweep" gives the reasons for each constant.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from . import training_defaults
from .v1alpha1.finetunejob import HIGHER_IS_BETTER
from .v1alpha1.finetunejob_status import SWEEP_TRIAL_STATES

SUCCEEDED, STOPPED, DIVERGED, AT_CHANCE, FAILED = "Succeeded", "Stopped", "Diverged", "AtChance", "Failed"
RUNNING = "Running"
TRIAL_STATES = SWEEP_TRIAL_STATES
ELIGIBLE = (SUCCEEDED, STOPPED)  # states whose metric may win
ETA = 2  # each rung keeps the best half and doubles their steps
DEFAULT_BUDGET = 0.3  # share of the full run's optimizer steps all configs together may use
RETRY_LR_FACTOR = 0.25  # a config that diverged or stayed at chance retries once at lr/4
DIVERGED_MARGIN = 0.10  # holdout loss more than 10% above the base model's: training made it worse
CHANCE_ACCURACY_FACTOR = 1.5  # accuracy at most 1.5/classes (and at most 10 points above 1/classes)
CHANCE_LOSS_FACTOR = 0.97  # holdout loss at least 0.97 ln(classes): the prior (when no accuracy says more)


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Config:
    """One point of the sweep: a LoRA rank (with its alpha) at a learning rate."""

    rank: int
    alpha: int
    learning_rate: float
    retry_of: str | None = None

    @property
    def name(self) -> str:
        return f"r{self.rank}-lr{self.learning_rate:.3g}" + ("-retry" if self.retry_of else "")


def learning_rates(spec: dict) -> list[float]:
    """rankSweep.learningRates when set, else the training learning rate alone."""
    rates = (spec.get("rankSweep") or {}).get("learningRates") or [training_defaults.learning_rate(
        spec.get("training") or {}, task=spec.get("task", "CausalLM"), method=spec["method"]["type"])]
    return sorted({float(r) for r in rates})


def lora_alpha(spec: dict, rank: int) -> int:
    """Proportional keeps alpha/rank at the spec's ratio, so every rank trains at the same update scale
    (with a fixed alpha the scale alpha/r would shrink as the rank grows and confound the comparison)."""
    lora = spec["method"]["lora"]
    if (spec.get("rankSweep") or {}).get("alpha", "Proportional") == "Fixed":
        return int(lora["alpha"])
    return max(1, round(lora["alpha"] * rank / lora["rank"]))


def configs(spec: dict) -> list[Config]:
    ranks = sorted({int(r) for r in spec["rankSweep"]["ranks"]})
    return [Config(rank, lora_alpha(spec, rank), lr) for rank in ranks for lr in learning_rates(spec)]


def config_spec(spec: dict, rank: int, learning_rate: float | None = None) -> dict:
    """The spec at `rank` (its alpha follows rankSweep.alpha) and, when given, at `learning_rate`."""
    out = copy.deepcopy(spec)
    out["method"]["lora"]["alpha"] = lora_alpha(spec, rank)
    out["method"]["lora"]["rank"] = int(rank)
    if learning_rate is not None:
        out["training"]["learningRate"] = float(learning_rate)
    return out


def retry_config(config: Config) -> Config:
    return Config(config.rank, config.alpha, config.learning_rate * RETRY_LR_FACTOR, retry_of=config.name)


# --- the plan ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Rung k trains the survivors to first_rung_steps * 2**k steps in all; `rungs` are those totals."""

    budget_steps: int
    first_rung_steps: int
    rungs: tuple[int, ...]
    planned_steps: int  # the halving itself, retries not counted
    retry_reserve: int  # rung-0 retries the budget keeps room for

    @property
    def final_steps(self) -> int:
        """A config's last planned step: its warmup and LR schedule span these."""
        return self.rungs[-1]


def survivors_after(count: int) -> int:
    return max(1, math.ceil(count / ETA))


def rung_sizes(configs_count: int) -> list[int]:
    """Configs trained at each rung: all, then the best half, ... while two or more remain to compare."""
    sizes = [configs_count]
    while sizes[-1] > 2:
        sizes.append(survivors_after(sizes[-1]))
    return sizes


def step_units(configs_count: int) -> int:
    """The halving's cost in units of first-rung steps: rung k adds 2**(k-1) steps to each survivor."""
    sizes = rung_sizes(configs_count)
    return sizes[0] + sum(size * ETA ** (k - 1) for k, size in enumerate(sizes) if k)


def plan(configs_count: int, full_run_steps: int, budget: float = DEFAULT_BUDGET,
         max_first_rung_steps: int | None = None) -> Plan:
    """The first rung's steps s0 such that the halving plus a reserve of rung-0 retries (one per four
    configs, at least one) fits `budget` x the full run's steps; at least one step per rung."""
    if configs_count < 2:
        raise ValueError(f"a sweep needs at least two configs, not {configs_count}")
    budget_steps = max(1, math.floor(budget * full_run_steps))
    reserve = max(1, configs_count // 4)
    first = max(1, budget_steps // (step_units(configs_count) + reserve))
    if max_first_rung_steps:
        first = min(first, int(max_first_rung_steps))
    rungs = tuple(first * ETA ** k for k in range(len(rung_sizes(configs_count))))
    return Plan(budget_steps, first, rungs, first * step_units(configs_count), reserve)


def allowance(the_plan: Plan) -> int:
    """Steps the sweep may spend: the budget, or the plan when one step per rung already exceeds it."""
    return max(the_plan.budget_steps, the_plan.planned_steps)


# --- marking -------------------------------------------------------------------------------------------


def mark(metrics: dict, base: dict, *, task: str, classes: int) -> tuple[str, str] | None:
    """Diverged or AtChance with the reason, or None for a config that learned something."""
    loss = metrics.get("eval_loss")
    if not _finite(loss):
        return DIVERGED, f"holdout loss is {loss}"
    base_loss = base.get("eval_loss")
    if _finite(base_loss) and loss > base_loss * (1 + DIVERGED_MARGIN):
        return DIVERGED, (f"holdout loss {loss:.4g} is more than {DIVERGED_MARGIN:.0%} above the base "
                          f"model's {base_loss:.4g}")
    if task == "SequenceClassification" and classes >= 2:
        accuracy = metrics.get("accuracy")
        accuracy_bound = min(CHANCE_ACCURACY_FACTOR / classes, 1 / classes + 0.1)
        if _finite(accuracy) and accuracy <= accuracy_bound:
            return AT_CHANCE, f"holdout accuracy {accuracy:.4g} <= {accuracy_bound:.4g} ({classes} classes)"
        # Early on the loss lags the argmax: a loss still near ln(classes) with accuracy above chance is a
        # config that is learning, so the loss decides only without an accuracy
        if not _finite(accuracy) and loss >= CHANCE_LOSS_FACTOR * math.log(classes):
            return AT_CHANCE, (f"holdout loss {loss:.4g} >= {CHANCE_LOSS_FACTOR} ln({classes}) = "
                               f"{CHANCE_LOSS_FACTOR * math.log(classes):.4g}")
    elif task != "SequenceClassification" and _finite(base_loss) and loss >= base_loss:
        return AT_CHANCE, f"holdout loss {loss:.4g} is no better than the base model's {base_loss:.4g}"
    return None


# --- ranking and the choice ----------------------------------------------------------------------------


def higher_is_better(metric: str) -> bool:
    return metric in HIGHER_IS_BETTER


def ranked(rows: list[dict], metric: str, tolerance: float = 0.0) -> list[dict]:
    """Best first by `metric` (rows compared must have trained the same steps). Rows within `tolerance`
    of the best tie, and the smallest tied rank leads (fewer parameters to serve for the same quality)."""
    scored = [r for r in rows if _finite(r.get("metric"))]
    if not scored:
        return []
    sign = -1 if higher_is_better(metric) else 1
    by_metric = sorted(scored, key=lambda r: (sign * r["metric"], r["rank"]))
    best = by_metric[0]["metric"]
    slack = 1e-9 * max(1.0, abs(best))  # 1.10 vs 1.00 with tolerance 0.1 is a tie, whatever the float rounding
    tied = [r for r in by_metric if abs(r["metric"] - best) <= tolerance + slack]
    rest = [r for r in by_metric if r not in tied]
    return sorted(tied, key=lambda r: (r["rank"], sign * r["metric"])) + rest


def choose(trials: list[dict], metric: str, tolerance: float = 0.0) -> dict | None:
    """The winner among the configs that went furthest (Succeeded or Stopped, finite metric), compared at
    the rung they all reached, so at equal steps. None when no config is eligible."""
    eligible = [t for t in trials if t.get("state") in ELIGIBLE and _finite(t.get("metric"))
                and isinstance(t.get("rung"), int)]
    if not eligible:
        return None
    deepest = max(t["rung"] for t in eligible)
    order = ranked([t for t in eligible if t["rung"] == deepest], metric, tolerance)
    return order[0] if order else None

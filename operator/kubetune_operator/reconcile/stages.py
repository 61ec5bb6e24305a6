"""The stages before training (pure): the baseline gate and the LoRA rank sweep, as functions of the
spec and the results the stage jobs left. `baseline_gates`: whether the base model gets its own job
(only when a target can stop the run); `trial_spec`: the spec at one rank (short, no early stopping);
`choose_rank`: the best holdout metric, the smallest rank among ties; `training_spec`: the chosen rank.
"""

from __future__ import annotations

import copy
import math

from kubetune.api import jobconfig
from kubetune.api.methods import METHODS
from kubetune.api.v1alpha1.finetunejob import HIGHER_IS_BETTER

QUEUED, PENDING, RUNNING, SUCCEEDED, FAILED = "Queued", "Pending", "Running", "Succeeded", "Failed"
FINISHED = (SUCCEEDED, FAILED)


def higher_is_better(metric: str) -> bool:
    return metric in HIGHER_IS_BETTER


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# --- baseline ----------------------------------------------------------------------------------------


def baseline_spec(spec: dict) -> dict:
    return spec.get("baseline") or {"enabled": True, "forceTraining": False}


def baseline_gates(spec: dict) -> bool:
    """Whether a separate baseline job runs first: only a target that can stop the job is worth the
    extra model load (without one, training's own first evaluation records the baseline)."""
    baseline = baseline_spec(spec)
    return bool(baseline.get("enabled", True) and baseline.get("target") and not baseline.get("forceTraining"))


def baseline_met(metrics: dict, target: dict | None) -> bool | None:
    """True when the base model meets the target; None when there is no target or no such metric."""
    if not target:
        return None
    value = (metrics or {}).get(target["metric"])
    if not _finite(value):
        return None
    if higher_is_better(target["metric"]):
        return value >= target["value"]
    return value <= target["value"]


def baseline_summary(metrics: dict, target: dict | None, task: str) -> str:
    """`accuracy 0.083 < 0.900`, or the task's headline metric when there is no target."""
    if target:
        value = (metrics or {}).get(target["metric"])
        if not _finite(value):
            return f"{target['metric']} not reported"
        met = baseline_met(metrics, target)
        signs = (">=", "<") if higher_is_better(target["metric"]) else ("<=", ">")
        sign = signs[0] if met else signs[1]
        return f"{target['metric']} {value:.4g} {sign} {target['value']:.4g}"
    metric = "accuracy" if task == "SequenceClassification" else "eval_loss"
    value = (metrics or {}).get(metric)
    return f"{metric} {value:.4g}" if _finite(value) else ""


# --- sweep -------------------------------------------------------------------------------------------


def sweep_requested(spec: dict) -> bool:
    return bool(spec.get("rankSweep")) and METHODS[spec["method"]["type"]].has_lora_rank


def sweep_ranks(spec: dict) -> list[int]:
    return sorted({int(r) for r in spec["rankSweep"]["ranks"]})


def lora_alpha(spec: dict, rank: int) -> int:
    """Proportional keeps alpha/rank at the spec's ratio, so every rank trains at the same update scale
    (with a fixed alpha the scale alpha/r would shrink as the rank grows and confound the comparison)."""
    lora = spec["method"]["lora"]
    if (spec.get("rankSweep") or {}).get("alpha", "Proportional") == "Fixed":
        return int(lora["alpha"])
    return max(1, round(lora["alpha"] * rank / lora["rank"]))


def _with_rank(spec: dict, rank: int) -> dict:
    out = copy.deepcopy(spec)
    out["method"]["lora"]["alpha"] = lora_alpha(spec, rank)
    out["method"]["lora"]["rank"] = int(rank)
    return out


def trial_stage(spec: dict, rank: int) -> jobconfig.Stage:
    sweep = spec["rankSweep"]
    return jobconfig.Stage(kind=jobconfig.STAGE_TRIAL, rank=int(rank), holdout_fraction=sweep["holdoutFraction"],
                           max_steps=sweep.get("maxSteps"))


def trial_spec(spec: dict, rank: int) -> dict:
    """The spec a trial trains with: the job's own, at `rank`, for rankSweep.epochs, scored once at the
    end (no early stopping, no intermediate evaluations beyond the schedule's), without a baseline
    evaluation (the base model's score does not depend on the rank) and without a merged copy."""
    sweep = spec["rankSweep"]
    out = _with_rank(spec, rank)
    training = out["training"]
    training.pop("maxSteps", None)
    training.pop("earlyStopping", None)
    training.pop("evalSteps", None)
    training["epochs"] = sweep["epochs"]
    out["baseline"] = {"enabled": False, "forceTraining": False}
    out["output"]["mergeAdapter"] = False
    for key in ("nodes", "gpusPerNode"):  # a smaller world per trial, when asked
        if sweep.get(key) is not None:
            out["distributed"][key] = sweep[key]
    out.pop("rankSweep", None)
    return out


def training_spec(spec: dict, best_rank: int | None) -> dict:
    """The full run's spec: the chosen rank (and its alpha) when a sweep chose one."""
    if best_rank is None or not sweep_requested(spec):
        return spec
    return _with_rank(spec, best_rank)


def choose_rank(trials: list[dict], metric: str, tolerance: float = 0.0) -> dict | None:
    """The best succeeded trial by `metric`; trials within `tolerance` of the best tie, and the smallest
    tied rank wins (fewer parameters to serve for the same quality). None when no trial succeeded."""
    scored = [t for t in trials if t.get("state") == SUCCEEDED and _finite(t.get("metric"))]
    if not scored:
        return None
    values = [t["metric"] for t in scored]
    best = max(values) if higher_is_better(metric) else min(values)
    slack = 1e-9 * max(1.0, abs(best))  # 1.10 vs 1.00 with tolerance 0.1 is a tie, whatever the float rounding
    tied = [t for t in scored if abs(t["metric"] - best) <= tolerance + slack]
    return min(tied, key=lambda t: t["rank"])


def runnable(trials: list[dict], parallelism: int) -> list[int]:
    """Ranks to launch now: queued trials in rank order, as many as free slots allow."""
    active = sum(1 for t in trials if t.get("state") in (PENDING, RUNNING))
    free = max(0, parallelism - active)
    queued = sorted(t["rank"] for t in trials if t.get("state") == QUEUED)
    return queued[:free]


def sweep_summary(trials: list[dict], best: dict | None) -> str:
    done = sum(1 for t in trials if t.get("state") in FINISHED)
    failed = sum(1 for t in trials if t.get("state") == FAILED)
    running = sum(1 for t in trials if t.get("state") in (PENDING, RUNNING))
    text = f"{done}/{len(trials)} done"
    if failed:
        text += f", {failed} failed"
    if running:
        text += f", {running} running"
    if best is not None:
        text += f", best r{best['rank']}"
    return text


def trial_metric(result: dict, metric: str) -> float | None:
    """The sweep metric from a trial's result.json; accuracy asked of a causal LM has no value."""
    metrics = (result or {}).get("metrics")
    value = metrics.get(metric) if isinstance(metrics, dict) else None  # result.json is whatever JSON it holds
    return float(value) if _finite(value) else None


def table(trials: list[dict], metric: str, best_rank: int | None) -> str:
    """The sweep as a text table (events, `kubetune local`)."""
    rows = [f"{'rank':>5} {'alpha':>5} {'state':<9} {metric:>12} {'seconds':>8}"]
    for t in sorted(trials, key=lambda t: t["rank"]):
        value = t.get("metric")
        shown = f"{value:.4f}" if _finite(value) else "-"
        seconds = t.get("durationSeconds")
        mark = "  <- chosen" if t["rank"] == best_rank else ""
        rows.append(f"{t['rank']:>5} {t.get('alpha', '-')!s:>5} {t.get('state', ''):<9} {shown:>12} "
                    f"{(f'{seconds:.0f}' if _finite(seconds) else '-'):>8}{mark}")
    return "\n".join(rows)

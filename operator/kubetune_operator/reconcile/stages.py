"""The stages before training (pure): the baseline gate and the LoRA rank sweep, as functions of the
spec and the results the stage jobs left. `baseline_gates`: whether the base model gets its own job
(only when a target can stop the run); `sweep_spec`: what the one sweep workload gets; `trial_rows`:
its table made fit for status; `training_spec`: the chosen rank (and learning rate). The halving and
the choice themselves are kubetune.api.sweep_rules (the trainer runs them too).
"""

from __future__ import annotations

import copy
import math

from kubetune.api import jobconfig, sweep_rules
from kubetune.api.methods import METHODS
from kubetune.api.v1alpha1.finetunejob import HIGHER_IS_BETTER

QUEUED, PENDING, RUNNING, SUCCEEDED, FAILED = "Queued", "Pending", "Running", "Succeeded", "Failed"
MAX_TRIAL_ROWS = 64  # status.sweep.trials: rankSweep allows 32 configs, each may add one retry
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


def sweep_stage(spec: dict) -> jobconfig.Stage:
    return jobconfig.Stage(kind=jobconfig.STAGE_SWEEP, holdout_fraction=spec["rankSweep"]["holdoutFraction"])


def sweep_spec(spec: dict) -> dict:
    """The spec the sweep workload runs: the job's own (its training settings size the budget), without
    a separate baseline (the sweep scores the base model on its holdout itself) or a merged copy, on the
    smaller world rankSweep.nodes / gpusPerNode asks for, and without DeepSpeed (one engine owns one
    optimizer; the sweep trains one per config, each process holding the whole base model)."""
    out = copy.deepcopy(spec)
    out["baseline"] = {"enabled": False, "forceTraining": False}
    out["distributed"]["deepspeed"] = {**out["distributed"]["deepspeed"], "enabled": False}
    out["output"]["mergeAdapter"] = False
    for key in ("nodes", "gpusPerNode"):
        if spec["rankSweep"].get(key) is not None:
            out["distributed"][key] = spec["rankSweep"][key]
    return out


def training_spec(spec: dict, best_rank: int | None, best_learning_rate: float | None = None) -> dict:
    """The full run's spec: the chosen rank (and its alpha), and the chosen learning rate when the sweep
    tried several."""
    if best_rank is None or not sweep_requested(spec):
        return spec
    swept_rate = best_learning_rate if spec["rankSweep"].get("learningRates") else None
    return sweep_rules.config_spec(spec, best_rank, swept_rate)


_ROW_NUMBERS = ("learningRate", "metric", "seconds")
_ROW_INTEGERS = ("rank", "alpha", "steps", "rung")
_ROW_TEXT = {"name": 64, "retryOf": 64, "message": 1024}


def trial_rows(rows: object) -> list[dict]:
    """The sweep's table from its result.json or progress.json (whatever JSON it holds), kept to what
    status.sweep.trials can store: rows without a rank or a known state are left out."""
    out = []
    for row in rows if isinstance(rows, list) else []:
        if not isinstance(row, dict) or row.get("state") not in sweep_rules.TRIAL_STATES:
            continue
        clean = {"state": row["state"]}
        clean |= {k: float(row[k]) for k in _ROW_NUMBERS if _finite(row.get(k))}
        clean |= {k: int(row[k]) for k in _ROW_INTEGERS if _finite(row.get(k)) and row[k] >= 0}
        clean |= {k: str(row[k])[:limit] for k, limit in _ROW_TEXT.items() if row.get(k)}
        if clean.get("rank", 0) >= 1:
            out.append(clean)
    return out[:MAX_TRIAL_ROWS]


def sweep_summary(trials: list[dict], best: dict | None) -> str:
    """`4 configs, 2 halved, 1 diverged, best r8 lr0.003`."""
    counts: dict[str, int] = {}
    for t in trials:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    words = {sweep_rules.STOPPED: "halved", sweep_rules.DIVERGED: "diverged", sweep_rules.AT_CHANCE: "at chance",
             sweep_rules.FAILED: "failed", sweep_rules.RUNNING: "running"}
    text = ", ".join([f"{len(trials)} configs"] + [f"{counts[s]} {w}" for s, w in words.items() if counts.get(s)])
    if best is not None:
        rate = best.get("learningRate")
        text += f", best r{best['rank']}" + (f" lr{rate:.3g}" if _finite(rate) else "")
    return text


def table(trials: list[dict], metric: str, best: dict | None) -> str:
    """The sweep as a text table (events, `kubetune local`)."""
    rows = [f"{'rank':>5} {'alpha':>5} {'lr':>9} {'state':<9} {'rung':>4} {'steps':>6} {metric:>12}  note"]
    chosen = (best or {}).get("name")
    for t in trials:
        value = t.get("metric")
        shown = f"{value:.4f}" if _finite(value) else "-"
        lr = t.get("learningRate")
        note = "<- chosen" if chosen and t.get("name") == chosen else t.get("message", "")
        if t.get("retryOf"):
            note = f"retry of {t['retryOf']}; {note}"
        rows.append(f"{t['rank']:>5} {t.get('alpha', '-')!s:>5} {(f'{lr:.3g}' if _finite(lr) else '-'):>9} "
                    f"{t['state']:<9} {t.get('rung', '-')!s:>4} {t.get('steps', '-')!s:>6} {shown:>12}  {note}")
    return "\n".join(rows)

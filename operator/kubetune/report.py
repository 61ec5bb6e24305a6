"""What `kubetune local` shows at the end of a run: the rank sweep as a table and as a PNG chart.

Drawn from the FineTuneJob's status alone (status.sweep, status.baseline), so a chart of a cluster
job can be made the same way from `kubectl get ftj NAME -o json`. matplotlib is imported only here,
and only when a chart is asked for: the operator never needs it.
"""

from __future__ import annotations

import math
from pathlib import Path

from kubetune.api import v1alpha1 as api
from kubetune.reconcile import stages


def sweep_table(status: dict) -> str:
    sweep = status.get("sweep") or {}
    if not sweep.get("trials"):
        return ""
    return stages.table(sweep["trials"], sweep.get("metric", "eval_loss"), sweep.get("bestRank"))


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def sweep_chart(status: dict, path: Path, title: str = "") -> Path | None:
    """Holdout metric by rank (failed trials marked, the choice highlighted, the base model's score as
    a line when it is the same metric) next to each trial's wall time. None when there was no sweep."""
    sweep = status.get("sweep") or {}
    trials = sorted(sweep.get("trials") or [], key=lambda t: t["rank"])
    if not trials:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    metric = sweep.get("metric", "eval_loss")
    best = sweep.get("bestRank")
    positions = {t["rank"]: i for i, t in enumerate(trials)}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 2]})
    scored = [t for t in trials if t.get("state") == stages.SUCCEEDED and _finite(t.get("metric"))]
    left.plot([positions[t["rank"]] for t in scored], [t["metric"] for t in scored], "o-", color="tab:blue",
              label=f"holdout {metric}")
    for t in scored:
        left.annotate(f"{t['metric']:.3g}", (positions[t["rank"]], t["metric"]), textcoords="offset points",
                      xytext=(0, 7), ha="center", fontsize=8)
    chosen = [t for t in scored if t["rank"] == best]
    if chosen:
        left.plot([positions[best]], [chosen[0]["metric"]], "*", markersize=18, color="tab:orange",
                  label=f"chosen r{best}")
    failed = [t for t in trials if t.get("state") == stages.FAILED]
    if failed:
        low = min((t["metric"] for t in scored), default=0.0)
        left.plot([positions[t["rank"]] for t in failed], [low] * len(failed), "x", color="tab:red", markersize=10,
                  label="failed")
    baseline = ((status.get("baseline") or {}).get("metrics") or {}).get(metric)
    if _finite(baseline):
        left.axhline(baseline, linestyle="--", color="gray", label=f"base model, validation split ({baseline:.3g})")
    direction = "higher" if metric in api.HIGHER_IS_BETTER else "lower"
    left.set_title(f"{metric} by LoRA rank ({direction} is better)")
    left.set_xticks(range(len(trials)), [f"r{t['rank']}" for t in trials])
    left.set_xlabel("rank")
    left.set_ylabel(metric)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    seconds = [t.get("durationSeconds") if _finite(t.get("durationSeconds")) else 0.0 for t in trials]
    colors = ["tab:red" if t.get("state") == stages.FAILED else
              ("tab:orange" if t["rank"] == best else "tab:blue") for t in trials]
    right.bar(range(len(trials)), seconds, color=colors)
    right.set_xticks(range(len(trials)), [f"r{t['rank']}" for t in trials])
    right.set_title("trial wall time")
    right.set_ylabel("seconds")
    right.grid(alpha=0.3, axis="y")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

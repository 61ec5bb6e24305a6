"""What `kubetune local` shows at the end of a run: the summary, and charts as PNG files.

The rank sweep (table and chart, from a FineTuneJob's status alone), a FineTuneJob's report and an
AdapterDeployment's report (docs/cli.md lists the files). Pure: data in, files out (the callers read
storage); matplotlib is imported only when a chart is drawn, so the operator never needs it.
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

from kubetune.api.v1alpha1.finetunejob import HIGHER_IS_BETTER
from kubetune_operator.reconcile import data_report, stages, statuswrite


def _chosen(sweep: dict) -> dict | None:
    return next((t for t in sweep.get("trials") or [] if t.get("rank") == sweep.get("bestRank")
                 and t.get("learningRate") == sweep.get("bestLearningRate")
                 and t.get("metric") == sweep.get("bestMetric")), None)


def sweep_table(status: dict) -> str:
    sweep = status.get("sweep") or {}
    if not sweep.get("trials"):
        return ""
    return stages.table(sweep["trials"], sweep.get("metric", "eval_loss"), _chosen(sweep))


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


_STATE_MARKS = {"Succeeded": ("*", "tab:orange"), "Stopped": ("o", "tab:blue"), "Diverged": ("x", "tab:red"),
                "AtChance": ("v", "tab:red"), "Failed": ("x", "black"), "Running": ("o", "gray")}


def sweep_chart(status: dict, path: Path, title: str = "") -> Path | None:
    """Each config's holdout metric at the rung it reached (marked by its state; the base model's score as
    a line when it is the same metric) next to the optimizer steps each config got. None without a sweep."""
    sweep = status.get("sweep") or {}
    trials = list(sweep.get("trials") or [])
    if not trials:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    metric = sweep.get("metric", "eval_loss")
    names = [t.get("name") or f"r{t['rank']}" for t in trials]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 2]})
    chosen = _chosen(sweep)
    for state, (marker, color) in _STATE_MARKS.items():
        shown = [(i, t) for i, t in enumerate(trials) if t.get("state") == state and _finite(t.get("metric"))]
        if shown:
            left.plot([i for i, _ in shown], [t["metric"] for _, t in shown], marker, color=color, markersize=9,
                      linestyle="none", label=state)
        for i, t in shown:
            left.annotate(f"{t['metric']:.3g} @{t.get('steps', '?')}", (i, t["metric"]), textcoords="offset points",
                          xytext=(0, 7), ha="center", fontsize=7)
    baseline = ((status.get("baseline") or {}).get("metrics") or {}).get(metric)
    if _finite(baseline):
        left.axhline(baseline, linestyle="--", color="gray", label=f"base model, validation split ({baseline:.3g})")
    direction = "higher" if metric in HIGHER_IS_BETTER else "lower"
    left.set_title(f"holdout {metric} by config ({direction} is better)")
    left.set_xticks(range(len(trials)), names, rotation=30, fontsize=7)
    left.set_ylabel(metric)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    right.bar(range(len(trials)), [t.get("steps", 0) for t in trials],
              color=["tab:orange" if t is chosen else "tab:blue" for t in trials])
    right.set_xticks(range(len(trials)), names, rotation=30, fontsize=7)
    right.set_title("optimizer steps per config")
    right.grid(alpha=0.3, axis="y")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- the final report of a local run: PNG charts and a short text summary ----------------------------------
#
# Pure: data in (the object with its status, the trainer's history, drift windows, a timeline), files out.
# Every chart is optional: missing data or a missing matplotlib skips it, and the summary says why.

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPORT_DIR = "report"
LOSS_CHART, METRICS_CHART, DRIFT_CHART, ROLLOUT_CHART, SUMMARY_FILE = (
    "loss.png", "metrics.png", "drift.png", "rollout.png", "summary.txt")


class Report:
    """What a report wrote: chart name -> path, chart name -> why it was skipped, the summary text."""

    def __init__(self) -> None:
        self.charts: dict[str, Path] = {}
        self.skipped: dict[str, str] = {}
        self.summary = ""
        self.summary_path: Path | None = None

    def lines(self) -> list[str]:
        lines = [f"    {name:<8} {path}" for name, path in self.charts.items()]
        lines += [f"    {name:<8} skipped: {reason}" for name, reason in self.skipped.items()]
        return lines


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _chart(report: Report, name: str, draw, *args) -> None:
    """Run one chart function; None (no data) or an error skips it with the reason."""
    try:
        result = draw(*args)
    except ImportError:
        report.skipped[name] = "matplotlib is not installed (pip install kubetune[local])"
        return
    except Exception as exc:  # a chart must never cost the run its summary
        report.skipped[name] = f"{type(exc).__name__}: {exc}"
        return
    if isinstance(result, Path):
        report.charts[name] = result
    else:
        report.skipped[name] = result or "no data"


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def training_series(history: list) -> dict:
    """The trainer's history (manifest.training.history: {step, trainLoss, ...} per optimizer step,
    {step, eval_loss, accuracy, ...} per evaluation, {step, thawedBlocks} per thaw) as plot series."""
    series: dict = {"train": [], "eval": [], "metrics": {}, "thaws": []}
    for entry in history or []:
        if not isinstance(entry, dict) or not _finite(entry.get("step")):
            continue
        step = entry["step"]
        if _finite(entry.get("trainLoss")):
            series["train"].append((step, float(entry["trainLoss"])))
        if _finite(entry.get("eval_loss")):
            series["eval"].append((step, float(entry["eval_loss"])))
            for key in ("accuracy", "macro_f1", "perplexity"):
                if _finite(entry.get(key)):
                    series["metrics"].setdefault(key, []).append((step, float(entry[key])))
        if "thawedBlocks" in entry:
            series["thaws"].append(step)
    return series


def loss_chart(history: list, path: Path, best_step: int | None = None, title: str = "") -> Path | str:
    """Training and evaluation loss against the step (the best evaluation's step marked, thaws as lines),
    with the evaluation metrics in a second panel when there are any. A reason (str) when there is no loss."""
    series = training_series(history)
    if not series["train"] and not series["eval"]:
        return "no training history (the manifest has no training.history with losses)"
    plt = _pyplot()
    panels = 2 if series["metrics"] else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    left = axes[0][0]
    if series["train"]:
        left.plot(*zip(*series["train"], strict=True), color="tab:blue", linewidth=1, label="training loss")
    if series["eval"]:
        left.plot(*zip(*series["eval"], strict=True), "o-", color="tab:orange", label="eval loss")
    for step in series["thaws"]:
        left.axvline(step, color="gray", linestyle=":", linewidth=1)
    marked = best_step is not None and _finite(best_step)
    if marked:
        left.axvline(best_step, color="tab:green", linestyle="--", label=f"best step {best_step} (weights kept)")
    left.set_xlabel("step")
    left.set_ylabel("loss")
    left.set_title("loss")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    if panels == 2:
        right = axes[0][1]
        for name, points in sorted(series["metrics"].items()):
            if name == "perplexity":
                continue  # another scale; eval_loss already carries it
            right.plot(*zip(*points, strict=True), "o-", label=name)
        if marked:
            right.axvline(best_step, color="tab:green", linestyle="--")
        right.set_xlabel("step")
        right.set_title("evaluation metrics")
        right.grid(alpha=0.3)
        right.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def metrics_chart(baseline: dict, final: dict, path: Path, title: str = "") -> Path | str:
    """Baseline vs fine-tuned, one panel per metric (their scales differ), side by side bars."""
    names = sorted(n for n in set(baseline or {}) | set(final or {})
                   if _finite((baseline or {}).get(n)) or _finite((final or {}).get(n)))
    if not names:
        return "no evaluation metrics (no adapter was published)"
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(3 * len(names) + 1, 3.6), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        values = [(baseline or {}).get(name), (final or {}).get(name)]
        heights = [v if _finite(v) else 0.0 for v in values]
        bars = axis.bar([0, 1], heights, color=["tab:gray", "tab:blue"])
        for bar, value in zip(bars, values, strict=True):
            axis.annotate(f"{value:.4g}" if _finite(value) else "n/a", (bar.get_x() + bar.get_width() / 2,
                          bar.get_height()), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
        axis.set_xticks([0, 1], ["baseline", "fine-tuned"])
        axis.set_ylim(0, max(heights) * 1.15 or 1.0)
        direction = "higher" if name in HIGHER_IS_BETTER else "lower"
        axis.set_title(f"{name} ({direction} is better)", fontsize=9)
        axis.grid(alpha=0.3, axis="y")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def finetunejob_summary(job: dict, run_dir: Path | None = None, duration_seconds: float | None = None,
                        charts: list[str] = ()) -> str:
    """What `kubetune local` prints at the end of a FineTuneJob (and writes to report/summary.txt)."""
    status = job.get("status") or {}
    lines = ["", f"FineTuneJob {job['metadata']['name']}: {status.get('phase')}"]
    data = status.get("data") or {}
    if data.get("state") == stages.SUCCEEDED:
        lines.append(f"  data ({data.get('digest', '')}):")
        lines += ["    " + row for row in data_report.table(data).splitlines()]
    elif data.get("findings"):
        lines.append("  data refused:")
        lines += ["    " + row for row in data_report.findings_text(data["findings"])]
    baseline_status = status.get("baseline") or {}
    if status.get("phase") == "Skipped":
        lines.append(f"  the base model meets the target ({baseline_status.get('summary', '')}): nothing was trained")
        lines.append("  set spec.baseline.forceTraining: true (--set baseline.forceTraining=true) to train anyway")
    table = sweep_table(status)
    if table:
        lines.append(f"  rank sweep (holdout {status['sweep'].get('metric')}):")
        lines += ["    " + row for row in table.splitlines()]
    adapter = status.get("adapter")
    if adapter:
        baseline, final = adapter.get("baselineMetrics", {}), adapter.get("metrics", {})
        lines.append(f"  {'metric':<12} {'baseline':>10} {'fine-tuned':>11}")
        for name in sorted(set(baseline) | set(final)):
            b = f"{baseline[name]:.4f}" if name in baseline else "-"
            f = f"{final[name]:.4f}" if name in final else "-"
            lines.append(f"  {name:<12} {b:>10} {f:>11}")
        lines.append(f"  adapter   {adapter['uri']}")
        lines.append(f"  manifest  {adapter['manifestUri']}")
        lines.append(f"  digest    {adapter['digest']} ({adapter.get('sizeBytes', '?')} bytes)")
    merged = status.get("merged")
    if merged:
        lines.append(f"  merged    {merged['uri']} ({merged['digest']}, {merged.get('sizeBytes', '?')} bytes)")
    failure = status.get("failure")
    if failure:
        lines.append(f"  {failure['reason']}: {failure['message']}")
    if duration_seconds is not None:
        lines.append(f"  duration  {duration_seconds:.0f} s")
    lines += list(charts)
    if run_dir is not None:
        lines.append(f"  run directory {run_dir} (trainer.log, config.json)")
    return "\n".join(lines)


def finetunejob_report(job: dict, manifest: dict | None, report_dir: Path, *, run_dir: Path | None = None,
                       duration_seconds: float | None = None, extra_lines: list[str] = ()) -> Report:
    """loss.png, metrics.png and summary.txt of a finished FineTuneJob under `report_dir`. `manifest`: the
    published adapter's manifest (its training.history and bestStep), None when nothing was published."""
    report = Report()
    name = job["metadata"]["name"]
    training = (manifest or {}).get("training") or {}
    adapter = (job.get("status") or {}).get("adapter") or {}
    if manifest is None:
        report.skipped["loss"] = "no adapter was published (the loss history is in its manifest)"
    else:
        _chart(report, "loss", loss_chart, training.get("history") or [], report_dir / LOSS_CHART,
               training.get("bestStep"), f"{name}: training ({training.get('stopReason', '')})")
    _chart(report, "metrics", metrics_chart, adapter.get("baselineMetrics") or {}, adapter.get("metrics") or {},
           report_dir / METRICS_CHART, f"{name}: base model vs fine-tuned (validation split)")
    report.summary_path = report_dir / SUMMARY_FILE
    charts = [*extra_lines, "  report:", *report.lines(), f"    summary  {report.summary_path}"]
    report.summary = finetunejob_summary(job, run_dir, duration_seconds, charts)
    report_dir.mkdir(parents=True, exist_ok=True)
    report.summary_path.write_text(report.summary.lstrip("\n") + "\n")
    return report


# --- AdapterDeployment ---------------------------------------------------------------------------------------


def parse_time(value) -> dt.datetime | None:
    """RFC 3339 ("...Z") or a datetime; None for anything else."""
    if isinstance(value, dt.datetime):
        return value
    return statuswrite.parse_rfc3339(value)


def drift_markers(drift_status: dict) -> list[dict]:
    """Retrain starts and outcomes of one adapter's status.adapters[].drift: {time, kind, label}."""
    markers = []
    for entry in (drift_status or {}).get("history") or []:
        if parse_time(entry.get("startTime")):
            markers.append({"time": entry["startTime"], "kind": "start", "label": f"retrain {entry.get('job')}"})
        if parse_time(entry.get("endTime")):
            markers.append({"time": entry["endTime"], "kind": str(entry.get("outcome", "")).lower(),
                            "label": f"{entry.get('outcome')} {entry.get('job')}"})
    current = (drift_status or {}).get("retrain") or {}
    if parse_time(current.get("startTime")):
        markers.append({"time": current["startTime"], "kind": "start", "label": f"retrain {current.get('job')}"})
    return markers


_MARKER_STYLE = {"start": ("tab:purple", "--"), "promoted": ("tab:green", "-"), "rejected": ("tab:red", "-"),
                 "failed": ("black", ":")}


def _draw_markers(axes, markers: list[dict], label_axis=None) -> None:
    seen: set[str] = set()
    for marker in sorted(markers, key=lambda m: str(m.get("time"))):
        when = parse_time(marker.get("time"))
        if when is None:
            continue
        color, style = _MARKER_STYLE.get(marker.get("kind", ""), ("gray", ":"))
        for axis in axes:
            axis.axvline(when, color=color, linestyle=style, linewidth=1.2,
                         label=marker.get("kind") if marker.get("kind") not in seen and axis is axes[0] else None)
        seen.add(marker.get("kind"))
        if label_axis is not None:
            label_axis.annotate(marker.get("label", ""), (when, 1.0), xycoords=("data", "axes fraction"),
                                rotation=90, va="top", ha="right", fontsize=7, color=color)


def drift_chart(windows: list[dict], path: Path, markers: list[dict] = (), title: str = "") -> Path | str:
    """Per closed drift window (the verdicts of kubetune_operator.stats.analyse): mean confidence against its
    threshold, and the KS statistic against its threshold; drifted windows in red; retrain start,
    promotion and rejection as vertical lines."""
    rows = []
    for window in windows or []:
        triggers = window.get("triggers") or {}
        confidence, entropy = triggers.get("confidence") or {}, triggers.get("entropy") or {}
        when = parse_time(window.get("endTime"))
        if when is None or not _finite(confidence.get("value")):
            continue
        rows.append((when, window, confidence, entropy))
    if not rows:
        return "no drift window was closed (no drift configured, or too few scored requests)"
    rows.sort(key=lambda r: r[0])
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    times = [r[0] for r in rows]
    drifted = [bool(r[1].get("drifted")) for r in rows]
    values = [r[2]["value"] for r in rows]
    top.plot(times, values, "-", color="tab:blue", label="mean confidence")
    top.step(times, [r[2].get("threshold") if _finite(r[2].get("threshold")) else float("nan") for r in rows],
             where="mid", color="tab:red", linestyle="--", label="threshold (below: harm)")
    top.scatter(times, values, c=["tab:red" if d else "tab:blue" for d in drifted], zorder=3)
    stats = [r[3].get("statistic") if _finite(r[3].get("statistic")) else float("nan") for r in rows]
    label = "entropy KS" if all(r[3].get("of", "entropy") == "entropy" for r in rows) else "KS statistic"
    bottom.plot(times, stats, "-", color="tab:blue", label=label)
    bottom.step(times, [r[3].get("threshold") if _finite(r[3].get("threshold")) else float("nan") for r in rows],
                where="mid", color="tab:red", linestyle="--", label="threshold (above: harm)")
    bottom.scatter(times, stats, c=["tab:red" if d else "tab:blue" for d in drifted], zorder=3)
    _draw_markers([top, bottom], list(markers), label_axis=top)
    top.set_title(f"drift windows ({sum(drifted)} of {len(rows)} drifted, in red)")
    top.set_ylabel("mean confidence")
    bottom.set_ylabel(label)
    bottom.set_xlabel("window end (UTC)")
    for axis in (top, bottom):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="best", framealpha=0.6)
    fig.autofmt_xdate()
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _short(version: str | None) -> str:
    return (version or "-").rsplit("@", 1)[-1]


def rollout_chart(timeline: list[dict], answers: list[dict], path: Path, markers: list[dict] = (),
                  title: str = "") -> Path | str:
    """Per alias: the weight of each version over time (stable 100 - canary weight, canary its weight;
    canary steps show as steps), and, with answers, the requests each version answered."""
    weights: dict[str, dict[str, list]] = {}  # alias -> version -> [(time, weight)]
    times = []
    for sample in timeline or []:
        when = parse_time(sample.get("time"))
        if when is None:
            continue
        times.append(when)
        for alias, rec in (sample.get("adapters") or {}).items():
            canary_weight = int(rec.get("canaryWeight") or 0) if rec.get("canary") else 0
            current = {}
            if rec.get("stable"):
                current[rec["stable"]] = 100 - canary_weight
            if rec.get("canary"):
                current[rec["canary"]] = canary_weight
            versions = weights.setdefault(alias, {})
            for version in set(versions) | set(current):
                versions.setdefault(version, []).append((when, current.get(version, 0)))
    answered = [a for a in answers or [] if parse_time(a.get("time")) and a.get("version")]
    if not weights and not answered:
        return "no rollout timeline and no answered requests"
    plt = _pyplot()
    panels = 2 if answered else 1
    fig, axes = plt.subplots(panels, 1, figsize=(10, 3.2 * panels + 0.8), sharex=True, squeeze=False)
    top = axes[0][0]
    for alias, versions in sorted(weights.items()):
        for version, points in sorted(versions.items()):
            when, weight = zip(*points, strict=True)
            top.step(when, weight, where="post", label=f"{alias} {_short(version)}")
    top.set_ylabel("traffic weight %")
    top.set_ylim(-5, 105)
    top.set_title("rollout: weight per version")
    top.grid(alpha=0.3)
    if weights:
        top.legend(fontsize=8, loc="center left")
    axes_list = [top]
    if answered:
        bottom = axes[1][0]
        axes_list.append(bottom)
        start = min(parse_time(a["time"]) for a in answered)
        end = max(parse_time(a["time"]) for a in answered)
        span = max((end - start).total_seconds(), 1.0)
        bins = max(1, min(30, len(answered) // 5))
        width = span / bins
        by_version: dict[str, list[int]] = {}
        for answer in answered:
            index = min(bins - 1, int((parse_time(answer["time"]) - start).total_seconds() / width))
            by_version.setdefault(answer["version"], [0] * bins)[index] += 1
        centers = [start + dt.timedelta(seconds=width * (i + 0.5)) for i in range(bins)]
        bottom_stack = [0] * bins
        for version, counts in sorted(by_version.items()):
            bottom.bar(centers, counts, width=dt.timedelta(seconds=width * 0.9), bottom=bottom_stack,
                       label=f"{_short(version)} ({sum(counts)})")
            bottom_stack = [a + b for a, b in zip(bottom_stack, counts, strict=True)]
        bottom.set_ylabel("requests answered")
        bottom.set_title("answers per version")
        bottom.grid(alpha=0.3, axis="y")
        bottom.legend(fontsize=8)
    _draw_markers(axes_list, list(markers))
    axes_list[-1].set_xlabel("time (UTC)")
    fig.autofmt_xdate()
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _window_line(window: dict) -> str:
    triggers = window.get("triggers") or {}
    confidence, entropy = triggers.get("confidence") or {}, triggers.get("entropy") or {}
    parts = [f"window {window.get('index')}: {window.get('requests')} requests"]
    if _finite(confidence.get("value")):
        parts.append(f"confidence {confidence['value']:.3f} (threshold {confidence.get('threshold', 0):.3f})")
    if _finite(entropy.get("statistic")):
        parts.append(f"KS {entropy['statistic']:.3f} (threshold {entropy.get('threshold', 0):.3f})")
    parts.append("DRIFTED" if window.get("drifted") else "clean")
    return ", ".join(parts)


def adapterdeployment_summary(adep: dict, *, windows: dict[str, list[dict]] | None = None,
                              answers: list[dict] = (), events: list[dict] = (), traffic: str = "",
                              extra_lines: list[str] = ()) -> str:
    """Versions served, the canary's outcome, drift decisions with the gate's numbers (status, the drift
    windows read from storage per adapter name, the answers and Events of the run)."""
    status = adep.get("status") or {}
    meta = adep["metadata"]
    lines = ["", f"AdapterDeployment {meta.get('namespace')}/{meta['name']}: {status.get('phase', 'Pending')}"]
    served: dict[str, int] = {}
    for answer in answers:
        if answer.get("version"):
            served[answer["version"]] = served.get(answer["version"], 0) + 1
    for rec in status.get("adapters") or []:
        stable = rec.get("stable") or {}
        lines.append(f"  {rec.get('alias', rec.get('name'))}: stable {stable.get('version', '-')} "
                     f"({stable.get('digest', '-')})")
        if rec.get("canary"):
            lines.append(f"    canary {rec['canary'].get('version')} at {rec.get('canaryWeight', 0)}%")
        if rec.get("rolledBack"):
            rolled = rec["rolledBack"]
            lines.append(f"    rolled back {rolled.get('version')}: {rolled.get('reason')} {rolled.get('message', '')}")
        drift = rec.get("drift") or {}
        if drift:
            lines.append(f"    drift: {drift.get('state')}")
        for window in (windows or {}).get(rec.get("name"), []):
            lines.append(f"      {_window_line(window)}")
        for entry in drift.get("history") or []:
            lines.append(f"    retrain {entry.get('job')}: {entry.get('outcome')} ({entry.get('reason')}) "
                         f"{entry.get('message', '')}")
            numbers = entry.get("numbers") or {}
            for split in ("new", "original"):
                if isinstance(numbers.get(split), dict):
                    values = ", ".join(f"{who} {int(value)}" if who == "examples" else f"{who} {value:.4f}"
                                       for who, value in sorted(numbers[split].items()) if _finite(value))
                    lines.append(f"      gate {numbers.get('metric', '')} on the {split} holdout: {values}")
    rollout = [e for e in events if e.get("reason") in ("Deploying", "RolloutStarted", "AnalysisPassed", "Promoted",
                                                        "RolledBack")]
    if rollout:
        lines.append("  rollout:")
        lines += [f"    {e.get('time', '')} {e['reason']}: {e.get('message', '')}"[:300] for e in rollout]
    if served:
        lines.append("  versions that answered: " + ", ".join(f"{v} ({n})" for v, n in sorted(served.items())))
    if traffic:
        lines.append(f"  traffic: {traffic}")
    lines += list(extra_lines)
    return "\n".join(lines)


def adapterdeployment_report(adep: dict, report_dir: Path, *, windows: dict[str, list[dict]] | None = None,
                             timeline: list[dict] = (), answers: list[dict] = (), events: list[dict] = (),
                             traffic: str = "", extra_lines: list[str] = ()) -> Report:
    """drift.png (only for adapters with drift), rollout.png and summary.txt under `report_dir`."""
    report = Report()
    name = adep["metadata"]["name"]
    records = (adep.get("status") or {}).get("adapters") or []
    with_drift = [a["name"] for a in adep["spec"].get("adapters") or [] if a.get("drift")]
    if with_drift:
        all_windows = [w for n in with_drift for w in (windows or {}).get(n, [])]
        markers = [m for r in records if r.get("name") in with_drift for m in drift_markers(r.get("drift") or {})]
        _chart(report, "drift", drift_chart, all_windows, report_dir / DRIFT_CHART, markers,
               f"{name}: drift ({', '.join(with_drift)})")
    markers = [{"time": e.get("time"), "kind": {"Promoted": "promoted", "RolledBack": "rejected"}.get(
        e.get("reason"), "start"), "label": e.get("reason")} for e in events
        if e.get("reason") in ("RolloutStarted", "Promoted", "RolledBack")]
    _chart(report, "rollout", rollout_chart, list(timeline), list(answers), report_dir / ROLLOUT_CHART, markers,
           f"{name}: rollout")
    report.summary_path = report_dir / SUMMARY_FILE
    report.summary = adapterdeployment_summary(
        adep, windows=windows, answers=answers, events=events, traffic=traffic,
        extra_lines=[*extra_lines, "  report:", *report.lines(), f"    summary  {report.summary_path}"])
    report_dir.mkdir(parents=True, exist_ok=True)
    report.summary_path.write_text(report.summary.lstrip("\n") + "\n")
    return report

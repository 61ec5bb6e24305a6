"""kubetune_operator.report: the final report of local runs (PNG charts and summary.txt) from synthetic inputs."""

from __future__ import annotations

import builtins

import pytest

from kubetune_operator import report

PNG = b"\x89PNG\r\n\x1a\n"
DIGEST = "sha256:" + "cd" * 32


def is_png(path) -> bool:
    return path.read_bytes()[:8] == PNG and path.stat().st_size > 1000


def history(steps: int = 40) -> list[dict]:
    out = []
    for step in range(1, steps + 1):
        out.append({"step": step, "trainLoss": 2.5 / step, "lr": 0.001, "gradNorm": 1.0})
        if step % 10 == 0:
            out.append({"step": step, "eval_loss": 1.0 / step, "accuracy": min(1.0, step / 30), "macro_f1": 0.5})
    out.append({"step": 20, "thawedBlocks": 2})
    return out


def job(phase: str = "Succeeded", adapter: bool = True) -> dict:
    status: dict = {"phase": phase}
    if adapter:
        status["adapter"] = {"uri": "file:///s/adapter/", "manifestUri": "file:///s/manifest.json", "digest": DIGEST,
                             "sizeBytes": 1234, "metrics": {"accuracy": 0.975, "eval_loss": 0.0123},
                             "baselineMetrics": {"accuracy": 0.0833, "eval_loss": 2.4851}}
    else:
        status["failure"] = {"reason": "BadInput", "message": "invalid_json at line 9"}
    return {"metadata": {"name": "intents", "namespace": "default"}, "status": status}


def test_training_series_splits_steps_evaluations_and_thaws():
    series = report.training_series([*history(), {"step": "x"}, "junk", {"step": 3, "trainLoss": float("nan")}])
    assert len(series["train"]) == 40 and len(series["eval"]) == 4
    assert series["thaws"] == [20] and set(series["metrics"]) == {"accuracy", "macro_f1"}


def test_the_finetunejob_report_writes_both_charts_and_the_summary(tmp_path):
    manifest = {"training": {"history": history(), "bestStep": 30, "stopReason": "completed"}}
    result = report.finetunejob_report(job(), manifest, tmp_path / "report", run_dir=tmp_path / "run",
                                       duration_seconds=42.4, extra_lines=["  sweep chart x.png"])
    assert set(result.charts) == {"loss", "metrics"} and not result.skipped
    assert is_png(tmp_path / "report" / "loss.png") and is_png(tmp_path / "report" / "metrics.png")
    summary = (tmp_path / "report" / "summary.txt").read_text()
    assert summary == result.summary.lstrip("\n") + "\n"
    for text in ("FineTuneJob intents: Succeeded", "0.0833", "0.9750", "2.4851", "0.0123", DIGEST,
                 "file:///s/adapter/", "duration  42 s", str(tmp_path / "report" / "loss.png"),
                 str(tmp_path / "report" / "metrics.png"), "sweep chart x.png"):
        assert text in summary, text


def test_a_failed_job_gets_a_summary_with_the_reasons_the_charts_are_missing(tmp_path):
    result = report.finetunejob_report(job("Failed", adapter=False), None, tmp_path / "report")
    assert result.charts == {} and set(result.skipped) == {"loss", "metrics"}
    summary = (tmp_path / "report" / "summary.txt").read_text()
    assert "FineTuneJob intents: Failed" in summary and "BadInput: invalid_json at line 9" in summary
    assert "loss     skipped: no adapter was published" in summary
    assert "metrics  skipped: no evaluation metrics" in summary
    assert not list((tmp_path / "report").glob("*.png"))


def test_a_manifest_without_history_skips_only_the_loss_chart(tmp_path):
    result = report.finetunejob_report(job(), {"training": {}}, tmp_path / "report")
    assert set(result.charts) == {"metrics"} and "no training history" in result.skipped["loss"]


def test_without_matplotlib_the_charts_are_skipped_with_the_reason(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    result = report.finetunejob_report(job(), {"training": {"history": history()}}, tmp_path / "report")
    assert result.charts == {} and "matplotlib is not installed" in result.skipped["loss"]
    assert "matplotlib is not installed" in (tmp_path / "report" / "summary.txt").read_text()


# --- AdapterDeployment ---------------------------------------------------------------------------------------


def window(index: int, drifted: bool, minute: int) -> dict:
    return {"index": index, "requests": 60, "drifted": drifted, "endTime": f"2026-01-01T10:{minute:02d}:00Z",
            "version": "team-a/intents@aaaaaaaaaaaa",
            "triggers": {"confidence": {"value": 0.5 if drifted else 0.9, "threshold": 0.7, "fired": drifted},
                         "entropy": {"statistic": 0.6 if drifted else 0.1, "threshold": 0.3, "fired": drifted,
                                     "of": "entropy"}}}


def adep(drift: bool = True) -> dict:
    adapter: dict = {"name": "intents", "source": {"uri": "file:///m", "digest": DIGEST}}
    record: dict = {"name": "intents", "alias": "team-a/intents",
                    "stable": {"version": "team-a/intents@bbbbbbbbbbbb", "digest": "sha256:" + "bb" * 32}}
    if drift:
        adapter["drift"] = {"window": {"requests": 60}}
        record["drift"] = {"state": "Watching", "history": [{
            "job": "intents-retrain-1", "outcome": "Promoted", "reason": "Better", "digest": "sha256:" + "bb" * 32,
            "message": "accuracy 0.91 > 0.40 on the new holdout",
            "numbers": {"metric": "accuracy", "new": {"candidate": 0.91, "serving": 0.40},
                        "original": {"candidate": 0.95, "serving": 0.96}},
            "startTime": "2026-01-01T10:03:30Z", "endTime": "2026-01-01T10:06:00Z"}]}
    return {"metadata": {"name": "intents", "namespace": "team-a"},
            "spec": {"adapters": [adapter]}, "status": {"phase": "Ready", "adapters": [record]}}


TIMELINE = [
    {"time": "2026-01-01T10:00:00Z", "adapters": {"team-a/intents": {"stable": "team-a/intents@aaaaaaaaaaaa",
                                                                     "canary": None, "canaryWeight": 0}}},
    {"time": "2026-01-01T10:06:10Z", "adapters": {"team-a/intents": {
        "stable": "team-a/intents@aaaaaaaaaaaa", "canary": "team-a/intents@bbbbbbbbbbbb", "canaryWeight": 50}}},
    {"time": "2026-01-01T10:06:40Z", "adapters": {"team-a/intents": {"stable": "team-a/intents@bbbbbbbbbbbb",
                                                                     "canary": None, "canaryWeight": 0}}},
]
ANSWERS = [{"time": f"2026-01-01T10:0{i // 10}:{i % 10 * 5:02d}.250Z", "status": 200,
            "version": "team-a/intents@aaaaaaaaaaaa" if i < 60 else "team-a/intents@bbbbbbbbbbbb"}
           for i in range(70)]
EVENTS = [{"time": "2026-01-01T10:06:10Z", "reason": "RolloutStarted", "message": "canary bbbbbbbbbbbb"},
          {"time": "2026-01-01T10:06:40Z", "reason": "Promoted", "message": "bbbbbbbbbbbb is stable"},
          {"time": "2026-01-01T10:02:00Z", "reason": "WindowClean", "message": "not a rollout event"}]


def test_the_adapterdeployment_report_draws_drift_and_rollout_and_summarises(tmp_path):
    windows = {"intents": [window(1, False, 1), window(2, True, 2), window(3, True, 3)]}
    result = report.adapterdeployment_report(adep(), tmp_path / "report", windows=windows, timeline=TIMELINE,
                                             answers=ANSWERS, events=EVENTS, traffic="70 sent, 0 failed")
    assert set(result.charts) == {"drift", "rollout"} and not result.skipped
    assert is_png(tmp_path / "report" / "drift.png") and is_png(tmp_path / "report" / "rollout.png")
    summary = (tmp_path / "report" / "summary.txt").read_text()
    for text in ("AdapterDeployment team-a/intents: Ready", "stable team-a/intents@bbbbbbbbbbbb",
                 "window 2: 60 requests, confidence 0.500 (threshold 0.700), KS 0.600 (threshold 0.300), DRIFTED",
                 "window 1: 60 requests", "clean", "retrain intents-retrain-1: Promoted (Better)",
                 "gate accuracy on the new holdout: candidate 0.9100, serving 0.4000",
                 "gate accuracy on the original holdout: candidate 0.9500, serving 0.9600",
                 "RolloutStarted: canary bbbbbbbbbbbb", "Promoted: bbbbbbbbbbbb is stable",
                 "team-a/intents@aaaaaaaaaaaa (60)", "team-a/intents@bbbbbbbbbbbb (10)", "70 sent, 0 failed",
                 str(tmp_path / "report" / "drift.png"), str(tmp_path / "report" / "rollout.png")):
        assert text in summary, text
    assert "WindowClean" not in summary


def test_no_drift_configured_means_no_drift_chart_and_no_data_means_a_reason(tmp_path):
    result = report.adapterdeployment_report(adep(drift=False), tmp_path / "report")
    assert "drift" not in result.charts and "drift" not in result.skipped  # no drift: not even mentioned
    assert "no rollout timeline" in result.skipped["rollout"]
    assert "rollout  skipped" in (tmp_path / "report" / "summary.txt").read_text()
    with_drift = report.adapterdeployment_report(adep(), tmp_path / "again", windows={"intents": []})
    assert "no drift window was closed" in with_drift.skipped["drift"]
    assert not (tmp_path / "again" / "drift.png").exists()


def test_drift_markers_come_from_the_history_and_the_retrain_in_flight():
    status = adep()["status"]["adapters"][0]["drift"]
    status["retrain"] = {"job": "intents-retrain-2", "startTime": "2026-01-01T10:09:00Z"}
    kinds = [(m["kind"], m["label"]) for m in report.drift_markers(status)]
    assert kinds == [("start", "retrain intents-retrain-1"), ("promoted", "Promoted intents-retrain-1"),
                     ("start", "retrain intents-retrain-2")]


@pytest.mark.parametrize("value", ["2026-01-01T10:00:00Z", "2026-01-01T10:00:00.250Z", "2026-01-01T10:00:00+00:00"])
def test_parse_time_reads_rfc3339(value):
    assert report.parse_time(value).hour == 10
    assert report.parse_time("yesterday") is None and report.parse_time(None) is None

"""The baseline gate and the rank sweep for real: `kubetune local` runs the baseline job, the one sweep
process (successive halving over the ranks, the real trainer on the pretrained MiniLM, CLINC150
subset) and the full run with the chosen rank, all through the operator's state machine."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from kubetune.api import sweep_rules

from .test_minilm_clinc import clinc_subset, minilm_spec


def _job_file(tmp_path, train, validation, **spec_extra) -> str:
    doc = {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "clinc-sweep"},
        "spec": {
            **minilm_spec(train, validation, "s3://not-used-locally/prefix", epochs=2),
            **spec_extra,
        },
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def _run(tmp_path, job_file) -> tuple[subprocess.CompletedProcess, dict]:
    result = subprocess.run([sys.executable, "-m", "kubetune_operator.cli", "local", "-f", job_file, "--run-dir",
                             str(tmp_path / "runs"), "--poll", "0.3", "--status-file", str(tmp_path / "status.json")],
                            capture_output=True, text=True, timeout=900, check=False)
    status = json.loads((tmp_path / "status.json").read_text())["status"]
    return result, status


def test_sweep_picks_the_rank_by_its_holdout_metric_then_trains_with_it(tmp_path):
    train, validation, _ = clinc_subset(tmp_path)
    job_file = _job_file(tmp_path, train, validation,
                         baseline={"target": {"metric": "accuracy", "value": 0.9}},
                         rankSweep={"ranks": [1, 16], "metric": "eval_loss"})
    result, status = _run(tmp_path, job_file)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert status["phase"] == "Succeeded"

    # the baseline ran as its own job, below the target: training went ahead
    baseline = status["baseline"]
    assert baseline["source"] == "BaselineJob" and baseline["state"] == "Succeeded" and baseline["met"] is False
    assert baseline["metrics"]["accuracy"] < 0.9

    # every rank was tried on the holdout in one process, halved to one within the budget
    sweep = status["sweep"]
    assert sweep["state"] == "Succeeded" and sweep["usedSteps"] <= sweep["budgetSteps"]
    assert sweep["budgetSteps"] == int(0.3 * sweep["fullRunSteps"])
    trials = {t["rank"]: t for t in sweep["trials"] if "retryOf" not in t}
    assert sorted(trials) == [1, 16]
    assert trials[1]["alpha"] == 2 and trials[16]["alpha"] == 32  # alpha/rank kept at the spec's 16/8
    states = sorted(t["state"] for t in sweep["trials"])
    assert states.count("Succeeded") == 1, sweep["trials"]
    assert all(t["steps"] > 0 and t["seconds"] > 0 for t in sweep["trials"])
    best = sweep_rules.choose(sweep["trials"], "eval_loss")
    assert sweep["bestRank"] == best["rank"] and best["state"] == "Succeeded"
    assert status["rank"] == sweep["bestRank"]

    # the full run trained with the chosen rank, and did not evaluate the base model a second time
    run_dir = next(p for p in (tmp_path / "runs" / "clinc-sweep").iterdir() if (p / "config.json").exists())
    config = json.loads((run_dir / "config.json").read_text())
    assert config["spec"]["method"]["lora"]["rank"] == sweep["bestRank"]
    assert config["stage"]["baseline_metrics"] == baseline["metrics"]
    assert status["adapter"]["baselineMetrics"] == baseline["metrics"]
    assert status["adapter"]["metrics"]["accuracy"] > baseline["metrics"]["accuracy"]
    assert (run_dir / "clinc-sweep-rank-sweep" / "trainer.log").exists()  # one process for the sweep
    assert not list(run_dir.glob("clinc-sweep-sweep-r*"))

    # the summary shows the sweep as a table and as a chart
    assert "rank sweep (holdout eval_loss)" in result.stdout and "<- chosen" in result.stdout
    chart = run_dir / "sweep.png"
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 5_000
    for reason in ("BaselineEvaluated", "SweepStarted", "RankChosen", "AdapterPublished"):
        assert reason in result.stderr


def test_base_model_meeting_the_target_skips_training(tmp_path):
    train, validation, _ = clinc_subset(tmp_path)
    # an eval_loss of 100 is met by any model: the job stops after the baseline job
    job_file = _job_file(tmp_path, train, validation, baseline={"target": {"metric": "eval_loss", "value": 100}},
                         rankSweep={"ranks": [1, 16]})
    result, status = _run(tmp_path, job_file)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert status["phase"] == "Skipped"
    condition = next(c for c in status["conditions"] if c["type"] == "BaselineSufficient")
    assert condition["status"] == "True" and condition["reason"] == "TargetMet"
    assert "forceTraining" in condition["message"]
    assert "sweep" not in status and "adapter" not in status and "trainingJob" not in status
    assert "nothing was trained" in result.stdout

"""The README's `make sweep`: the Makefile recipe as it is, run into a temporary directory (the job's
training three epochs of batch 32, so that 30% of them leave the sweep more than its one-step-per-rung
minimum; the sweep as the recipe sets it). `make run` and
`make serve` are run by tests/local/test_local_serve_quickstart.py through the same scripts
(scripts/run-default.sh, scripts/serve-default.sh); `make test` is CI itself (.ci/run)."""

from __future__ import annotations

import json
import os
import subprocess

from tests.conftest import REPO_ROOT

from .test_local_serve_quickstart import JOB, make_recipe


def test_make_sweep_recipe_sweeps_four_ranks_then_trains_with_the_best(tmp_path):
    recipe = make_recipe("sweep")
    assert recipe.startswith("bash scripts/run-default.sh --set 'baseline=")
    run_dir = tmp_path / "runs"
    result = subprocess.run(f"{recipe} --set training.epochs=3 --poll 0.5", shell=True, capture_output=True,
                            text=True, timeout=900, cwd=REPO_ROOT, check=False,
                            env={**os.environ, "KUBETUNE_RUN_DIR": str(run_dir), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    status = json.loads((run_dir / JOB / "finetunejob.json").read_text())["status"]
    assert status["phase"] == "Succeeded"
    sweep = status["sweep"]
    assert sorted(t["rank"] for t in sweep["trials"] if "retryOf" not in t) == [1, 2, 4, 8]
    assert [t["state"] for t in sweep["trials"]].count("Succeeded") == 1  # halved down to one
    assert sweep["usedSteps"] <= sweep["budgetSteps"] == int(0.3 * sweep["fullRunSteps"])
    assert status["rank"] == sweep["bestRank"]
    assert "rank sweep (holdout eval_loss)" in result.stdout and "<- chosen" in result.stdout

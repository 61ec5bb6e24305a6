"""`kubetune local -f adapterdeployment.yaml`: the drift loop closed end to end on this machine, on real data.

A MiniLM intent classifier trained on a CLINC150 subset is served by the real CPU engine behind a real
agent; in-scope CLINC150 test utterances arrive first, then out-of-scope ones (questions the adapter
has no intent for). The operator's own decisions (reconcile.adapterdeployment.decide,
shell.drift.drift_pass) see the windows drift, start a retrain FineTuneJob (run by `kubetune
local`'s torchrun) on the new labelled data, gate it on the trainer's evaluations, canary it and
promote it. The fast tests at the end check what the command refuses before it starts anything.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kubetune_operator import cli
from tests.conftest import REPO_ROOT, shared_file
from tests.trainer.conftest import make_config, run_in_process, write_jsonl
from tests.trainer.test_minilm_clinc import clinc_subset, minilm_dir, minilm_spec, with_drift_calibrated_head

NS = "team-a"
NAME = "intents"
INTENTS = 7
TRAIN_PER_INTENT = 25
WINDOW = 60  # scored requests per drift window
IN_SCOPE_WINDOWS, OOS_WINDOWS = 2, 4
NEW_IN_SCOPE_PER_INTENT = 5  # labelled in-scope examples next to the out-of-scope ones


def clinc() -> dict:
    return json.loads(shared_file("datasets", "clinc150", "data_full.json").read_text())


def train_serving_adapter(root: Path) -> tuple[dict, str, list[str], Path, Path]:
    """The adapter in production: MiniLM + LoRA on INTENTS intents, published to a file:// store with
    its drift profile (the validation set's confidences)."""
    (root / "data").mkdir()
    train, validation, intents = clinc_subset(root / "data", INTENTS, TRAIN_PER_INTENT)
    spec = with_drift_calibrated_head(minilm_spec(train, validation, f"file://{root / 'store'}", epochs=4))
    config = make_config(spec, name=NAME)
    manifest = run_in_process(config, root / "work")
    assert manifest["driftProfile"]["kind"] == "classification"
    return manifest, config.storage.manifest_uri, intents, train, validation


def write_labelled(path: Path, data: dict, intents: list[str]) -> int:
    """What labelling the new traffic produced: CLINC150's out-of-scope training questions labelled
    "oos", plus in-scope examples the serving adapter never saw (so "new" also guards the old intents)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"text": text, "label": "oos"} for text, _ in data["oos_train"]]
    seen = dict.fromkeys(intents, 0)
    for text, intent in data["train"]:
        if intent in seen:
            seen[intent] += 1
            if TRAIN_PER_INTENT < seen[intent] <= TRAIN_PER_INTENT + NEW_IN_SCOPE_PER_INTENT:
                rows.append({"text": text, "label": intent})
    write_jsonl(path, rows)
    return len(rows)


def write_traffic(path: Path, data: dict, intents: list[str]) -> int:
    """Two windows of in-scope test utterances, then out-of-scope questions: the model is hurt. The
    in-scope ones are shuffled (the test split is grouped by intent; real traffic mixes them, and a window
    of two intents is a real shift of its own)."""
    in_scope = [text for text, intent in data["test"] if intent in intents]
    random.Random(0).shuffle(in_scope)
    in_scope = in_scope[:IN_SCOPE_WINDOWS * WINDOW]
    oos = [text for text, _ in data["oos_test"]][:OOS_WINDOWS * WINDOW]
    lines = [{"path": "/classify", "body": {"input": text}} for text in in_scope + oos]
    write_jsonl(path, lines)
    return len(lines)


def adapterdeployment(root: Path, manifest_uri: str, digest: str, train: Path, validation: Path) -> dict:
    template = with_drift_calibrated_head(minilm_spec(train, validation, f"file://{root / 'retrains'}", epochs=3))
    template.pop("dataset")  # the operator fills it in: the serving adapter's data plus the new labelled data
    return {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "AdapterDeployment",
        "metadata": {"name": NAME, "namespace": NS},
        "spec": {
            "baseModel": {"uri": f"file://{minilm_dir()}"},
            "runtime": {"engine": "kubetune-cpu", "managed": {"replicas": 1}},  # a classifier: not on vLLM
            "adapters": [{
                "name": NAME,
                "source": {"uri": manifest_uri, "digest": digest},
                "drift": {
                    "window": {"requests": WINDOW, "minRequests": 30},
                    "embeddings": False,
                    "guard": {"triggerWindows": 2, "ofWindows": 3, "clearWindows": 2, "cooldownSeconds": 0},
                    "retrain": {"labelledData": {"uri": f"file://{root / 'labelled'}/", "minExamples": 40},
                                "template": {"spec": template}},
                    "promotion": {"maxRegression": 0.05},
                },
            }],
            "strategy": {"type": "Canary", "unloadGraceSeconds": 0,
                         "canary": {"steps": [{"setWeight": 50}, {"pause": {"seconds": 1}}, {"setWeight": 100}]}},
            "trafficSampling": {"rate": 1.0, "uri": f"file://{root / 'samples'}"},
        },
    }


@pytest.mark.integration  # slow (~3 min on 2 cores): two trainings, an engine, an agent, real traffic
def test_drift_retrain_gate_and_canary_close_the_loop_in_kubetune_local(tmp_path):
    started = time.monotonic()
    data = clinc()
    manifest, manifest_uri, intents, train, validation = train_serving_adapter(tmp_path)
    trained = time.monotonic()
    labelled = write_labelled(tmp_path / "labelled" / "batch-1.jsonl", data, intents)
    requests = write_traffic(tmp_path / "traffic.jsonl", data, intents)
    adep_file = tmp_path / "adep.yaml"
    adep_file.write_text(yaml.safe_dump(adapterdeployment(tmp_path, manifest_uri, manifest["digest"], train,
                                                          validation)))
    status_file = tmp_path / "status.json"
    command = [sys.executable, "-m", "kubetune_operator.cli", "local", "-f", str(adep_file), "--run-dir",
               str(tmp_path / "runs"), "--traffic", str(tmp_path / "traffic.jsonl"), "--until", "promoted",
               "--max-seconds", "600", "--poll", "0.5", "--status-file", str(status_file)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO_ROOT, check=False)
    finished = time.monotonic()
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]

    events = [line.split(":", 1)[0].split()[-1] for line in result.stdout.splitlines() if line.startswith("EVENT ")]
    order = [events.index(reason) for reason in ("Deploying", "DriftDetected", "RetrainStarted", "CandidatePromoted",
                                                 "RolloutStarted", "Promoted")]
    assert order == sorted(order), events
    assert events.count("RetrainStarted") == 1
    # the guard fired on the out-of-scope questions, not on in-scope traffic alone (2 of 3 windows)
    drifted = {int(line.split(" window ", 1)[1].split()[0]) for line in result.stdout.splitlines()
               if line.startswith("EVENT Warning WindowDrifted:")}
    assert not {1, 2} <= drifted, result.stdout[-6000:]

    adep = json.loads(status_file.read_text())
    record = adep["status"]["adapters"][0]
    drift = record["drift"]
    assert len(drift["history"]) == 1, drift["history"]
    entry = drift["history"][0]
    assert entry["outcome"] == "Promoted", entry
    numbers = entry["numbers"]
    assert numbers["metric"] == "accuracy"
    assert numbers["new"]["candidate"] > numbers["new"]["serving"], numbers  # it learned what the serving one lacks
    assert numbers["original"]["serving"] - numbers["original"]["candidate"] <= 0.05, numbers
    assert record["stable"]["digest"] == entry["digest"] != manifest["digest"]
    assert drift["promoted"]["digest"] == entry["digest"]
    assert adep["status"]["phase"] == "Ready"
    retrains = sorted(p.name for p in (tmp_path / "runs" / NAME / "retrains").iterdir())
    assert retrains == [entry["job"]]  # exactly one retrain FineTuneJob ran

    # the promoted adapter answers the out-of-scope questions it was retrained for
    assert "reached --until promoted" in result.stdout
    report = tmp_path / "runs" / NAME / "report"  # the final report: charts and summary
    for chart in ("drift.png", "rollout.png"):
        assert (report / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", chart
    summary = (report / "summary.txt").read_text()
    assert f"retrain {entry['job']}: Promoted" in summary and "DRIFTED" in summary and "gate accuracy" in summary
    print(f"\nlocal drift loop: serving adapter trained in {trained - started:.0f} s, kubetune local "
          f"(engine, agent, {requests} requests, drift, retrain on {labelled} labelled examples, gate, canary) "
          f"{finished - trained:.0f} s, total {finished - started:.0f} s")
    print(f"gate: {entry['message']}")


# --- what the command refuses before it starts anything -----------------------------------------------


def _base_dir(tmp_path: Path) -> Path:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    return base


def _adep(tmp_path: Path, source: dict, **spec) -> Path:
    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "AdapterDeployment",
           "metadata": {"name": "svc", "namespace": NS},
           "spec": {"baseModel": {"uri": f"file://{_base_dir(tmp_path)}"}, "runtime": {"managed": {"replicas": 1}},
                    "adapters": [{"name": "intents", "source": source}], "strategy": {"type": "Immediate"},
                    **spec}}
    path = tmp_path / "adep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


URI_SOURCE = {"uri": "file:///nowhere/manifest.json", "digest": "sha256:" + "0" * 64}


def local(path: Path, tmp_path: Path, *extra: str) -> int:
    return cli.main(["local", "-f", str(path), "--run-dir", str(tmp_path / "runs"), "--until", "never", *extra])


def test_a_finetunejob_source_that_never_ran_locally_is_refused_with_what_to_do_instead(tmp_path, capsys):
    path = _adep(tmp_path, {"fineTuneJobRef": {"name": "intents-train"}})
    assert local(path, tmp_path) == 2
    err = capsys.readouterr().err
    assert "spec.adapters[0].source.fineTuneJobRef" in err
    assert "has not run with `kubetune local`" in err and "kubetune local -f" in err
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written


def test_an_invalid_spec_exits_2_with_its_field_path(tmp_path, capsys):
    path = _adep(tmp_path, URI_SOURCE, strategy={"type": "Sideways"})
    assert local(path, tmp_path) == 2
    assert "spec.strategy.type" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_base_model_outside_this_machine_is_refused(tmp_path, capsys):
    path = _adep(tmp_path, URI_SOURCE)
    doc = yaml.safe_load(path.read_text())
    doc["spec"]["baseModel"]["uri"] = "hf://sentence-transformers/all-MiniLM-L6-v2"
    path.write_text(yaml.safe_dump(doc))
    assert local(path, tmp_path) == 2
    assert "spec.baseModel.uri: local mode serves a base model from a local directory" in capsys.readouterr().err


def test_a_bad_traffic_line_is_refused_with_its_number(tmp_path, capsys):
    traffic = tmp_path / "traffic.jsonl"
    traffic.write_text('{"body": {"input": "hi"}}\nnot json\n')
    assert local(_adep(tmp_path, URI_SOURCE), tmp_path, "--traffic", str(traffic)) == 2
    assert f"--traffic {traffic} line 2: not JSON" in capsys.readouterr().err


def test_until_drift_needs_an_adapter_with_drift(tmp_path, capsys):
    path = _adep(tmp_path, URI_SOURCE)
    assert cli.main(["local", "-f", str(path), "--run-dir", str(tmp_path / "runs"), "--until", "drifted"]) == 2
    assert "--until drifted: no adapter has drift" in capsys.readouterr().err


def test_local_names_the_kinds_it_found_when_it_cannot_choose(tmp_path, capsys):
    path = tmp_path / "two.yaml"
    objects = [{"apiVersion": "kubetune.io/v1alpha1", "kind": "AdapterDeployment", "metadata": {"name": name},
                "spec": {}} for name in ("a", "b")]
    path.write_text(yaml.safe_dump_all(objects))
    assert cli.main(["local", "-f", str(path)]) == 2
    assert "found AdapterDeployment, AdapterDeployment" in capsys.readouterr().err

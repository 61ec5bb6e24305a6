"""The data stage as its CPU pod runs it (the rendered pod, verbatim): one process, the tokenizer's files and
no weights."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from kubetune.api import jobconfig
from kubetune.api.v1alpha1.finetunejob_status import DATA_STATUS
from kubetune.clients.storage import ObjectStore

from .conftest import WORDS, job_spec, make_config, run_pods, write_jsonl
from .rendered import json_lines
from .test_entrypoint import progress_of

DATA_STAGE = jobconfig.Stage(kind=jobconfig.STAGE_DATA)


@pytest.fixture(scope="module")
def tokenizer_only(tiny_llama, tmp_path_factory) -> Path:
    """The tiny model's directory without its weights: the data stage must not need them."""
    target = tmp_path_factory.mktemp("tokenizer-only") / "model"
    shutil.copytree(tiny_llama, target, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return target


def row(start: int, length: int = 3) -> dict:
    words = [WORDS[(start + i) % len(WORDS)] for i in range(length + 3)]
    return {"prompt": " ".join(words[:3]), "completion": " ".join(words[3:])}


def result_of(config: jobconfig.JobConfig) -> dict | None:
    raw = ObjectStore().read(config.storage.result_uri)
    return json.loads(raw) if raw else None


def test_the_data_stage_measures_the_dataset_from_the_tokenizer_files_alone(tokenizer_only, tmp_path):
    train_rows = [row(i) for i in range(24)]
    train_rows.append({k: v.upper() + "!" for k, v in train_rows[0].items()})  # line 25 repeats line 1
    train_rows.append(row(0, length=80))  # line 26: longer than maxSeqLength 64, truncated
    validation_rows = [{"prompt": train_rows[5]["prompt"].title() + ".", "completion": train_rows[5]["completion"]},
                       row(30), {"prompt": "  " + train_rows[7]["prompt"], "completion": train_rows[7]["completion"]},
                       row(31)]
    train = write_jsonl(tmp_path / "train.jsonl", train_rows)
    validation = write_jsonl(tmp_path / "validation.jsonl", validation_rows)
    spec = job_spec(tokenizer_only, train, tmp_path / "out",
                    dataset={"uri": f"file://{train}", "validationUri": f"file://{validation}",
                             "format": "prompt-completion"})
    config = make_config(spec, name="data-stage", stage=DATA_STAGE)
    assert config.storage.job_prefix.endswith("/data/")

    done = run_pods(config, tmp_path)
    assert done.returncode == jobconfig.EXIT_OK, done.stderr[-3000:]
    document = result_of(config)
    assert {k: document[k] for k in ("api", "kind", "job")} == {
        "api": jobconfig.STAGE_RESULT_API, "kind": "data",
        "job": {"namespace": "test", "name": "data-stage", "uid": "uid-data-stage"}}
    report = document["data"]
    assert set(report) == set(DATA_STATUS["properties"]) - {"job", "state", "message"}
    sha = [f"sha256:{hashlib.sha256(p.read_bytes()).hexdigest()}" for p in (train, validation)]
    assert report["digest"] == "+".join(sha)
    assert report["examples"] == {"train": 26, "validation": 2}  # validation lines 1 and 3 dropped
    assert report["invalidLines"] == 0 and report["labels"] == []
    assert report["leakage"] == {"policy": "Drop", "matched": 2, "dropped": 2}
    assert report["duplicates"] == {"withinTrain": 1, "withinValidation": 0, "acrossSplits": 2}
    assert report["truncated"] == {"train": round(1 / 26, 6), "validation": 0.0}
    assert report["tokens"]["train"]["max"] > 64  # measured before truncation
    assert 0 < report["tokens"]["train"]["p50"] <= report["tokens"]["train"]["p95"] < 64
    assert progress_of(config)["stage"] == "done"
    pod_logs = tmp_path.glob("pods-data-stage/*/container.log")
    assert [line["data"] for log in pod_logs for line in json_lines(log) if "data" in line] == [report]
    assert not list(tmp_path.rglob("*.safetensors"))


def test_bad_data_exits_2_with_its_line_numbers_and_no_result(tokenizer_only, tmp_path):
    lines = [json.dumps(row(i)) for i in range(10)]
    lines[3] = '{"prompt": "alpha", "completion": '
    lines[6] = '{"prompt": "alpha"}'
    data = write_jsonl(tmp_path / "train.jsonl", lines)
    config = make_config(job_spec(tokenizer_only, data, tmp_path / "out"), name="bad-data", stage=DATA_STAGE)
    assert run_pods(config, tmp_path).returncode == jobconfig.EXIT_BAD_INPUT  # the launcher passes 2 through
    failure = progress_of(config)["failure"]
    assert failure["reason"] == "BadInput"
    assert "invalid_json: 1 (line 4)" in failure["message"] and "missing_field: 1 (line 7)" in failure["message"]
    assert result_of(config) is None


def test_a_bad_evaluation_set_is_refused_before_any_gpu(tokenizer_only, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [row(i) for i in range(10)])
    holdout = write_jsonl(tmp_path / "holdout.jsonl", [row(20), row(21), '{"prompt": "alpha"}'])
    spec = job_spec(tokenizer_only, data, tmp_path / "out",
                    evaluation={"sets": [{"name": "holdout", "uri": f"file://{holdout}"}]})
    config = make_config(spec, name="bad-set", stage=DATA_STAGE)
    assert run_pods(config, tmp_path).returncode == jobconfig.EXIT_BAD_INPUT
    message = progress_of(config)["failure"]["message"]
    assert "evaluation set 'holdout'" in message and "the first at line 3 (missing_field" in message
    assert result_of(config) is None


def leaky_job(tokenizer_only: Path, tmp_path: Path, policy: str, stage: jobconfig.Stage | None = DATA_STAGE):
    train = write_jsonl(tmp_path / "train.jsonl", [row(i) for i in range(12)])
    copies = [{"prompt": row(i)["prompt"].upper(), "completion": row(i)["completion"] + "."} for i in (2, 9)]
    validation = write_jsonl(tmp_path / "validation.jsonl", [row(20), copies[0], row(21), copies[1]])
    spec = job_spec(tokenizer_only, train, tmp_path / "out",
                    dataset={"uri": f"file://{train}", "validationUri": f"file://{validation}",
                             "format": "prompt-completion", "leakage": policy})
    return make_config(spec, name=f"leak-{policy.lower()}", stage=stage)


def test_leakage_fail_refuses_naming_both_lines(tokenizer_only, tmp_path):
    config = leaky_job(tokenizer_only, tmp_path, "Fail")
    assert run_pods(config, tmp_path).returncode == jobconfig.EXIT_BAD_INPUT
    message = progress_of(config)["failure"]["message"]
    assert "dataset.leakage is Fail and 2 validation examples copy training examples" in message
    assert "validation line 2 = training line 3, validation line 4 = training line 10" in message
    assert result_of(config) is None


def test_leakage_warn_keeps_and_counts(tokenizer_only, tmp_path):
    config = leaky_job(tokenizer_only, tmp_path, "Warn")
    assert run_pods(config, tmp_path).returncode == jobconfig.EXIT_OK
    report = result_of(config)["data"]
    assert report["leakage"] == {"policy": "Warn", "matched": 2, "dropped": 0}
    assert report["examples"] == {"train": 12, "validation": 4}


def test_training_sees_the_splits_the_data_stage_reported(tiny_llama, tmp_path):
    """The same policy in every stage: the training run's manifest drops the rows the data stage dropped."""
    config = leaky_job(tiny_llama, tmp_path, "Drop", stage=None)
    config = make_config({**config.spec, "training": {**config.spec["training"], "maxSteps": 1}}, name="leak-train")
    assert run_pods(config, tmp_path).returncode == jobconfig.EXIT_OK
    manifest = json.loads(ObjectStore().read(config.storage.manifest_uri))
    assert manifest["dataset"]["leakage"] == {"policy": "Drop", "matched": 2, "dropped": 2}
    assert (manifest["dataset"]["trainExamples"], manifest["dataset"]["validationExamples"]) == (12, 2)

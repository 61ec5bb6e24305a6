"""`kubetune validate` and `kubetune render` on the shipped examples and on broken input."""

from __future__ import annotations

import pytest
import yaml

from kubetune_operator import cli
from tests.conftest import REPO_ROOT

EXAMPLES = sorted((REPO_ROOT / "examples").glob("finetunejob-*.yaml")) + sorted(
    (REPO_ROOT / "examples").glob("adapterdeployment-*.yaml"))


def test_examples_exist_for_the_documented_cases():
    names = {p.name for p in EXAMPLES}
    assert {"finetunejob-lora-7b-zero3.yaml", "finetunejob-qlora.yaml"} <= names


def test_every_example_validates(capsys):
    for example in EXAMPLES:
        assert cli.main(["validate", "-f", str(example)]) == 0, example
    assert "valid" in capsys.readouterr().out


def test_render_prints_the_children(capsys):
    assert cli.main(["render", "-f", str(REPO_ROOT / "examples" / "finetunejob-lora-7b-zero3.yaml")]) == 0
    documents = list(yaml.safe_load_all(capsys.readouterr().out))
    # the CPU-only data stage, then the training job it lets start
    assert [d["kind"] for d in documents] == ["ConfigMap", "PyTorchJob", "ConfigMap", "PyTorchJob"]
    data_stage = documents[1]
    assert data_stage["metadata"]["name"].endswith("-data") and data_stage["spec"]["nprocPerNode"] == "1"
    assert "nvidia.com/gpu" not in str(data_stage["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
                                       ["containers"][0]["resources"])
    pytorchjob = documents[3]
    assert pytorchjob["metadata"]["namespace"] == "team-a"
    assert pytorchjob["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    assert pytorchjob["spec"]["nprocPerNode"] == "8"


def test_render_shows_trainjobs_for_backend_trainjob(tmp_path, capsys):
    doc = yaml.safe_load((REPO_ROOT / "examples" / "finetunejob-lora-7b-zero3.yaml").read_text())
    doc["spec"]["backend"] = "TrainJob"
    # a TrainJob's runtime, not the job, owns these: validation refuses them by name (test_trainjob_backend)
    del doc["spec"]["scheduling"]["priorityClassName"], doc["spec"]["runPolicy"]["ttlSecondsAfterFinished"]
    path = tmp_path / "trainjob.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert cli.main(["render", "-f", str(path)]) == 0
    documents = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in documents] == ["ConfigMap", "TrainJob", "ConfigMap", "TrainJob"]
    trainer = documents[3]["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 8)
    assert documents[3]["spec"]["runtimeRef"]["name"] == "torch-distributed"


def test_validate_reports_field_paths(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    doc = yaml.safe_load((REPO_ROOT / "examples" / "finetunejob-qlora.yaml").read_text())
    del doc["spec"]["method"]["quantization"]
    doc["spec"]["training"]["epochs"] = 2
    doc["spec"]["method"]["lora"]["rank"] = 1024
    bad.write_text(yaml.safe_dump(doc))
    assert cli.main(["validate", "-f", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "spec.method.lora.rank: 1024 is greater than the maximum of 512" in err
    # structural errors come first; once fixed, the CEL rules speak
    doc["spec"]["method"]["lora"]["rank"] = 64
    bad.write_text(yaml.safe_dump(doc))
    assert cli.main(["validate", "-f", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "spec.method.quantization: method.quantization is required when method.type is QLoRA" in err
    assert "spec.training: training: set at most one of training.epochs or training.maxSteps" in err


def test_render_refuses_an_invalid_job(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    doc = yaml.safe_load((REPO_ROOT / "examples" / "finetunejob-qlora.yaml").read_text())
    doc["spec"]["training"]["epochs"] = 1
    bad.write_text(yaml.safe_dump(doc))
    assert cli.main(["render", "-f", str(bad)]) == 2
    assert "at most one of training.epochs or training.maxSteps" in capsys.readouterr().err


def test_generate_check_passes_on_the_committed_tree():
    assert cli.main(["generate", "--check"]) == 0


def test_render_shows_an_adapterdeployments_children(capsys):
    assert cli.main(["render", "-f", str(REPO_ROOT / "examples" / "adapterdeployment-canary.yaml")]) == 0
    kinds = [d["kind"] for d in yaml.safe_load_all(capsys.readouterr().out)]
    assert kinds == ["ConfigMap", "ServiceAccount", "Role", "RoleBinding", "Deployment", "Service"]


def test_unreadable_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert cli.main(["validate", "-f", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing.yaml'}: No such file or directory"
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [\n")
    assert cli.main(["render", "-f", str(broken)]) == 2
    assert f"error: {broken}:2: document 1: not valid YAML" in capsys.readouterr().err
    broken.write_text("- a list\n")
    assert cli.main(["local", "-f", str(broken)]) == 2
    assert "document 1: a list, not a Kubernetes object" in capsys.readouterr().err


def test_the_invalid_example_is_refused_with_field_paths(capsys):
    assert cli.main(["validate", "-f", str(REPO_ROOT / "examples" / "invalid" / "finetunejob-qlora-broken.yaml")]) == 2
    err = capsys.readouterr().err
    assert "spec.method.quantization: method.quantization is required when method.type is QLoRA" in err
    assert "spec.training: training: set at most one of training.epochs or training.maxSteps" in err


def test_a_traffic_file_that_is_not_utf8_is_one_line(tmp_path):
    from kubetune_operator.local.inputs import LocalServingError, read_traffic

    traffic = tmp_path / "traffic.jsonl"
    traffic.write_bytes('{"input": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(LocalServingError, match=r"traffic.jsonl: not UTF-8 \(byte 0xe9 at offset 14\)"):
        read_traffic(traffic, "default/intents")


@pytest.mark.parametrize(("raised", "code", "line"), [
    (RuntimeError("the disk moved"), 2, "error: kubetune stopped on an unexpected problem (please report it): the "
                                        "disk moved"),
    (PermissionError(13, "Permission denied", "/runs/job"), 2, "error: /runs/job: Permission denied"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_main_turns_any_failure_into_one_line(monkeypatch, tmp_path, capsys, raised, code, line):
    def fails(args):
        raise raised

    monkeypatch.setattr(cli, "cmd_validate", fails)
    assert cli.main(["validate", "-f", str(tmp_path / "x.yaml")]) == code
    assert capsys.readouterr().err == line + "\n"

"""The trainer's entrypoint as a pod runs it: exit codes, error reports, and what is (not) published."""

from __future__ import annotations

import json
from pathlib import Path

from kubetune.api import jobconfig, storage_layout
from kubetune.clients.storage import ObjectStore, check_published
from kubetune_operator.clients.base_models import read_identity
from kubetune_trainer.__main__ import main

from .conftest import job_spec, lm_corpus, make_config, manifest_of, write_jsonl


def run_main(config: jobconfig.JobConfig, tmp_path: Path) -> int:
    path = tmp_path / "config.json"
    path.write_text(config.to_json())
    return main(["--config", str(path), "--work-dir", str(tmp_path / "work")])


def progress_of(config: jobconfig.JobConfig) -> dict:
    raw = ObjectStore().read(storage_layout.progress_uri(config.storage.job_prefix))
    return json.loads(raw) if raw else {}


def nothing_published(config: jobconfig.JobConfig) -> bool:
    store = ObjectStore()
    files = store.list(config.storage.job_prefix)
    return not [f for f in files if not f.endswith(storage_layout.PROGRESS_FILE)]


def test_every_data_error_class_is_reported_with_its_line_before_training(tiny_llama, tmp_path):
    good = [json.dumps(r) for r in lm_corpus(20)]
    lines = [
        *good[:3],
        '{"prompt": "a", "completion": ',  # 4 invalid_json
        '["prompt", "completion"]',  # 5 not_an_object
        '{"prompt": "alpha beta"}',  # 6 missing_field
        '{"prompt": "alpha", "completion": ""}',  # 7 empty_field
        '{"prompt": 3, "completion": "beta"}',  # 8 wrong_type
        "",  # 9 empty_line
        '{"prompt": "' + "alpha " * 80 + '", "completion": "beta"}',  # 10 too_long (prompt fills maxSeqLength)
        *good[3:],
    ]
    data = write_jsonl(tmp_path / "train.jsonl", lines)
    data.write_bytes(data.read_bytes() + b'{"prompt": "\xff\xfe", "completion": "x"}\n')  # invalid_utf8, last line
    config = make_config(job_spec(tiny_llama, data, tmp_path / "out"), name="bad-data")
    assert run_main(config, tmp_path) == jobconfig.EXIT_BAD_INPUT
    failure = progress_of(config)["failure"]
    assert failure["reason"] == "BadInput"
    last_line = len(lines) + 1
    for error_class, line in [("invalid_json", 4), ("not_an_object", 5), ("missing_field", 6), ("empty_field", 7),
                              ("wrong_type", 8), ("empty_line", 9), ("too_long", 10), ("invalid_utf8", last_line)]:
        assert error_class in failure["message"], error_class
        assert f"line {line}" in failure["message"] or f"lines {line}" in failure["message"] or \
            f"{line}" in failure["message"].split(error_class, 1)[1].split("\n", 1)[0], (error_class, line)
    assert nothing_published(config)


def test_chat_and_label_error_classes(tiny_llama, tmp_path):
    lines = [json.dumps({"messages": [{"role": "user", "content": "alpha"}, {"role": "assistant", "content": "b"}]}),
             json.dumps({"messages": [{"role": "bot", "content": "alpha"}]}),
             json.dumps({"messages": [{"role": "user", "content": "alpha"}]})]
    data = write_jsonl(tmp_path / "chat.jsonl", lines)
    spec = job_spec(tiny_llama, data, tmp_path / "out", dataset={"uri": f"file://{data}", "format": "chat"})
    config = make_config(spec, name="bad-chat")
    assert run_main(config, tmp_path) == jobconfig.EXIT_BAD_INPUT
    message = progress_of(config)["failure"]["message"]
    assert "unknown_role" in message and "missing_assistant_turn" in message


def test_a_tolerated_share_of_bad_lines_is_skipped_and_training_runs(tiny_llama, tmp_path):
    lines = [json.dumps(r) for r in lm_corpus(40)] + ['{"prompt": "x"}']
    data = write_jsonl(tmp_path / "train.jsonl", lines)
    spec = job_spec(tiny_llama, data, tmp_path / "out", dataset__maxInvalidFraction=0.05, training__maxSteps=3)
    config = make_config(spec, name="tolerated")
    assert run_main(config, tmp_path) == jobconfig.EXIT_OK
    manifest = manifest_of(config)
    assert manifest["dataset"]["trainExamples"] + manifest["dataset"]["validationExamples"] == 40


def test_unknown_target_module_lists_the_real_linear_names(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", lm_corpus(20))
    spec = job_spec(tiny_llama, data, tmp_path / "out",
                    method={"type": "LoRA", "lora": {"targetModules": ["query", "v_proj"]}})
    config = make_config(spec, name="bad-target")
    assert run_main(config, tmp_path) == jobconfig.EXIT_BAD_INPUT
    message = progress_of(config)["failure"]["message"]
    assert "['query']" in message
    for real in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert real in message
    assert nothing_published(config)


def test_published_adapter_verifies_and_a_tampered_file_fails(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", lm_corpus(40))
    config = make_config(job_spec(tiny_llama, data, tmp_path / "out", training__maxSteps=4), name="publish")
    assert run_main(config, tmp_path) == jobconfig.EXIT_OK
    store = ObjectStore()
    check = check_published(store, config.storage.job_prefix)
    assert check.verified, check.problems
    manifest = check.document
    paths = {f["path"] for f in manifest["files"]}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= paths
    assert manifest["baseModel"]["uri"] == f"file://{tiny_llama}"
    # the base's identity: what the operator compares with the served base (kubetune.api.base_identity)
    served, _ = read_identity(store, {"uri": f"file://{tiny_llama}"})
    assert manifest["baseModel"]["identity"] == served and served["weightsDigest"].startswith("sha256:")
    assert manifest["dataset"]["digest"].startswith("sha256:")
    assert manifest["config"]["method"]["lora"]["rank"] == 4
    assert manifest["trainer"]["version"]
    profile = manifest["driftProfile"]
    assert profile["kind"] == "causal-lm"
    # every holdout prompt answered greedily, scored as serving scores answers; teacher forcing kept aside
    holdout = manifest["dataset"]["validationExamples"]
    assert profile["decoding"] == {"method": "greedy", "maxTokens": 32, "topLogprobs": 5, "stopTokenScored": True,
                                   "prompts": holdout, "answered": holdout}  # an EOS at once is a scored position
    assert profile["teacherForced"]["confidence"]["count"] == holdout
    assert len(profile["entropy"]["values"]) == profile["confidence"]["count"] == holdout
    assert profile["inputTokens"]["mean"] > 0 and "alpha" in profile["vocabulary"]
    assert progress_of(config)["stage"] == "done"

    target = Path(storage_layout.split_uri(check.adapter_uri)[2]) / "adapter_model.safetensors"
    blob = bytearray(target.read_bytes())
    blob[-1] ^= 0xFF
    target.write_bytes(bytes(blob))
    tampered = check_published(store, config.storage.job_prefix)
    assert not tampered.verified
    assert tampered.problems[0].reason == "DigestMismatch"


def test_the_module_entry_exits_with_mains_code_and_every_line_flushed(tmp_path):
    """`python -m kubetune_trainer` ends through `exit_without_teardown` (os._exit, no interpreter teardown:
    see its docstring): the exit code is still main's, argparse's and SIGTERM's, and nothing printed is lost."""
    import subprocess
    import sys

    def entry(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kubetune_trainer", *args], capture_output=True, text=True,
                              timeout=120, check=False)

    missing = entry("--config", str(tmp_path / "missing.json"))
    assert missing.returncode == jobconfig.EXIT_BAD_INPUT
    assert json.loads(missing.stderr.strip().splitlines()[-1])["message"] == "cannot read the job config"
    usage = entry("--no-such-flag")
    assert usage.returncode == 2 and "unrecognized arguments: --no-such-flag" in usage.stderr
    helped = entry("--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: kubetune_trainer")

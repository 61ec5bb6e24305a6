"""The data stage's pure parts: leakage matching and policy, the report's figures, the tokenizer's files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.api.v1alpha1.dataset import LEAKAGE_POLICIES
from kubetune.api.v1alpha1.finetunejob_status import DATA_STATUS
from kubetune.clients.storage import ObjectStore
from kubetune_trainer import data_report, dataset_input, leakage, tokenizer_files
from kubetune_trainer.data import Record, load_dataset
from kubetune_trainer.errors import BadInput


def jsonl(*rows: dict) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def pc(prompt: str, completion: str) -> dict:
    return {"prompt": prompt, "completion": completion}


# --- normalised matching -----------------------------------------------------------------------------------


def test_normalise_ignores_case_whitespace_and_punctuation():
    assert leakage.normalise("  Hello,   WORLD!\n\tHow's it going?") == "hello world hows it going"
    assert leakage.normalise("Straße") == leakage.normalise("STRASSE")  # case-folded, not just lowered
    assert leakage.normalise("\uff26ULL \uff37idth") == "full width"  # NFKC: full-width forms
    assert leakage.normalise("a-b") == "ab" and leakage.normalise("a b") == "a b"  # punctuation removed, not spaced
    assert leakage.normalise("x + y = 2") == "x + y = 2"  # symbols and digits are text


def test_match_parts_per_format():
    assert leakage.match_parts(pc("p", "c"), "prompt-completion") == ["p", "c"]
    chat = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                         {"role": "assistant", "content": "a"}]}
    assert leakage.match_parts(chat, "chat") == ["s", "u", "a"]
    assert leakage.match_parts({"text": "t"}, "text") == ["t"]
    assert leakage.match_parts({"text": "t", "label": "pos"}, "text-label") == ["t"]  # the label is not text
    with pytest.raises(ValueError, match="unknown dataset format"):
        leakage.match_parts({"text": "t"}, "csv")


def test_match_key_keeps_field_boundaries():
    assert leakage.match_key(pc("Hi there.", "Bye"), "prompt-completion") == \
        leakage.match_key(pc("hi  THERE", "bye!"), "prompt-completion")
    key = leakage.match_key
    assert key(pc("a b", "c"), "prompt-completion") != key(pc("a", "b c"), "prompt-completion")


def test_find_pairs_and_repeats_within():
    train = [Record(1, "train", {"text": "Alpha beta."}), Record(2, "train", {"text": "gamma"}),
             Record(3, "train", {"text": "alpha BETA"})]
    validation = [Record(1, "validation", {"text": "delta"}), Record(2, "validation", {"text": " alpha, beta "}),
                  Record(3, "validation", {"text": "Gamma!"}), Record(4, "validation", {"text": "gamma"})]
    assert leakage.find_pairs(train, validation, "text") == [(1, 2), (2, 3), (2, 4)]
    assert leakage.repeats_within(train, "text") == 1
    assert leakage.repeats_within(validation, "text") == 1


# --- the policy --------------------------------------------------------------------------------------------


def test_policies_match_the_api():
    assert leakage.POLICIES == LEAKAGE_POLICIES


def test_drop_removes_the_leaked_validation_rows():
    validation = [Record(1, "validation", {"text": "a"}), Record(2, "validation", {"text": "b"})]
    kept, outcome = leakage.apply_policy("Drop", [(7, 2)], validation)
    assert [r.line for r in kept] == [1]
    assert outcome.as_report() == {"policy": "Drop", "matched": 1, "dropped": 1}
    assert not outcome.refused


@pytest.mark.parametrize("policy", ["Warn", "Fail"])
def test_warn_and_fail_keep_the_rows(policy):
    validation = [Record(1, "validation", {"text": "a"})]
    kept, outcome = leakage.apply_policy(policy, [(3, 1)], validation)
    assert kept == validation
    assert outcome.as_report() == {"policy": policy, "matched": 1, "dropped": 0}
    assert outcome.refused == (policy == "Fail")


def test_no_leakage_is_never_refused():
    kept, outcome = leakage.apply_policy("Fail", [], [])
    assert kept == [] and not outcome.refused and outcome.matched == 0
    with pytest.raises(ValueError, match="is not one of Drop, Fail, Warn"):
        leakage.apply_policy("drop", [], [])


def test_refusal_names_both_lines_of_the_first_pairs():
    outcome = leakage.Outcome("Fail", [(t, t + 100) for t in range(1, 13)])
    message = outcome.refusal("s3://b/t.jsonl", "s3://b/v.jsonl")
    assert "12 validation examples copy training examples" in message
    assert "validation lines of s3://b/v.jsonl, training lines of s3://b/t.jsonl" in message
    assert "validation line 101 = training line 1" in message and "validation line 110 = training line 10" in message
    assert "line 111" not in message and "... and 2 more" in message
    assert "lines of s3://b/t.jsonl)" in leakage.Outcome("Fail", [(1, 2)]).refusal("s3://b/t.jsonl", "s3://b/t.jsonl")


def loaded_with_validation():
    train = jsonl(pc("What is 2+2?", "Four."), pc("Name a colour", "Red"), pc("x", "y"))
    validation = jsonl(pc("what is 2 + 2", "four"), pc("What is 2+2?", "FOUR"), pc("new", "row"))
    return load_dataset(train, "prompt-completion", validation_bytes=validation)


def test_apply_leakage_policy_on_loaded_data():
    loaded = loaded_with_validation()
    assert loaded.leakage == [(1, 2)]  # "2 + 2" keeps its spaces: not the same text as "2+2"
    dataset_input.apply_leakage_policy(loaded, "Drop", "t.jsonl", "v.jsonl")
    assert [r.line for r in loaded.validation] == [1, 3]
    assert loaded.leakage == loaded.reports[0].leakage == []
    assert loaded.leakage_outcome.as_report() == {"policy": "Drop", "matched": 1, "dropped": 1}

    warned = loaded_with_validation()
    dataset_input.apply_leakage_policy(warned, "Warn", "t.jsonl", "v.jsonl")
    assert [r.line for r in warned.validation] == [1, 2, 3] and warned.leakage == [(1, 2)]

    with pytest.raises(BadInput, match="validation line 2 = training line 1"):
        dataset_input.apply_leakage_policy(loaded_with_validation(), "Fail", "t.jsonl", "v.jsonl")


# --- the report --------------------------------------------------------------------------------------------


def test_length_summary_uses_nearest_rank():
    assert data_report.length_summary([]) == {"p50": 0, "p95": 0, "max": 0}
    assert data_report.length_summary([7]) == {"p50": 7, "p95": 7, "max": 7}
    assert data_report.length_summary(list(range(100, 0, -1))) == {"p50": 50, "p95": 95, "max": 100}
    assert data_report.length_summary([1, 2, 3, 4]) == {"p50": 2, "p95": 4, "max": 4}


def test_truncated_share():
    assert data_report.truncated_share([], 8) == 0.0
    assert data_report.truncated_share([8, 9, 3, 20], 8) == 0.5  # longer than max, not equal to it
    assert data_report.truncated_share([1, 2, 30], 8) == round(1 / 3, 6)


def test_label_counts_in_label_order_with_zeros():
    train = [Record(i, "train", {"text": f"t{i}", "label": label}) for i, label in enumerate("aab", 1)]
    validation = [Record(9, "validation", {"text": "v", "label": "b"})]
    assert data_report.label_counts(["b", "a", "c"], train, validation) == [
        {"name": "b", "train": 1, "validation": 1}, {"name": "a", "train": 2, "validation": 0},
        {"name": "c", "train": 0, "validation": 0}]


def _schema_keys(schema: dict) -> set[str]:
    return set(schema["properties"])


def test_report_has_exactly_the_status_fields():
    rows = [{"text": f"Text {i}", "label": "pos" if i % 2 else "neg"} for i in range(20)]
    rows += [{"text": "text 3!", "label": "pos"}, {"text": "TEXT 3", "label": "neg"}]
    loaded = load_dataset(jsonl(*rows), "text-label", validation_fraction=0.25, seed=3, stratify_by="label")
    dataset_input.apply_leakage_policy(loaded, "Warn", "d.jsonl", "d.jsonl")
    lengths = {"train": [3] * len(loaded.train), "validation": [9] * len(loaded.validation)}
    report = data_report.build(loaded, lengths, 8, "Warn")
    assert set(report) == _schema_keys(DATA_STATUS) - {"job", "state", "message"}
    assert report["examples"] == {"train": len(loaded.train), "validation": len(loaded.validation)}
    assert report["examples"]["train"] + report["examples"]["validation"] == 22
    assert report["truncated"] == {"train": 0.0, "validation": 1.0}
    assert report["tokens"]["validation"] == {"p50": 9, "p95": 9, "max": 9}
    assert [label["name"] for label in report["labels"]] == ["neg", "pos"]
    assert sum(label["train"] + label["validation"] for label in report["labels"]) == 22
    # "Text 3", "text 3!" and "TEXT 3" are one text: 2 repeats, wherever the split put them
    duplicates = report["duplicates"]
    assert duplicates["withinTrain"] + duplicates["withinValidation"] + duplicates["acrossSplits"] == 2
    assert report["leakage"] == {"policy": "Warn", "matched": duplicates["acrossSplits"], "dropped": 0}
    assert report["digest"].startswith("sha256:") and report["invalidLines"] == 0
    for key in ("duplicates", "leakage", "tokens", "truncated", "examples"):
        assert set(report[key]) == _schema_keys(DATA_STATUS["properties"][key]), key


# --- the tokenizer's files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                                  "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "added_tokens.json",
                                  "chat_template.jinja", "chat_template.json", "config.json",
                                  "additional_chat_templates/tool_use.jinja", "tokenization_custom.py"])
def test_tokenizer_files_are_fetched(name):
    assert tokenizer_files.is_tokenizer_file(name)


@pytest.mark.parametrize("name", ["model.safetensors", "model-00001-of-00004.safetensors", "pytorch_model.bin",
                                  "model.safetensors.index.json", "generation_config.json", "README.md",
                                  "modeling_custom.py", "consolidated.pth", "weights.model.bin", "onnx/model.onnx"])
def test_weights_and_the_rest_are_not(name):
    assert not tokenizer_files.is_tokenizer_file(name)


def test_s3_style_prefix_downloads_only_the_tokenizer_files(tmp_path):
    model = tmp_path / "bucket" / "models" / "tiny"
    for name in ("config.json", "tokenizer.json", "model.safetensors", "sub/tokenizer.model", "README.md"):
        (model / name).parent.mkdir(parents=True, exist_ok=True)
        (model / name).write_text(name)
    got = tokenizer_files._from_s3(f"file://{model}", ObjectStore(), tmp_path / "cache")
    files = sorted(str(p.relative_to(got)) for p in got.rglob("*") if p.is_file() and p.name != ".complete")
    assert files == ["config.json", "sub/tokenizer.model", "tokenizer.json"]
    assert tokenizer_files._from_s3(f"file://{model}", ObjectStore(), tmp_path / "cache") == got  # cached
    with pytest.raises(BadInput, match="no tokenizer files under that prefix"):
        tokenizer_files._from_s3(f"file://{tmp_path / 'empty'}", ObjectStore(), tmp_path / "cache")


def test_file_uri_is_read_in_place_and_must_hold_a_tokenizer(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert tokenizer_files.resolve_tokenizer_dir({"uri": f"file://{tmp_path}"}, None, tmp_path / "c") == Path(tmp_path)
    with pytest.raises(BadInput, match=r"no config\.json or tokenizer_config\.json"):
        tokenizer_files.resolve_tokenizer_dir({"uri": f"file://{tmp_path / 'nothing'}"}, None, tmp_path / "c")
    with pytest.raises(BadInput, match="unsupported scheme"):
        tokenizer_files.resolve_tokenizer_dir({"uri": "gs://b/m"}, None, tmp_path / "c")

"""The dataset policy's decisions on final splits, and data files that are directories (never a traceback)."""

from __future__ import annotations

import json

import pytest

from kubetune.clients.storage import ObjectStore
from kubetune_trainer import dataset_policy as policy
from kubetune_trainer import leakage
from kubetune_trainer.data import TRAIN, VALIDATION, Record, load_dataset
from kubetune_trainer.dataset_input import missing_data_file, read_data_file
from kubetune_trainer.errors import BadInput
from kubetune_trainer.inputs import fetch_data_files


def labelled(split: str, *labels: str, first_line: int = 1) -> list[Record]:
    return [Record(line=first_line + i, source=split, fields={"text": f"{split} example {i}", "label": label})
            for i, label in enumerate(labels)]


def codes(found: list[policy.Finding]) -> dict[str, str]:
    return {f.code: f.severity for f in found}


def test_sizes_below_the_minimums_are_errors_that_state_the_minimum():
    found = policy.size_findings(1, 0, validation_expected=True)
    assert codes(found) == {"TrainingTooSmall": "Error", "ValidationTooSmall": "Error"}
    assert f"at least {policy.MIN_TRAIN_EXAMPLES} are needed" in found[0].message
    assert f"has 0 examples; at least {policy.MIN_VALIDATION_EXAMPLES} are needed" in found[1].message
    assert policy.size_findings(policy.MIN_TRAIN_EXAMPLES, policy.MIN_VALIDATION_EXAMPLES,
                                validation_expected=True) == []
    # validationSplit 0 and no validationUri: nobody asked for a measurement
    assert policy.size_findings(5, 0, validation_expected=False) == []
    dropped = policy.size_findings(5, 1, validation_expected=True, dropped=3)
    assert "has 1 example after 3 copies of training examples were dropped" in dropped[0].message


def test_a_single_training_label_is_refused():
    found = policy.label_findings(labelled(TRAIN, "billing", "billing"), labelled(VALIDATION, "billing"), (), "v")
    assert codes(found) == {"TooFewLabels": "Error"}
    assert "1 distinct label ('billing')" in found[0].message and "accuracy is 1.0" in found[0].message


def test_labels_only_in_validation_are_named_with_the_line_they_first_appear_on():
    validation = labelled(VALIDATION, "billing", "refund", "bug", "refund", "account", first_line=1)
    found = policy.label_findings(labelled(TRAIN, "billing", "bug"), validation, (), "file:///v.jsonl")
    assert codes(found) == {"LabelsOnlyInValidation": "Error"}
    assert "'account' (line 5), 'refund' (line 2) in file:///v.jsonl" in found[0].message


def test_training_labels_without_validation_and_unused_declared_labels_are_warnings():
    found = policy.label_findings(labelled(TRAIN, "billing", "bug", "account"), labelled(VALIDATION, "billing", "bug"),
                                  ("billing", "bug", "account", "refund"), "v")
    assert codes(found) == {"LabelsNotValidated": "Warning", "DeclaredLabelsUnused": "Warning"}
    assert "'account'" in found[0].message and "'refund'" in found[1].message


def test_leakage_warns_below_the_threshold_and_refuses_above_it_under_warn():
    assert policy.leakage_findings(leakage.Outcome(leakage.WARN, []), 10) == []
    below = policy.leakage_findings(leakage.Outcome(leakage.WARN, [(1, 1)] * 5), 10)
    assert codes(below) == {"Leakage": "Warning"} and "5 of 10" in below[0].message
    above = policy.leakage_findings(leakage.Outcome(leakage.WARN, [(1, 1)] * 6), 10)
    assert codes(above) == {"Leakage": "Error"} and "set dataset.leakage to Drop" in above[0].message
    # Drop removed the copies: what is left is clean, so a warning whatever the share
    dropped = policy.leakage_findings(leakage.Outcome(leakage.DROP, [(1, 1)] * 9, dropped=9), 1)
    assert codes(dropped) == {"Leakage": "Warning"} and "9 of 10" in dropped[0].message


def test_findings_on_a_loaded_dataset_put_errors_first_and_make_the_refusal():
    rows = [{"text": f"example {i}", "label": "billing"} for i in range(8)]
    loaded = load_dataset(b"".join(json.dumps(r).encode() + b"\n" for r in rows), "text-label",
                          validation_fraction=0.25)
    found = policy.findings(loaded, validation_expected=True)
    assert [f.code for f in found] == ["TooFewLabels"]
    refusal = policy.refusal(found)
    assert refusal.startswith("the dataset cannot train or be measured (nothing was trained)")
    assert "TooFewLabels: the training split has 1 distinct label" in refusal
    assert policy.refusal([policy.Finding(policy.WARNING, "Leakage", "x")]) is None


def test_a_one_line_causal_dataset_is_refused():
    loaded = load_dataset(b'{"prompt": "a", "completion": "b"}\n', "prompt-completion")
    assert (len(loaded.train), len(loaded.validation)) == (1, 0)
    assert codes(policy.findings(loaded, validation_expected=True)) == {"TrainingTooSmall": "Error",
                                                                       "ValidationTooSmall": "Error"}


# --- a directory where a file is expected ----------------------------------------------------------------


def test_a_local_directory_is_bad_input_naming_the_field(tmp_path):
    store = ObjectStore()
    with pytest.raises(BadInput, match=r"^dataset.uri file://.* is a directory; expected a JSON Lines file$"):
        read_data_file(store, "dataset.uri", tmp_path.as_uri())
    with pytest.raises(BadInput, match="is a directory"):
        read_data_file(store, "dataset.validationUri", tmp_path.as_uri() + "/")
    with pytest.raises(BadInput, match=r"^dataset.uri file://.*/absent.jsonl does not exist$"):
        read_data_file(store, "dataset.uri", (tmp_path / "absent.jsonl").as_uri())
    (tmp_path / "train.jsonl").write_text('{"text": "x"}\n')
    assert read_data_file(store, "dataset.uri", (tmp_path / "train.jsonl").as_uri()) == b'{"text": "x"}\n'


def test_the_gpu_stages_and_evaluation_sets_name_the_directory_too(tmp_path):
    sources = [("evaluation set 'drift'", tmp_path.as_uri())]
    with pytest.raises(BadInput, match=r"^evaluation set 'drift' file://.* is a directory"):
        fetch_data_files(ObjectStore(), sources, tmp_path / "cache")


class PrefixStore:
    """An S3 bucket holding data/train.jsonl only: `data` is a prefix, not an object."""

    def list(self, prefix_uri: str) -> list[str]:
        return ["s3://bucket/data/train.jsonl"] if "s3://bucket/data/train.jsonl".startswith(prefix_uri) else []


@pytest.mark.parametrize(("uri", "what"), [("s3://bucket/data", "is a directory"),
                                           ("s3://bucket/data/", "is a directory"),
                                           ("s3://bucket/", "is a directory"),
                                           ("s3://bucket/other.jsonl", "does not exist")])
def test_an_s3_prefix_is_a_directory(uri, what):
    assert str(missing_data_file(PrefixStore(), "dataset.uri", uri)) == f"dataset.uri {uri} {what}" + \
        ("; expected a JSON Lines file" if what == "is a directory" else "")


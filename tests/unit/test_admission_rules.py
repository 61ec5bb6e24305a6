"""The admission path's own rules: request size and JSON values, strict ObjectMeta, list-type
duplicates, the value rules of fields that reach a child, and CEL rules that never show their source."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from kubetune.api import k8s_values
from kubetune.api.object_rules import json_value_errors, list_type_errors
from kubetune.api.schema import apply_defaults
from kubetune.api.validation import cel_errors, root_schema, validate
from kubetune_testing.factories import adapterdeployment, finetunejob, set_path
from kubetune_testing.kubectl import admission

EXAMPLES = [doc for path in sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc and doc.get("apiVersion", "").startswith("kubetune")]


def _paths(value, prefix=()):
    """Every path (a tuple of keys and indexes) present in a document, deepest first."""
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in children:
        yield from _paths(item, (*prefix, key))
        yield (*prefix, key)


def _without(document: dict, path: tuple) -> dict:
    copied = copy.deepcopy(document)
    node = copied
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return copied


def _replaced(document: dict, path: tuple, value) -> dict:
    copied = copy.deepcopy(document)
    node = copied
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return copied


def _wrong_type(value):
    return "a-string" if not isinstance(value, str) else {"an": "object"}


@pytest.mark.parametrize("example", EXAMPLES, ids=[f"{d['kind']}-{d['metadata']['name']}" for d in EXAMPLES])
def test_no_rule_shows_its_source_when_a_field_is_missing_or_mistyped(example):
    """Remove each field of a realistic object, or give it the wrong type: CEL (run here even where the
    schema would stop first) reports the field and the problem, never the rule or the engine's error."""
    kind = example["kind"]
    for path in _paths(example):
        if path[0] in ("apiVersion", "kind"):
            continue
        for document in (_without(example, path), _replaced(example, path, _wrong_type(_value(example, path)))):
            defaulted = apply_defaults(root_schema(kind), document)
            for error in cel_errors(kind, defaulted):
                assert "self." not in error.message and "could not be evaluated" not in error.message, (path, error)
        for error in validate(_without(example, path), local=True).errors:
            assert "self." not in error.message and "could not be" not in error.message, (path, error)


def _value(document, path):
    for key in path:
        document = document[key]
    return document


def test_every_example_is_admitted():
    for example in EXAMPLES:
        local = "local" in example["metadata"]["name"] or "local" in str(example.get("spec", {}).get("output"))
        assert validate(example, local=local).ok, (example["metadata"]["name"], validate(example, local=local).errors)
        assert admission(example["kind"], example)[0] == []


@pytest.mark.parametrize(("value", "expected"), [
    ({"spec": {"rate": float("nan")}}, [("spec.rate", "must be a finite number, not nan (JSON has no NaN or "
                                                     "Infinity)")]),
    ({"spec": {"steps": [1, float("-inf")]}}, [("spec.steps[1]", "must be a finite number, not -inf (JSON has no "
                                                                 "NaN or Infinity)")]),
    ({"spec": {1: "x"}}, [("spec", "keys must be strings, got int 1")]),
    ({"spec": {"rate": 0.5, "name": "nan"}}, []),
])
def test_values_json_cannot_carry_are_found_with_their_path(value, expected):
    assert json_value_errors(value) == expected


def test_nan_is_refused_by_validate_and_by_the_api_server_view():
    doc = set_path(finetunejob(), "spec.training.learningRate", float("nan"))
    assert [str(e) for e in validate(doc).errors] == [
        "spec.training.learningRate: must be a finite number, not nan (JSON has no NaN or Infinity)"]
    assert admission("FineTuneJob", doc)[0] == [
        "spec.training.learningRate: must be a finite number, not nan (JSON has no NaN or Infinity)"]


def test_an_object_over_the_request_limit_is_refused_before_its_fields():
    doc = set_path(finetunejob(), "metadata.annotations", {"notes": "x" * k8s_values.MAX_REQUEST_BYTES})
    errors = validate(doc).errors
    assert len(errors) == 1 and errors[0].message.startswith("Request entity too large: limit is 3145728")
    assert str(errors[0]).startswith("Request entity too large")


def test_metadata_is_strict_but_takes_what_go_decodes():
    assert [str(e) for e in validate(set_path(finetunejob(), "metadata.lables", {"a": "b"})).errors] == [
        "metadata.lables: unknown field"]
    for field in ("labels", "annotations", "finalizers", "ownerReferences"):
        assert validate(set_path(finetunejob(), f"metadata.{field}", None)).ok, field
    doc = finetunejob()
    doc["metadata"] = {"generateName": "support-", "namespace": "team-a"}
    assert validate(doc).ok  # the API server names it; no rule may fail for want of a name


def test_annotations_over_their_total_size_are_refused():
    doc = set_path(adapterdeployment(), "metadata.annotations",
                   {"notes": "x" * k8s_values.MAX_ANNOTATIONS_BYTES})
    assert "metadata.annotations: Too long: must have at most 262144 bytes" in [str(e) for e in validate(doc).errors]


def test_list_types_report_each_repeat_once_in_the_api_servers_words():
    schema = {"type": "object", "properties": {
        "tags": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}},
        "items": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                  "items": {"type": "object", "properties": {"name": {"type": "string"}}}},
    }}
    value = {"tags": ["a", "b", "a", "a", "b"], "items": [{"name": "x"}, {"name": "x", "v": 1}, {"name": "y"}]}
    assert list_type_errors(schema, value, "spec") == [
        ("spec.tags[2]", 'Duplicate value: "a"'),
        ("spec.tags[4]", 'Duplicate value: "b"'),
        ("spec.items[1]", 'Duplicate value: map[string]interface {}{"name":"x"}'),
    ]


@pytest.mark.parametrize(("path", "value", "local", "expected"), [
    ("spec.dataset.uri", "file:///data/train.jsonl", False, "spec.dataset.uri: file:// sources work only with"),
    ("spec.evaluation", {"sets": [{"name": "holdout", "uri": "file:///data/h.jsonl"}]}, False,
     "spec.evaluation.sets[0].uri: file:// sources work only with"),
    ("spec.scheduling", {"nodeSelector": {"gpu": "A100 80GB"}}, False, "spec.scheduling.nodeSelector: value"),
    ("spec.resources", {"requests": {"cpu": -1}}, False,
     "spec.resources.requests.cpu: must be greater than or equal to 0"),
])
def test_values_that_reach_a_child_are_checked_before_it_exists(path, value, local, expected):
    errors = [str(e) for e in validate(set_path(finetunejob(), path, value), local=local).errors]
    assert any(e.startswith(expected) for e in errors), errors


def test_file_sources_are_fine_for_kubetune_local():
    doc = set_path(finetunejob(), "spec.dataset", {"uri": "file:///data/train.jsonl", "format": "chat",
                                                   "validationUri": "file:///data/validation.jsonl"})
    assert validate(set_path(doc, "spec.output.uri", "file:///tmp/out"), local=True).ok


@pytest.mark.parametrize(("uri", "ok"), [
    ("s3://team-data/train.jsonl", True), ("s3:///train.jsonl", False), ("s3://team-data", False),
    ("s3://team-data/", False), ("s3://ab/train.jsonl", False), ("s3://Team/train.jsonl", False),
    ("file:///data/train.jsonl", True), ("file://data/train.jsonl", False),
])
def test_dataset_uris_need_a_bucket_and_a_key(uri, ok):
    assert validate(set_path(finetunejob(), "spec.dataset.uri", uri), local=True).ok is ok


@pytest.mark.parametrize("document", [[], "FineTuneJob", None, {"apiVersion": "kubetune.io/v1alpha1", "kind": []}])
def test_what_is_not_an_object_is_refused_with_a_message(document):
    errors = validate(document).errors
    assert errors and all(e.message and "None" not in e.message for e in errors)


@pytest.mark.parametrize("name", [None, ""])
def test_an_object_without_a_name_is_told_so_once(name):
    doc = set_path(finetunejob(), "metadata.name", name)
    assert [str(e) for e in validate(doc).errors][:1] == [
        "metadata.name: Required value: name or generateName is required"]
    assert all("could not be checked" not in e.message for e in validate(doc).errors)


@pytest.mark.parametrize(("value", "expected"), [
    ([None], "spec.task: [null] is not of type 'string'"),
    ({"a": None}, 'spec.task: {"a": null} is not of type \'string\''),
    (None, "spec.task: null is not of type 'string'"),
])
def test_values_in_messages_are_shown_as_written_not_as_python_shows_them(value, expected):
    doc = finetunejob()
    doc["spec"]["task"] = value
    assert expected in [str(e) for e in validate(doc).errors]


def test_names_the_api_server_takes_are_taken():
    """Secret and ServiceAccount names are DNS-1123 subdomains: dots are fine (they were once refused)."""
    doc = set_path(finetunejob(), "spec.output.credentials", {"secretName": "team-a.s3-adapters",
                                                             "accessKeyIdKey": "access.key-id_1"})
    doc = set_path(doc, "spec.serviceAccountName", "trainer.team-a")
    doc = set_path(doc, "spec.scheduling", {"priorityClassName": "batch.low", "queueName": "Team_A.gpu",
                                            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
                                            "tolerations": [{"operator": "Exists"}]})
    assert validate(doc).ok, validate(doc).errors

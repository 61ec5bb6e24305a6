"""The bad-input corpus (tests/corpus): realistic mistakes, each refused with where and why.

`specs/*.yaml` go through `kubetune validate` and the API server's view (`# expect:` lines, `# semantic:
true` for what only validate can refuse); `datasets/*.jsonl` go through the trainer's own data path
against `datasets/expected.yaml`. The file format is in tests/corpus/README.md.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from kubetune.api import jobconfig
from kubetune.api import v1alpha1 as api
from kubetune.api.schema import iter_fields
from kubetune.api.validation import root_schema, validate
from kubetune_operator import cli
from kubetune_testing.kubectl import admission
from kubetune_trainer import data, dataset_input
from kubetune_trainer.errors import BadInput

CORPUS = Path(__file__).resolve().parents[1] / "corpus"
SPECS = sorted((CORPUS / "specs").glob("*.yaml"))
DATASETS = yaml.safe_load((CORPUS / "datasets" / "expected.yaml").read_text())

# What must never reach a user: Python internals instead of a message.
UNREADABLE = re.compile(r"Traceback|<[a-zA-Z_.]+ object|object at 0x|<class '|<function |\bNone\b|\\n")


def _expectations(path: Path) -> tuple[list[tuple[str, str]], bool]:
    """The file's `# expect: PATH: MESSAGE` lines and whether it is marked `# semantic: true`."""
    expects, semantic = [], False
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        body = line[1:].strip()
        if body.startswith("expect:"):
            field_path, _, message = body.removeprefix("expect:").strip().partition(": ")
            expects.append((field_path, message))
        elif body == "semantic: true":
            semantic = True
    return expects, semantic


def _kind(path: Path) -> str:
    return yaml.safe_load(path.read_text())["kind"]


def test_corpus_size():
    kinds = [_kind(path) for path in SPECS]
    assert len(SPECS) >= 50
    assert kinds.count("FineTuneJob") >= 35 and kinds.count("AdapterDeployment") >= 15
    assert len(DATASETS) >= 20
    named = [*DATASETS, *(entry["validation"] for entry in DATASETS.values() if "validation" in entry)]
    assert sorted(named) == sorted(p.name for p in (CORPUS / "datasets").glob("*.jsonl")), \
        "every dataset file has a manifest entry (or is an entry's validation file) and every entry a file"


@pytest.mark.parametrize("kind", sorted(api.KINDS))
def test_every_cel_rule_is_broken_by_a_corpus_file(kind):
    reported = {error.message for path in SPECS for error in validate(yaml.safe_load(path.read_text())).errors}
    rules = [entry for _, schema in iter_fields(root_schema(kind))
             for entry in schema.get("x-kubernetes-validations", []) if "oldSelf" not in entry["rule"]]
    assert rules
    unbroken = [entry["rule"] for entry in rules if entry["message"] not in reported]
    assert unbroken == [], f"CEL rules no file in tests/corpus/specs breaks: {unbroken}"


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_spec_is_refused_with_field_path_and_reason(path, capsys):
    expects, _ = _expectations(path)
    assert expects, f"{path.name}: no '# expect: PATH: MESSAGE' line in its leading comment"
    assert all(message for _, message in expects), f"{path.name}: an expectation without a message"

    assert cli.main(["validate", "-f", str(path)]) == 2
    out, err = capsys.readouterr()
    assert "valid" not in out  # nothing in the file was accepted
    document = yaml.safe_load(path.read_text())
    # FILE:LINE: document N: Kind/name: error: FIELD: MESSAGE (LINE: where the object starts, after comments)
    first = next(n for n, line in enumerate(path.read_text().splitlines(), start=1) if not line.startswith("#"))
    prefix = f"{path}:{first}: document 1: {document['kind']}/{document['metadata']['name']}: error: "
    errors = []
    for line in err.splitlines():
        if ": warning: " in line:
            continue
        assert line.startswith(prefix), f"not an error line of {prefix!r}: {line!r}"
        field_path, _, message = line.removeprefix(prefix).partition(": ")
        assert field_path and message.strip(), f"an error without a field path or a reason: {line!r}"
        assert not UNREADABLE.search(message), f"unreadable error message: {line!r}"
        errors.append((field_path, message))
    for field_path, part in expects:
        assert any(p == field_path and part in m for p, m in errors), \
            f"{path.name}: expected '{field_path}: ...{part}...' among:\n" + "\n".join(f"{p}: {m}" for p, m in errors)


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_api_server_view(path):
    """The structural schema + CEL (what a cluster's API server runs on `kubectl apply`) refuses the same
    file on the same field paths, unless only kubetune's semantic checks can see the mistake."""
    expects, semantic = _expectations(path)
    document = yaml.safe_load(path.read_text())
    refused, _ = admission(document["kind"], document)
    if semantic:
        assert refused == [], f"{path.name} is marked semantic, but the API server refuses it too: {refused}"
        assert not validate(document).ok
        return
    assert refused, f"{path.name}: the API server would accept it; mark it '# semantic: true' if that is right"
    for field_path, part in expects:
        assert any(e.startswith(f"{field_path}: ") and part in e for e in refused), (path.name, field_path, refused)


# --- datasets ---------------------------------------------------------------------------------------------------


class WordTokenizer:
    """Stands in for the model's tokenizer in the trainer's length check: a token per word, plus BOS."""

    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [0] * (len(text.split()) + int(add_special_tokens))}


class NoProgress:
    def update(self, **_) -> None:
        pass


def _job_config(path: Path, entry: dict, out: Path) -> jobconfig.JobConfig:
    """The job config the operator would hand the trainer for this dataset (validated and defaulted)."""
    classification = entry["format"] == "text-label"
    spec = {
        "baseModel": {"uri": "file:///models/tiny"},
        "task": "SequenceClassification" if classification else "CausalLM",
        "dataset": {"uri": f"file://{path}", "format": entry["format"],
                    "maxInvalidFraction": entry.get("maxInvalidFraction", 0.0)},
        "training": {"maxSteps": 10, "maxSeqLength": entry.get("maxSeqLength", 2048), "perDeviceBatchSize": 2,
                     "precision": "FP32"},
        "distributed": {"nodes": 1, "gpusPerNode": 0, "deepspeed": {"enabled": False}},
        "output": {"uri": f"file://{out}"},
    }
    if entry.get("labels"):
        spec["labels"] = entry["labels"]
    if "validation" in entry:
        spec["dataset"]["validationUri"] = (path.parent / entry["validation"]).as_uri()
    spec["dataset"].update({key: entry[key] for key in ("validationSplit", "leakage") if key in entry})
    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": "corpus", "namespace": "test", "uid": "uid-corpus", "generation": 1}, "spec": spec}
    result = validate(doc, local=True)
    assert result.ok, result.errors
    return jobconfig.job_config("test", "corpus", "uid-corpus", result.defaulted["spec"], None)


@pytest.mark.parametrize("name", list(DATASETS), ids=[n.removesuffix(".jsonl") for n in DATASETS])
def test_dataset_is_reported_with_line_numbers(name, tmp_path):
    entry = DATASETS[name]
    path = CORPUS / "datasets" / name
    assert entry["outcome"] in ("BadInput", "accepted")
    assert set(entry["errors"]) <= set(data.ERROR_CLASSES), entry["errors"]
    config = _job_config(path, entry, tmp_path)

    loaded = dataset_input.load_data(config, NoProgress())  # the trainer's own data path, shared by every stage
    if entry["outcome"] == "BadInput":
        with pytest.raises(BadInput) as refused:
            dataset_input.check_lengths(config, loaded, WordTokenizer())
        summary, findings = str(refused.value), refused.value.findings
        assert "nothing was trained" in summary
    else:
        dataset_input.check_lengths(config, loaded, WordTokenizer())
        summary, findings = loaded.summary(), loaded.findings
    # The dataset policy's findings on the final splits: exactly these codes, each of its severity
    assert {f["code"]: f["severity"] for f in findings} == entry.get("findings", {}), findings
    if "message" in entry:
        assert any(entry["message"] in f["message"] for f in findings), findings

    report = loaded.reports[0]
    found: dict[str, list[int]] = {}
    for error in report.errors:
        found.setdefault(error.error_class, []).append(error.line)
        assert error.message and not UNREADABLE.search(error.message), error
        assert str(error).startswith(f"{path.as_uri()} line {error.line}: {error.error_class}: ")
    assert {k: sorted(v) for k, v in found.items()} == entry["errors"], summary
    for error_class, lines in entry["errors"].items():
        shown = f"line {lines[0]}" if len(lines) == 1 else "lines " + ", ".join(map(str, lines))
        assert f"  {error_class}: {len(lines)} ({shown})" in summary, summary
    if "duplicates" in entry:
        assert report.duplicates_within == entry["duplicates"]
        assert f"duplicates: {entry['duplicates']} examples" in summary

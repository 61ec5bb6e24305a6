"""The dataset as every stage sees it: read, validated, split, the leakage policy applied, lengths checked.

No torch: the data stage (a CPU pod with the tokenizer's files only) and the GPU stages share these
functions, so they see the same splits and refuse the same data with the same messages.
"""

from __future__ import annotations

import logging
from pathlib import Path

from kubetune.api import storage_layout
from kubetune.api.jobconfig import JobConfig

from . import data, dataset_policy, leakage, storage
from .errors import BadInput

log = logging.getLogger(__name__)


def stratify_field(spec: dict) -> str | None:
    return spec["dataset"].get("stratifyBy") or ("label" if spec["dataset"]["format"] == "text-label" else None)


def load_data(config: JobConfig, progress: storage.ProgressWriter) -> data.LoadedData:
    """Read (one process: the data stage), validate and split the dataset, then apply
    spec.dataset.leakage (Fail: BadInput). The GPU stages read once per pod: inputs.load_data."""
    spec = config.spec
    dataset = spec["dataset"]
    store = storage.data_store(spec)
    progress.update(stage="validating", force=True)
    raw = read_data_file(store, "dataset.uri", dataset["uri"])
    validation_raw = None
    if dataset.get("validationUri"):
        validation_raw = read_data_file(store, "dataset.validationUri", dataset["validationUri"])
    return parse_data(config, raw, validation_raw)


def read_data_file(store, field: str, uri: str) -> bytes:
    """The bytes of the file at `field`'s uri; BadInput naming the field when it is missing or a directory."""
    scheme, _, key = storage_layout.split_uri(uri)
    names_a_file = bool(key) and not key.endswith("/") and not (scheme == "file" and Path(key).is_dir())
    raw = store.read(uri) if names_a_file else None
    if raw is None:
        raise missing_data_file(store, field, uri)
    return raw


def missing_data_file(store, field: str, uri: str) -> BadInput:
    """Why no file is at `uri`: a directory (a local one, a key ending in "/", objects under "uri/") or nothing."""
    scheme, _, key = storage_layout.split_uri(uri)
    directory = Path(key).is_dir() if scheme == "file" else not key or key.endswith("/") or store.list(uri + "/")
    if directory:
        return BadInput(f"{field} {uri} is a directory; expected a JSON Lines file")
    return BadInput(f"{field} {uri} does not exist")


def parse_data(config: JobConfig, raw: bytes, validation_raw: bytes | None) -> data.LoadedData:
    """Validate and split the dataset's bytes, then apply spec.dataset.leakage: what every stage sees."""
    spec = config.spec
    dataset = spec["dataset"]
    validation_name = dataset.get("validationUri") or dataset["uri"]  # a split of one file keeps its line numbers
    loaded = data.load_dataset(raw, dataset["format"], labels=spec.get("labels"), validation_bytes=validation_raw,
                               validation_fraction=dataset["validationSplit"], seed=dataset["seed"],
                               stratify_by=stratify_field(spec), source_name=dataset["uri"],
                               validation_source_name=dataset.get("validationUri") or "validation.jsonl")
    apply_leakage_policy(loaded, dataset.get("leakage", leakage.DROP), dataset["uri"], validation_name)
    return loaded


def apply_leakage_policy(loaded: data.LoadedData, policy: str, train_name: str, validation_name: str) -> None:
    """Drop: leaked validation rows removed; Warn: kept; Fail: BadInput naming both lines of each pair."""
    loaded.validation, outcome = leakage.apply_policy(policy, loaded.leakage, loaded.validation)
    loaded.leakage_outcome = outcome
    if outcome.refused:
        message = outcome.refusal(train_name, validation_name)
        raise BadInput(message, [dataset_policy.Finding(dataset_policy.ERROR, "Leakage", message).as_dict()])
    if outcome.dropped:
        loaded.leakage = loaded.reports[0].leakage = []
    if outcome.matched:
        log.warning("validation examples repeat training examples (leakage)",
                    extra={**outcome.as_report(), "first": outcome.pairs[:leakage.SHOWN_PAIRS]})


def length_check_functions(tokenizer, fmt: str) -> tuple:
    """(count_tokens, render_chat or None): what the data length check needs from the tokenizer."""

    def count(piece: str) -> int:
        return len(tokenizer(piece, add_special_tokens=True)["input_ids"])

    def render_chat(messages: list[dict]) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False)

    chat_template = fmt == "chat" and getattr(tokenizer, "chat_template", None)
    return count, render_chat if chat_template else None


def check_lengths(config: JobConfig, loaded: data.LoadedData, tokenizer) -> None:
    """Drop examples with nothing left to train on after truncation; refuse the data beyond
    dataset.maxInvalidFraction (BadInput with the report's line numbers); then apply the dataset policy
    to the final splits (`loaded.findings`; BadInput on an Error)."""
    spec = config.spec
    count, render_chat = length_check_functions(tokenizer, spec["dataset"]["format"])
    loaded.apply_length_check(count, spec["training"]["maxSeqLength"], render_chat=render_chat)
    if not loaded.acceptable(spec["dataset"]["maxInvalidFraction"]):
        raise BadInput("the dataset has invalid lines (nothing was trained):\n" + loaded.summary())
    apply_dataset_policy(spec, loaded)


def apply_dataset_policy(spec: dict, loaded: data.LoadedData) -> None:
    """Record the policy's findings on `loaded`, log the warnings, refuse on an error (dataset_policy)."""
    dataset = spec["dataset"]
    found = dataset_policy.findings(
        loaded, validation_expected=bool(dataset.get("validationUri")) or dataset["validationSplit"] > 0,
        declared_labels=spec.get("labels") or (), validation_name=dataset.get("validationUri") or dataset["uri"])
    loaded.findings = [finding.as_dict() for finding in found]
    refusal = dataset_policy.refusal(found)
    if refusal:
        raise BadInput(refusal, loaded.findings)
    for finding in found:
        log.warning("dataset finding: %s", finding.message, extra={"severity": finding.severity, "code": finding.code})

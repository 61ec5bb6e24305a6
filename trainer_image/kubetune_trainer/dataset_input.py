"""The dataset as every stage sees it: read, validated, split, the leakage policy applied, lengths checked.

No torch: the data stage (a CPU pod with the tokenizer's files only) and the GPU stages share these
functions, so they see the same splits and refuse the same data with the same messages.
"""

from __future__ import annotations

import logging

from kubetune.api.jobconfig import JobConfig

from . import data, leakage, storage
from .errors import BadInput

log = logging.getLogger(__name__)


def stratify_field(spec: dict) -> str | None:
    return spec["dataset"].get("stratifyBy") or ("label" if spec["dataset"]["format"] == "text-label" else None)


def load_data(config: JobConfig, progress: storage.ProgressWriter) -> data.LoadedData:
    """Read, validate and split the dataset, then apply spec.dataset.leakage (Fail: BadInput)."""
    spec = config.spec
    dataset = spec["dataset"]
    store = storage.data_store(spec)
    progress.update(stage="validating", force=True)
    raw = store.read(dataset["uri"])
    if raw is None:
        raise BadInput(f"dataset.uri {dataset['uri']} does not exist")
    validation_raw = None
    if dataset.get("validationUri"):
        validation_raw = store.read(dataset["validationUri"])
        if validation_raw is None:
            raise BadInput(f"dataset.validationUri {dataset['validationUri']} does not exist")
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
        raise BadInput(outcome.refusal(train_name, validation_name))
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
    dataset.maxInvalidFraction (BadInput with the report's line numbers)."""
    spec = config.spec
    count, render_chat = length_check_functions(tokenizer, spec["dataset"]["format"])
    loaded.apply_length_check(count, spec["training"]["maxSeqLength"], render_chat=render_chat)
    if not loaded.acceptable(spec["dataset"]["maxInvalidFraction"]):
        raise BadInput("the dataset has invalid lines (nothing was trained):\n" + loaded.summary())

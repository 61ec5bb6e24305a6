"""A run's inputs, checked before any model loads: the dataset, the evaluation sets, the reference."""

from __future__ import annotations

import logging
from pathlib import Path

from kubetune.api import jobconfig
from kubetune.api.jobconfig import JobConfig

from . import data, distributed, evalsets, storage, text
from .modeling import BadInput

log = logging.getLogger(__name__)


def load_data(config: JobConfig, progress: storage.ProgressWriter) -> data.LoadedData:
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
    stratify = dataset.get("stratifyBy") or ("label" if dataset["format"] == "text-label" else None)
    loaded = data.load_dataset(raw, dataset["format"], labels=spec.get("labels"), validation_bytes=validation_raw,
                               validation_fraction=dataset["validationSplit"], seed=dataset["seed"],
                               stratify_by=stratify, source_name=dataset["uri"],
                               validation_source_name=dataset.get("validationUri") or "validation.jsonl")
    return loaded


def length_check_functions(tokenizer, fmt: str) -> tuple:
    """(count_tokens, render_chat or None): what the data length check needs from the tokenizer."""

    def count(piece: str) -> int:
        return len(tokenizer(piece, add_special_tokens=True)["input_ids"])

    def render_chat(messages: list[dict]) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False)

    chat_template = fmt == "chat" and getattr(tokenizer, "chat_template", None)
    return count, render_chat if chat_template else None


def prepare_data(config: JobConfig, loaded: data.LoadedData, tokenizer) -> tuple:
    spec = config.spec
    fmt, max_len = spec["dataset"]["format"], spec["training"]["maxSeqLength"]
    holdout = config.stage.holdout_fraction if config.stage.kind == jobconfig.STAGE_TRIAL else None
    count, render_chat = length_check_functions(tokenizer, fmt)
    loaded.apply_length_check(count, max_len, render_chat=render_chat)
    if not loaded.acceptable(spec["dataset"]["maxInvalidFraction"]):
        raise BadInput("the dataset has invalid lines (nothing was trained):\n" + loaded.summary())
    if holdout:
        # A rank-sweep trial trains on the training split minus a holdout and is scored on that holdout:
        # the validation split stays unseen until the full run's final evaluation (no selection bias).
        stratify = spec["dataset"].get("stratifyBy") or ("label" if fmt == "text-label" else None)
        loaded.train, loaded.validation = data.split_records(loaded.train, holdout, spec["dataset"]["seed"] + 1,
                                                             stratify)
        if not loaded.validation:
            raise BadInput(f"rankSweep.holdoutFraction {holdout} of {len(loaded.train)} training examples "
                           "leaves no holdout to score the trial")
    label_ids = None
    if fmt == "text-label":
        label_ids = {name: i for i, name in enumerate(loaded.labels)}
    train_examples, train_stats = text.tokenize(loaded.train, fmt, tokenizer, max_len, label_ids)
    val_examples, val_stats = text.tokenize(loaded.validation, fmt, tokenizer, max_len, label_ids)
    if not train_examples:
        raise BadInput("the dataset has no valid training examples")
    return label_ids, train_examples, val_examples, {"train": train_stats.as_dict(), "validation": val_stats.as_dict()}


def load_evaluation_sets(config: JobConfig, loaded: data.LoadedData, tokenizer) -> list[evalsets.EvalSet]:
    """spec.evaluation.sets, read with the dataset's credentials, validated and tokenized like the dataset."""
    spec = config.spec
    fmt, max_len = spec["dataset"]["format"], spec["training"]["maxSeqLength"]
    count, render_chat = length_check_functions(tokenizer, fmt)
    store = storage.data_store(spec)
    out = []
    for entry in spec["evaluation"]["sets"]:
        raw = store.read(entry["uri"])
        records = evalsets.parse_set(raw, entry["name"], entry["uri"], fmt, count_tokens=count, max_tokens=max_len,
                                     render_chat=render_chat)
        examples, gold = evalsets.tokenize_set(records, fmt, tokenizer, max_len, list(loaded.labels))
        out.append(evalsets.EvalSet(entry["name"], entry["uri"], data.dataset_digest(raw), records, examples, gold))
        duplicates = data.duplicates_across(loaded.train, records)
        log.info("evaluation set ready", extra={"set": entry["name"], "examples": len(examples),
                                                "unknownLabels": sum(g not in loaded.labels for g in gold),
                                                "duplicatesOfTraining": len(duplicates)})
        if duplicates:
            log.warning("evaluation set lines duplicate training examples (leakage)",
                        extra={"set": entry["name"], "pairs": len(duplicates), "first": duplicates[:10]})
    return out


def fetch_reference(config: JobConfig, store, dist, work_dir: Path) -> evalsets.Reference | None:
    """spec.evaluation.reference verified and downloaded once per pod (local rank 0), before training.

    The manifest's cheap checks (same base model and task) run on every rank, so a wrong reference fails
    all of them alike; a failed verification on one pod is shared through a collective."""
    reference_spec = (config.spec.get("evaluation") or {}).get("reference")
    if not reference_spec:
        return None
    uri = reference_spec["manifestUri"]
    document, labels = evalsets.read_reference(store, uri, config.spec)
    target = work_dir / "reference" / str(document.get("digest", "unknown")).replace(":", "-")
    error: BadInput | None = None
    reference = None
    if dist.local_rank == 0:
        try:
            reference = evalsets.fetch_reference(store, uri, config.spec, target)
        except BadInput as exc:
            error = exc
    failed = distributed.all_reduce_mean(1.0 if error else 0.0)  # a collective: every rank learns of a failure
    if error is not None:
        raise error
    if failed:
        raise BadInput(f"evaluation.reference {uri}: the adapter did not verify on another pod (see its log)")
    return reference or evalsets.Reference(uri, document, target, labels)

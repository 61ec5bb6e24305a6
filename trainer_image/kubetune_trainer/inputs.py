"""A run's inputs, checked before any model loads: the dataset, the evaluation sets, the reference."""

from __future__ import annotations

import logging
from pathlib import Path

from kubetune.api import jobconfig
from kubetune.api.jobconfig import JobConfig

from . import data, distributed, evalsets, leakage, storage, text
from .dataset_input import check_lengths, length_check_functions, stratify_field
from .modeling import BadInput

log = logging.getLogger(__name__)


def prepare_data(config: JobConfig, loaded: data.LoadedData, tokenizer) -> tuple:
    spec = config.spec
    fmt, max_len = spec["dataset"]["format"], spec["training"]["maxSeqLength"]
    holdout = config.stage.holdout_fraction if config.stage.kind == jobconfig.STAGE_TRIAL else None
    check_lengths(config, loaded, tokenizer)
    if holdout:
        # A rank-sweep trial trains on the training split minus a holdout and is scored on that holdout:
        # the validation split stays unseen until the full run's final evaluation (no selection bias).
        loaded.train, loaded.validation = data.split_records(loaded.train, holdout, spec["dataset"]["seed"] + 1,
                                                             stratify_field(spec))
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
        duplicates = leakage.find_pairs(loaded.train, records, fmt)  # the dataset's normalisation
        log.info("evaluation set ready", extra={"set": entry["name"], "examples": len(examples),
                                                "unknownLabels": sum(g not in loaded.labels for g in gold),
                                                "duplicatesOfTraining": len(duplicates)})
        if duplicates:
            log.warning("evaluation set lines repeat training examples (leakage; case, whitespace and punctuation "
                        "ignored)",
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

"""A run's inputs, checked before any model loads: the dataset, the evaluation sets, the reference."""

from __future__ import annotations

import logging
from pathlib import Path

from kubetune.api import jobconfig, storage_layout
from kubetune.api.jobconfig import JobConfig

from . import data, distributed, evalsets, leakage, modeling, node_cache, storage, text
from .dataset_input import check_lengths, length_check_functions, missing_data_file, parse_data, stratify_field
from .modeling import BadInput

log = logging.getLogger(__name__)


def load_data(config: JobConfig, progress: storage.ProgressWriter, cache_dir: Path) -> data.LoadedData:
    """The dataset (and validation file), fetched once per pod into `cache_dir` and parsed by every rank."""
    spec = config.spec
    dataset = spec["dataset"]
    progress.update(stage="validating", force=True)
    sources = [("dataset.uri", dataset["uri"])]
    if dataset.get("validationUri"):
        sources.append(("dataset.validationUri", dataset["validationUri"]))
    paths = fetch_data_files(storage.data_store(spec), sources, cache_dir)
    raw = paths[0].read_bytes()
    validation_raw = paths[1].read_bytes() if len(paths) > 1 else None
    return parse_data(config, raw, validation_raw)


def fetch_data_files(store, sources: list[tuple[str, str]], cache_dir: Path) -> list[Path]:
    """Local paths of (field, uri) data files: s3:// objects downloaded once per pod (local rank 0, the
    others wait), file:// read in place. A missing one is BadInput on every rank, naming its field."""
    targets = [node_cache.cache_dir_for(cache_dir, "data", uri) for _, uri in sources]

    def local_path(field: str, uri: str, target: Path) -> Path:
        if uri.startswith("file://"):
            return Path(storage_layout.split_uri(uri)[2])
        return target / node_cache.require_complete(target, f"{field} {uri}")[0].path

    def fetch() -> list[Path]:
        paths = []
        for (field, uri), target in zip(sources, targets, strict=True):
            if uri.startswith("file://"):
                path = local_path(field, uri, target)
                found = path if path.is_file() else None
            else:
                found = node_cache.fetch_object(store, uri, target, f"{field} {uri}")
            if found is None:
                raise missing_data_file(store, field, uri)
            paths.append(found)
        return paths

    def read_local() -> list[Path]:
        return [local_path(field, uri, target) for (field, uri), target in zip(sources, targets, strict=True)]

    return node_cache.once_per_node(distributed.get_dist_info().is_local_main, fetch, read_local)


def resolve_base_model(spec: dict, dist, cache_dir: Path) -> Path:
    """The base model's local directory: fetched by this pod's local rank 0, read by the other ranks."""
    store = storage.model_store(spec)
    return node_cache.once_per_node(
        dist.is_local_main,
        lambda: modeling.resolve_model_dir(spec["baseModel"], store, cache_dir),
        lambda: modeling.resolve_model_dir(spec["baseModel"], store, cache_dir, fetch=False))


def prepare_data(config: JobConfig, loaded: data.LoadedData, tokenizer) -> tuple:
    spec = config.spec
    fmt, max_len = spec["dataset"]["format"], spec["training"]["maxSeqLength"]
    holdout = config.stage.holdout_fraction if config.stage.kind == jobconfig.STAGE_SWEEP else None
    check_lengths(config, loaded, tokenizer)
    if holdout:
        # The rank sweep trains on the training split minus a holdout and scores its configs on that holdout:
        # the validation split stays unseen until the full run's final evaluation (no selection bias).
        loaded.train, loaded.validation = data.split_records(loaded.train, holdout, spec["dataset"]["seed"] + 1,
                                                             stratify_field(spec))
        if not loaded.validation:
            raise BadInput(f"rankSweep.holdoutFraction {holdout} of {len(loaded.train)} training examples "
                           "leaves no holdout to score the sweep")
    label_ids = None
    if fmt == "text-label":
        label_ids = {name: i for i, name in enumerate(loaded.labels)}
    train_examples, train_stats = text.tokenize(loaded.train, fmt, tokenizer, max_len, label_ids)
    val_examples, val_stats = text.tokenize(loaded.validation, fmt, tokenizer, max_len, label_ids)
    if not train_examples:
        raise BadInput("the dataset has no valid training examples")
    return label_ids, train_examples, val_examples, {"train": train_stats.as_dict(), "validation": val_stats.as_dict()}


def load_evaluation_sets(config: JobConfig, loaded: data.LoadedData, tokenizer,
                         cache_dir: Path) -> list[evalsets.EvalSet]:
    """spec.evaluation.sets, read with the dataset's credentials, validated and tokenized like the dataset."""
    spec = config.spec
    fmt, max_len = spec["dataset"]["format"], spec["training"]["maxSeqLength"]
    count, render_chat = length_check_functions(tokenizer, fmt)
    entries = spec["evaluation"]["sets"]
    paths = fetch_data_files(storage.data_store(spec), [(f"evaluation set {e['name']!r}", e["uri"])
                                                        for e in entries], cache_dir)
    out = []
    for entry, path in zip(entries, paths, strict=True):
        raw = path.read_bytes()
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
    all of them alike; a failed verification on one pod reaches every rank (`node_cache.once_per_node`)."""
    reference_spec = (config.spec.get("evaluation") or {}).get("reference")
    if not reference_spec:
        return None
    uri = reference_spec["manifestUri"]
    document, labels = evalsets.read_reference(store, uri, config.spec)
    target = work_dir / "reference" / str(document.get("digest", "unknown")).replace(":", "-")

    def read_local() -> evalsets.Reference:
        node_cache.require_complete(target, f"evaluation.reference {uri}")
        return evalsets.Reference(uri, document, target, labels)

    return node_cache.once_per_node(dist.is_local_main,
                                    lambda: evalsets.fetch_reference(store, uri, config.spec, target), read_local)

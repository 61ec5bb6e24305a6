"""The data stage (jobconfig.STAGE_DATA): one CPU process judges the dataset before any GPU is held.

Parse and validate every line, apply the leakage policy, split, fetch the tokenizer's files only (no
weights, no torch, no DeepSpeed), check lengths, tokenize and measure, then write the stage's result
({"data": data_report.build(...)}) and progress "done". Bad data raises BadInput (exit 2).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from kubetune.api import jobconfig
from kubetune.api.jobconfig import JobConfig

from . import data_report, leakage, storage, text, tokenizer_files
from .data import TRAIN, VALIDATION
from .dataset_input import check_lengths, load_data

log = logging.getLogger(__name__)


def run(config: JobConfig, *, work_dir: Path) -> dict:
    """Judge and measure the dataset; returns the result document written at config.storage.result_uri."""
    spec = config.spec
    store = storage.output_store_from_env(spec)
    is_main = int(os.environ.get("RANK", "0")) == 0  # the rendered stage runs one process; be safe with more
    progress = storage.ProgressWriter(store, config.storage.job_prefix, enabled=is_main)
    loaded = load_data(config, progress)
    progress.update(stage="loading", force=True)
    tokenizer = load_tokenizer(spec, work_dir)
    check_lengths(config, loaded, tokenizer)
    label_ids = {name: i for i, name in enumerate(loaded.labels)} if loaded.fmt == "text-label" else None
    # sys.maxsize: nothing is cut, so the lengths are those before truncation, in the trainer's own tokenization
    lengths = {split: [len(e.input_ids) for e in text.tokenize(records, loaded.fmt, tokenizer, sys.maxsize,
                                                                 label_ids)[0]]
               for split, records in ((TRAIN, loaded.train), (VALIDATION, loaded.validation))}
    report = data_report.build(loaded, lengths, spec["training"]["maxSeqLength"],
                               spec["dataset"].get("leakage", leakage.DROP))
    log.info("dataset report", extra={"summary": loaded.summary(), "report": report})
    document = {"api": jobconfig.STAGE_RESULT_API, "kind": jobconfig.STAGE_DATA,
                "job": {"namespace": config.job.namespace, "name": config.job.name, "uid": config.job.uid},
                "createdAt": storage.now_rfc3339(), "data": report}
    if is_main:
        store.write(config.storage.result_uri, json.dumps(document, sort_keys=True).encode())
        progress.update(stage="done", force=True)
        log.info("stage finished", extra={"stage": jobconfig.STAGE_DATA, "result": config.storage.result_uri})
    return document


def load_tokenizer(spec: dict, work_dir: Path):
    """The base model's tokenizer from its files alone, as the training stage will load it."""
    from transformers import AutoTokenizer

    directory = tokenizer_files.resolve_tokenizer_dir(spec["baseModel"], storage.model_store(spec),
                                                      work_dir / "cache")
    return AutoTokenizer.from_pretrained(directory)

"""spec.evaluation: named held-out sets scored after training, for the new adapter and a reference.

Sets are validated strictly (one bad line fails the job before anything is published); the reference
is an adapter this trainer published, verified file by file before it loads. Pure Python apart from
`load_reference_model`. The flow and the rules are in docs/trainer.md.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from kubetune.api import storage_layout
from kubetune.clients.storage import ObjectInfo, ObjectStore, check_published

from . import data, metrics, node_cache, text
from .modeling import BadInput

log = logging.getLogger(__name__)

LABELS_FILE = "labels.json"  # as publishing.LABELS_FILE (not imported: that module loads torch)
CLASSIFICATION = "SequenceClassification"


@dataclass
class EvalSet:
    """One validated set: its records and their tokenization with the job's tokenizer."""

    name: str
    uri: str
    digest: str
    records: list[data.Record]
    examples: list[text.Example]  # classification: label ids of the candidate, text.IGNORE when unknown to it
    gold: list[str]  # classification: the label names, in line order; [] otherwise


@dataclass
class Reference:
    manifest_uri: str
    manifest: dict
    directory: Path  # the downloaded, verified files
    labels: list[str]  # classification: its class names in id order; [] otherwise

    @property
    def digest(self) -> str:
        return self.manifest["digest"]


# --- sets ---------------------------------------------------------------------------------------------


def parse_set(raw: bytes | None, name: str, uri: str, fmt: str, *, count_tokens: Callable[[str], int],
              max_tokens: int, render_chat: data.ChatRenderer | None = None) -> list[data.Record]:
    """The set's records, or BadInput naming the set and the bad lines (any invalid line, too_long included)."""
    where = f"evaluation set {name!r} ({uri})"
    if raw is None:
        raise BadInput(f"{where} does not exist")
    records, report = data.parse_jsonl(raw, fmt, labels=None, source=data.VALIDATION, source_name=f"{name}: {uri}")
    if report.total_lines == 0:
        raise BadInput(f"{where} is empty: nothing to evaluate")
    if not report.invalid:  # the length check only makes sense on records that parsed
        report.record_length_check(data.check_lengths(records, count_tokens, max_tokens, fmt,
                                                      render_chat=render_chat, source_name=report.source_name))
    if report.invalid:
        first = min(report.errors, key=lambda e: e.line)
        raise BadInput(f"{where}: {report.invalid} invalid line(s), the first at line {first.line} "
                       f"({first.error_class}: {first.message}); an evaluation set must be clean (nothing was "
                       f"published):\n{report.summary()}")
    return records


def tokenize_set(records: list[data.Record], fmt: str, tokenizer, max_length: int,
                 labels: list[str]) -> tuple[list[text.Example], list[str]]:
    """Examples with the job's tokenization; classification labels outside `labels` get text.IGNORE."""
    if fmt != "text-label":
        return text.tokenize(records, fmt, tokenizer, max_length)[0], []
    gold = [r.fields["label"] for r in records]
    examples, _ = text.tokenize(records, fmt, tokenizer, max_length, label_ids(labels, gold))
    return examples, gold


def label_ids(labels: list[str], gold: list[str]) -> dict[str, int]:
    """Name -> id for every gold name: the model's id, or text.IGNORE for a name it does not know."""
    known = {name: i for i, name in enumerate(labels)}
    return {name: known.get(name, text.IGNORE) for name in set(gold)} | known


def relabel(eval_set: EvalSet, labels: list[str]) -> list[text.Example]:
    """The set's examples with another model's label ids (same tokens)."""
    if not eval_set.gold:
        return eval_set.examples
    ids = label_ids(labels, eval_set.gold)
    return [replace(e, label=ids[g]) for e, g in zip(eval_set.examples, eval_set.gold, strict=True)]


def classification_scores(predicted: list[str], gold: list[str], eval_loss: float | None,
                          labels: list[str]) -> dict:
    """Accuracy and macro-F1 on label names (comparable across label lists), eval_loss over the known labels."""
    known = set(labels)
    return {"accuracy": metrics.accuracy(predicted, gold), "macro_f1": metrics.macro_f1(predicted, gold),
            "eval_loss": eval_loss, "unknownLabels": sum(g not in known for g in gold)}


# --- the reference --------------------------------------------------------------------------------------


def reference_prefix(manifest_uri: str) -> str:
    """The job prefix `check_published` wants: the manifest's directory."""
    head, _, tail = manifest_uri.rstrip().rpartition("/")
    if tail != storage_layout.MANIFEST_FILE or not head:
        raise BadInput(f"evaluation.reference.manifestUri {manifest_uri}: must name a published adapter's "
                       f"{storage_layout.MANIFEST_FILE}")
    return head + "/"


def check_reference(document: dict, spec: dict, manifest_uri: str) -> list[str]:
    """Whether an adapter's manifest can be a reference for this job (same base model and task); returns
    its labels (classification) or []. Pure: raises BadInput with what differs."""
    where = f"evaluation.reference {manifest_uri}"
    base = document.get("baseModel") if isinstance(document.get("baseModel"), dict) else {}
    mine = spec["baseModel"]
    if str(base.get("uri") or "").rstrip("/") != mine["uri"].rstrip("/"):
        raise BadInput(f"{where}: the reference adapter was trained on base model {base.get('uri')!r}, this job "
                       f"fine-tunes {mine['uri']!r}; a reference must be an adapter of the same base model")
    if base.get("revision") and mine.get("revision") and base["revision"] != mine["revision"]:
        raise BadInput(f"{where}: the reference adapter was trained on revision {base['revision']!r} of the base "
                       f"model, this job uses {mine['revision']!r}")
    if document.get("task") != spec["task"]:
        raise BadInput(f"{where}: the reference is a {document.get('task')} adapter, this job is {spec['task']}")
    if spec["task"] != CLASSIFICATION:
        return []
    labels = document.get("labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels) \
            or len(set(labels)) != len(labels):
        raise BadInput(f"{where}: the manifest has no valid labels list for its classification head")
    return list(labels)


def read_reference(store: ObjectStore, manifest_uri: str, spec: dict) -> tuple[dict, list[str]]:
    """The reference's manifest, read and checked against this job (cheap: every rank does it)."""
    raw = store.read(manifest_uri)
    if raw is None:
        raise BadInput(f"evaluation.reference {manifest_uri}: no manifest there")
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise BadInput(f"evaluation.reference {manifest_uri}: not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise BadInput(f"evaluation.reference {manifest_uri}: not a manifest (a JSON object)")
    return document, check_reference(document, spec, manifest_uri)


def fetch_reference(store: ObjectStore, manifest_uri: str, spec: dict, target: Path) -> Reference:
    """Verify the published adapter, download it to `target` and check every file's sha256 there."""
    prefix = reference_prefix(manifest_uri)
    check = check_published(store, prefix, verify_content=False)  # digest, paths, sizes; sha256 below, locally
    if not check.found:
        raise BadInput(f"evaluation.reference {manifest_uri}: no manifest there")
    if check.problems:
        problems = "; ".join(f"{p.reason}: {p.message}" for p in check.problems)
        raise BadInput(f"evaluation.reference {manifest_uri}: the adapter does not verify: {problems}")
    document = check.document
    labels = check_reference(document, spec, manifest_uri)
    objects = [(entry["path"], ObjectInfo(check.adapter_uri + entry["path"], int(entry["size"]), entry["sha256"]))
               for entry in document["files"]]
    node_cache.fetch_objects(store, objects, target, f"evaluation.reference {manifest_uri}",
                             expected_sha256={entry["path"]: entry["sha256"] for entry in document["files"]})
    labels_path = target / LABELS_FILE
    if labels and labels_path.is_file():
        on_disk = json.loads(labels_path.read_text()).get("labels")
        if on_disk != labels:
            raise BadInput(f"evaluation.reference {manifest_uri}: {LABELS_FILE} and the manifest's labels differ")
    log.info("reference adapter verified", extra={"manifest": manifest_uri, "digest": document["digest"],
                                                  "files": len(document["files"]), "labels": len(labels)})
    return Reference(manifest_uri, document, target, labels)


# --- loading the reference model ------------------------------------------------------------------------


def load_reference_model(reference: Reference, model_dir: Path, spec: dict, *, precision: str, device,
                         zero3: dict | None):
    """The base model with the reference adapter, for evaluation only (nothing trainable).

    Built the way the trainer builds the candidate: the job's loading (QLoRA's 4-bit base included) and,
    under ZeRO-3 (`zero3`: the job's DeepSpeed config), weights partitioned while loading
    (`hf_deepspeed_config`) unless QLoRA. A classification head gets the reference's own label count.
    A Full or FreezeThaw reference is a whole model: loaded from its own directory.
    """
    from . import distributed, ds_config, modeling
    from .methods import METHODS

    labels = reference.labels
    ids = {name: i for i, name in enumerate(labels)} if labels else None
    keep = None
    if zero3 is not None and ds_config.use_zero_init(zero_stage=3, method=spec["method"]["type"]):
        keep = distributed.hf_deepspeed_config(zero3)
    reference_method = METHODS.get(reference.manifest.get("method"))
    if reference_method is not None and reference_method.publishes_adapter:
        from peft import PeftModel

        # the reference's head pools as it was trained (manifests before pooling was recorded: the architecture's)
        pooling = (reference.manifest.get("head") or {}).get("pooling") if labels else None
        base = modeling.load_model(model_dir, spec, precision=precision, num_labels=len(labels) or None,
                                   label_ids=ids, device=device, pooling=pooling)
        model = PeftModel.from_pretrained(base, str(reference.directory), is_trainable=False)
    else:
        model = modeling.load_model(reference.directory, spec, precision=precision, num_labels=len(labels) or None,
                                    label_ids=ids, device=device)
    del keep
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model

"""The data stage's report as the status holds it (pure): `status_fields` keeps what status.data can
store from the result document the trainer wrote, `summary`, `leakage_message` and `finding_events` are
its Events, `table` the block `kubetune local` prints."""

from __future__ import annotations

import math

from kubetune.api.v1alpha1.finetunejob_status import DATA_STATUS

SPLITS = ("train", "validation")
LEAKAGE_POLICIES = DATA_STATUS["properties"]["leakage"]["properties"]["policy"]["enum"]
MAX_LABELS = DATA_STATUS["properties"]["labels"]["maxItems"]
MAX_DIGEST = DATA_STATUS["properties"]["digest"]["maxLength"]
_FINDINGS = DATA_STATUS["properties"]["findings"]
MAX_FINDINGS = _FINDINGS["maxItems"]
FINDING_FIELDS = _FINDINGS["items"]["properties"]


def _count(value: object) -> int | None:
    """A count the status can hold: JSON from storage may hold anything."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return None
    return int(value)


def _share(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return min(1.0, max(0.0, float(value)))


def _counts(source: object, keys: tuple[str, ...], read=_count) -> dict:
    source = source if isinstance(source, dict) else {}
    return {key: value for key in keys if (value := read(source.get(key))) is not None}


def status_fields(report: object) -> dict:
    """The report's fields that status.data defines, each of its type; anything else is left out (a field
    the API server would refuse must not cost the whole status write)."""
    report = report if isinstance(report, dict) else {}
    out: dict = {}
    if isinstance(report.get("digest"), str):
        out["digest"] = report["digest"][:MAX_DIGEST]
    examples = _counts(report.get("examples"), SPLITS)
    if examples:
        out["examples"] = examples
    if (invalid := _count(report.get("invalidLines"))) is not None:
        out["invalidLines"] = invalid
    labels = [{"name": str(label["name"])[:256], **_counts(label, SPLITS)}
              for label in report.get("labels") or [] if isinstance(label, dict) and "name" in label]
    out["labels"] = labels[:MAX_LABELS]
    tokens = report.get("tokens") if isinstance(report.get("tokens"), dict) else {}
    lengths = {split: _counts(tokens.get(split), ("p50", "p95", "max")) for split in SPLITS}
    if any(lengths.values()):
        out["tokens"] = {split: value for split, value in lengths.items() if value}
    truncated = _counts(report.get("truncated"), SPLITS, _share)
    if truncated:
        out["truncated"] = truncated
    duplicates = _counts(report.get("duplicates"), ("withinTrain", "withinValidation", "acrossSplits"))
    if duplicates:
        out["duplicates"] = duplicates
    leakage = report.get("leakage") if isinstance(report.get("leakage"), dict) else {}
    counted = _counts(leakage, ("matched", "dropped"))
    if leakage.get("policy") in LEAKAGE_POLICIES:
        counted["policy"] = leakage["policy"]
    if counted:
        out["leakage"] = counted
    found = findings(report.get("findings"))
    if found:
        out["findings"] = found
    return out


def findings(value: object) -> list[dict]:
    """The dataset policy's findings the status can hold (a report without them, from an older trainer: [])."""
    out = []
    for item in value if isinstance(value, list) else []:
        if not isinstance(item, dict) or item.get("severity") not in FINDING_FIELDS["severity"]["enum"]:
            continue
        out.append({"severity": item["severity"],
                    "code": str(item.get("code") or "Finding")[:FINDING_FIELDS["code"]["maxLength"]],
                    "message": str(item.get("message") or "")[:FINDING_FIELDS["message"]["maxLength"]]})
    return out[:MAX_FINDINGS]


def finding_events(found: list[dict], *, skip: tuple[str, ...] = ()) -> list[tuple[str, str, str]]:
    """(type, reason, message) of the Event each finding becomes: Warning, Data<code> (an Error refused the
    dataset, so it is a Warning too: Kubernetes has no other type)."""
    return [("Warning", f"Data{f['code']}", f"{f['severity']}: {f['message']}") for f in found if f["code"] not in skip]


def findings_text(found: list[dict]) -> list[str]:
    """A line per finding (`kubetune local`'s summary)."""
    return [f"{f['severity'].lower()} {f['code']}: {f['message']}" for f in found]


def leakage_message(record: dict) -> str | None:
    """The Warning Event's text when validation examples were found in training; None when none were."""
    leakage = record.get("leakage") or {}
    matched = leakage.get("matched") or 0
    if not matched:
        return None
    policy = leakage.get("policy", "Drop")
    validation = (record.get("examples") or {}).get("validation")
    of = f" of {validation + leakage.get('dropped', 0)}" if validation is not None else ""
    done = {"Drop": f"{leakage.get('dropped', 0)} dropped from validation",
            "Warn": "kept (the validation metrics overstate the adapter)"}.get(policy, "refused")
    return (f"{matched}{of} validation examples also appear in training (text compared with case, whitespace "
            f"and punctuation ignored); spec.dataset.leakage is {policy}: {done}")


def _lengths(tokens: dict) -> str:
    return f"p50 {tokens.get('p50', '-')}, p95 {tokens.get('p95', '-')}, max {tokens.get('max', '-')}"


def summary(record: dict) -> str:
    """One line: examples per split, labels, token lengths, truncation, duplicates."""
    examples = record.get("examples") or {}
    parts = [f"{examples.get('train', 0)} training and {examples.get('validation', 0)} validation examples"]
    if record.get("labels"):
        parts.append(f"{len(record['labels'])} labels")
    train_tokens = (record.get("tokens") or {}).get("train")
    if train_tokens:
        parts.append(f"training tokens {_lengths(train_tokens)}")
    truncated = (record.get("truncated") or {}).get("train")
    if truncated:
        parts.append(f"{truncated:.1%} of training truncated")
    duplicates = record.get("duplicates") or {}
    repeated = {key: value for key, value in duplicates.items() if value}
    if repeated:
        parts.append("duplicates " + ", ".join(f"{key} {value}" for key, value in sorted(repeated.items())))
    if record.get("invalidLines"):
        parts.append(f"{record['invalidLines']} invalid lines skipped")
    return "; ".join(parts)


def table(record: dict) -> str:
    """The data report as text rows (`kubetune local`)."""
    examples, tokens = record.get("examples") or {}, record.get("tokens") or {}
    truncated = record.get("truncated") or {}
    rows = [f"{'split':<11} {'examples':>8} {'tokens p50':>10} {'p95':>6} {'max':>6} {'truncated':>9}"]
    for split in SPLITS:
        lengths = tokens.get(split) or {}
        share = truncated.get(split)
        rows.append(f"{split:<11} {examples.get(split, '-')!s:>8} {lengths.get('p50', '-')!s:>10} "
                    f"{lengths.get('p95', '-')!s:>6} {lengths.get('max', '-')!s:>6} "
                    f"{(f'{share:.1%}' if share is not None else '-'):>9}")
    for label in record.get("labels") or []:
        rows.append(f"  label {label['name']}: train {label.get('train', 0)}, validation {label.get('validation', 0)}")
    duplicates = record.get("duplicates") or {}
    if duplicates:
        rows.append("duplicates: " + ", ".join(f"{key} {value}" for key, value in duplicates.items()))
    leakage = record.get("leakage") or {}
    if leakage:
        rows.append(f"leakage ({leakage.get('policy', '-')}): {leakage.get('matched', 0)} matched, "
                    f"{leakage.get('dropped', 0)} dropped")
    if record.get("invalidLines"):
        rows.append(f"invalid lines skipped: {record['invalidLines']}")
    rows += findings_text(record.get("findings") or [])
    return "\n".join(rows)

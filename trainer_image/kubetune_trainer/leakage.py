"""Validation rows that copy training rows, matched on normalised text, and spec.dataset.leakage's policy.

Pure (no torch, no tokenizer): the data stage, the baseline, the sweep and training apply the same
policy to the same splits. Which fields form the text of each format: docs/trainer.md.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

DROP, FAIL, WARN = "Drop", "Fail", "Warn"
POLICIES = (DROP, FAIL, WARN)
SHOWN_PAIRS = 10  # the pairs a refusal or a log line names


class _Record(Protocol):
    line: int
    fields: dict[str, Any]


def normalise(text: str) -> str:
    """Case-folded, punctuation removed, whitespace collapsed (NFKC first, so full-width forms match)."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    kept = "".join(c for c in folded if not unicodedata.category(c).startswith("P"))
    return " ".join(kept.split())


def match_parts(fields: dict[str, Any], fmt: str) -> list[str]:
    """The texts a row is matched on: what the model reads and writes, never a label or a role."""
    if fmt == "prompt-completion":
        return [fields["prompt"], fields["completion"]]
    if fmt == "chat":
        return [message["content"] for message in fields["messages"]]
    if fmt in ("text", "text-label"):  # text-label: the same text under another label is still a copy
        return [fields["text"]]
    raise ValueError(f"unknown dataset format {fmt!r}")


def match_key(fields: dict[str, Any], fmt: str) -> str:
    """Equal for two rows that differ only in case, whitespace and punctuation (field by field)."""
    return json.dumps([normalise(part) for part in match_parts(fields, fmt)], ensure_ascii=False)


def find_pairs(train: Iterable[_Record], other: Iterable[_Record], fmt: str) -> list[tuple[int, int]]:
    """(training line, other line) for every row of `other` whose normalised text is in training
    (the first training line with that text)."""
    first_train_line: dict[str, int] = {}
    for record in train:
        first_train_line.setdefault(match_key(record.fields, fmt), record.line)
    pairs = []
    for record in other:
        line = first_train_line.get(match_key(record.fields, fmt))
        if line is not None:
            pairs.append((line, record.line))
    return pairs


def repeats_within(records: Sequence[_Record], fmt: str) -> int:
    """How many rows repeat an earlier row's normalised text (counted, never dropped)."""
    return len(records) - len({match_key(record.fields, fmt) for record in records})


@dataclass(frozen=True)
class Outcome:
    """What the policy found and did: `pairs` are (training line, validation line)."""

    policy: str
    pairs: list[tuple[int, int]] = field(default_factory=list)
    dropped: int = 0

    @property
    def matched(self) -> int:
        return len(self.pairs)

    @property
    def refused(self) -> bool:
        return self.policy == FAIL and bool(self.pairs)

    def as_report(self) -> dict:
        return {"policy": self.policy, "matched": self.matched, "dropped": self.dropped}

    def refusal(self, train_name: str, validation_name: str) -> str:
        """The BadInput message: the validation lines and the training lines they copy (the first few)."""
        shown = ", ".join(f"validation line {v} = training line {t}" for t, v in self.pairs[:SHOWN_PAIRS])
        more = f", ... and {self.matched - SHOWN_PAIRS} more" if self.matched > SHOWN_PAIRS else ""
        files = f"lines of {train_name}" if train_name == validation_name else \
            f"validation lines of {validation_name}, training lines of {train_name}"
        return (f"dataset.leakage is Fail and {self.matched} validation examples copy training examples "
                f"(case, whitespace and punctuation ignored; {files}): {shown}{more}")


def apply_policy(policy: str, pairs: list[tuple[int, int]], validation: list) -> tuple[list, Outcome]:
    """(the validation rows to keep, the outcome). Drop removes the matched rows; Fail and Warn keep them
    (Fail: the caller refuses the dataset when `outcome.refused`)."""
    if policy not in POLICIES:
        raise ValueError(f"dataset.leakage {policy!r} is not one of {', '.join(POLICIES)}")
    if policy != DROP or not pairs:
        return validation, Outcome(policy, pairs)
    leaked = {v for _, v in pairs}
    kept = [record for record in validation if record.line not in leaked]
    return kept, Outcome(policy, pairs, dropped=len(validation) - len(kept))

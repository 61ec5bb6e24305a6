"""The dataset policy: whether the final splits can train and measure anything, as structured findings.

Pure (no torch, no tokenizer), applied by every stage to the splits left after validation, the leakage
policy and the length check. The minimums and why: docs/trainer.md, "Dataset policy".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from . import leakage
from .data import LoadedData, Record

ERROR, WARNING = "Error", "Warning"
MIN_TRAIN_EXAMPLES = 2  # one example is memorised, not learned: nothing to generalise from
MIN_VALIDATION_EXAMPLES = 2  # one example's loss or accuracy (0 or 1) is a coin toss, not a measurement
MIN_TRAIN_LABELS = 2  # a classifier of one class is always right: accuracy 1.0 that means nothing
MAX_LEAKED_SHARE = 0.5  # under Warn: above it, validation mostly measures memorisation, so it is refused
SHOWN_LABELS = 10


@dataclass(frozen=True)
class Finding:
    """One thing the policy found: Error refuses the dataset (BadInput), Warning is reported and kept."""

    severity: str
    code: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"severity": self.severity, "code": self.code, "message": self.message}

    def __str__(self) -> str:
        return f"{self.severity} {self.code}: {self.message}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _names(labels: Sequence[str]) -> str:
    shown = ", ".join(repr(label) for label in labels[:SHOWN_LABELS])
    return shown + (f", ... and {len(labels) - SHOWN_LABELS} more" if len(labels) > SHOWN_LABELS else "")


def _first_lines(records: Sequence[Record], labels: Sequence[str]) -> str:
    first: dict[str, int] = {}
    for record in records:
        first.setdefault(record.fields["label"], record.line)
    return ", ".join(f"{label!r} (line {first[label]})" for label in labels[:SHOWN_LABELS]) + \
        (f", ... and {len(labels) - SHOWN_LABELS} more" if len(labels) > SHOWN_LABELS else "")


def size_findings(train: int, validation: int, *, validation_expected: bool, dropped: int = 0) -> list[Finding]:
    """Splits too small to train or to measure; validation only when the spec asks for one."""
    out = []
    if train < MIN_TRAIN_EXAMPLES:
        out.append(Finding(ERROR, "TrainingTooSmall", f"the training split has {_count(train, 'example')}; "
                           f"at least {MIN_TRAIN_EXAMPLES} are needed to train anything"))
    if validation_expected and validation < MIN_VALIDATION_EXAMPLES:
        why = f" after {dropped} copies of training examples were dropped (dataset.leakage Drop)" if dropped else ""
        has = _count(validation, "example")
        out.append(Finding(ERROR, "ValidationTooSmall", f"the validation split has {has}{why}; at least "
                           f"{MIN_VALIDATION_EXAMPLES} are needed to measure the adapter (add data, raise "
                           "dataset.validationSplit or give dataset.validationUri)"))
    return out


def label_findings(train: Sequence[Record], validation: Sequence[Record], declared: Sequence[str],
                   validation_name: str) -> list[Finding]:
    """text-label: fewer than two training labels, labels that only validation has, labels never measured."""
    trained = sorted({r.fields["label"] for r in train})
    measured = {r.fields["label"] for r in validation}
    out = []
    if len(trained) < MIN_TRAIN_LABELS:
        out.append(Finding(ERROR, "TooFewLabels", f"the training split has {_count(len(trained), 'distinct label')} "
                           f"({_names(trained)}); a classifier needs at least "
                           f"{MIN_TRAIN_LABELS}, else its accuracy is 1.0 and means nothing"))
    unseen = sorted(measured - set(trained))
    if unseen:
        out.append(Finding(ERROR, "LabelsOnlyInValidation", "labels in validation but never in training (the "
                           f"adapter cannot learn them): {_first_lines(validation, unseen)} in {validation_name}"))
    if validation and len(trained) >= MIN_TRAIN_LABELS:
        unmeasured = sorted(set(trained) - measured)
        if unmeasured:
            out.append(Finding(WARNING, "LabelsNotValidated", f"{_count(len(unmeasured), 'training label')} without "
                               f"a validation example, so the metrics say nothing about them: {_names(unmeasured)}"))
    unused = sorted(set(declared) - set(trained) - measured)
    if unused:
        out.append(Finding(WARNING, "DeclaredLabelsUnused", f"{_count(len(unused), 'label')} of spec.labels without an "
                           f"example in either split: {_names(unused)}"))
    return out


def leakage_findings(outcome: leakage.Outcome, validation: int) -> list[Finding]:
    """Validation rows that copy training rows: Drop and Warn below MAX_LEAKED_SHARE warn; Warn above it
    refuses (Fail refused already, naming every pair: dataset_input.apply_leakage_policy)."""
    if not outcome.matched:
        return []
    before = validation + outcome.dropped
    share = outcome.matched / before if before else 0.0
    counted = (f"{outcome.matched} of {before} validation examples copy training examples ({share:.0%}; case, "
               "whitespace and punctuation ignored)")
    if outcome.policy == leakage.DROP:
        return [Finding(WARNING, "Leakage", f"{counted}; dataset.leakage is Drop: {outcome.dropped} dropped "
                        "from validation")]
    if share > MAX_LEAKED_SHARE:
        return [Finding(ERROR, "Leakage", f"{counted}; dataset.leakage is Warn, but above "
                        f"{MAX_LEAKED_SHARE:.0%} the validation metrics measure memorisation: set dataset.leakage "
                        "to Drop or give a validation set of new examples")]
    return [Finding(WARNING, "Leakage", f"{counted}; dataset.leakage is Warn: kept, so the validation metrics "
                    "overstate the adapter")]


def findings(loaded: LoadedData, *, validation_expected: bool, declared_labels: Sequence[str] = (),
             validation_name: str = "validation") -> list[Finding]:
    """Every finding on the final splits, errors first (their order in a refusal)."""
    outcome = loaded.leakage_outcome or leakage.Outcome(leakage.WARN, list(loaded.leakage))
    found = size_findings(len(loaded.train), len(loaded.validation), validation_expected=validation_expected,
                          dropped=outcome.dropped)
    if loaded.fmt == "text-label":
        found += label_findings(loaded.train, loaded.validation, declared_labels, validation_name)
    found += leakage_findings(outcome, len(loaded.validation))
    return sorted(found, key=lambda f: f.severity != ERROR)


def refusal(found: Sequence[Finding]) -> str | None:
    """The BadInput message when any finding is an Error; None when the dataset may train."""
    errors = [f for f in found if f.severity == ERROR]
    if not errors:
        return None
    return "the dataset cannot train or be measured (nothing was trained):\n" + \
        "\n".join(f"  {f.code}: {f.message}" for f in errors)

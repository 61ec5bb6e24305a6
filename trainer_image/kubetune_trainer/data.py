"""Validation, splitting and leakage checks of JSONL training data, run before any GPU time is spent.

Pure Python on purpose (no torch, no tokenizer): the trainer runs it first and exits with EXIT_BAD_INPUT
on a rejected dataset within seconds. Token lengths are checked through a callable that the trainer builds
from its tokenizer (`check_lengths`, `LoadedData.apply_length_check`).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .leakage import Outcome, find_pairs
from .split_sizes import allocate, validation_size

FORMATS = ("prompt-completion", "chat", "text", "text-label")
FORMAT_FIELDS = {
    "prompt-completion": ("prompt", "completion"),
    "chat": ("messages",),
    "text": ("text",),
    "text-label": ("text", "label"),
}
CHAT_ROLES = ("system", "user", "assistant")

INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
EMPTY_FIELD = "empty_field"
WRONG_TYPE = "wrong_type"
UNKNOWN_ROLE = "unknown_role"
MISSING_ASSISTANT_TURN = "missing_assistant_turn"
UNKNOWN_LABEL = "unknown_label"
EMPTY_LINE = "empty_line"
TOO_LONG = "too_long"
# The order in which a summary lists them: file-level problems first, then field problems, then length.
ERROR_CLASSES = (
    INVALID_UTF8,
    INVALID_JSON,
    NOT_AN_OBJECT,
    EMPTY_LINE,
    MISSING_FIELD,
    EMPTY_FIELD,
    WRONG_TYPE,
    UNKNOWN_ROLE,
    MISSING_ASSISTANT_TURN,
    UNKNOWN_LABEL,
    TOO_LONG,
)

TRAIN = "train"
VALIDATION = "validation"
MAX_EXAMPLES_PER_CLASS = 20
MISSING_STRATUM = "missing"  # never equal to a stratum key, which is always canonical JSON (quoted if a string)

_BOM = b"\xef\xbb\xbf"

ChatRenderer = Callable[[list[dict[str, str]]], str]


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def dataset_digest(*blobs: bytes) -> str:
    """sha256 over the raw bytes of every blob, in order (one blob: the same hex as `sha256sum`)."""
    digest = hashlib.sha256()
    for blob in blobs:
        digest.update(blob)
    return f"sha256:{digest.hexdigest()}"


@dataclass(frozen=True)
class DataError:
    line: int  # 1-based, relative to its file
    error_class: str  # one of ERROR_CLASSES
    message: str
    source_name: str = ""

    def __str__(self) -> str:
        where = f"{self.source_name} line {self.line}" if self.source_name else f"line {self.line}"
        return f"{where}: {self.error_class}: {self.message}"


@dataclass(frozen=True)
class Record:
    """One valid example. `fields` holds only the format's fields; `key` is their canonical JSON."""

    line: int
    source: str  # TRAIN or VALIDATION: the split it ended up in
    fields: dict[str, Any]
    key: str = ""  # computed from fields when not given
    # Other top-level scalar keys of the line: never trained on, kept so that stratify_by can name them.
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", canonical_json(self.fields))


@dataclass
class LengthCheck:
    max_tokens: int
    errors: list[DataError] = field(default_factory=list)  # every too_long example: the trainer drops them all
    truncated: int = 0
    truncated_lines: list[int] = field(default_factory=list)  # the first MAX_EXAMPLES_PER_CLASS

    @property
    def too_long_lines(self) -> set[int]:
        return {error.line for error in self.errors}


@dataclass
class DataReport:
    """What one file's validation found. Counts are exact; `errors` keeps a few examples per class."""

    source_name: str
    total_lines: int = 0  # trailing blank lines are not counted
    valid: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    errors: list[DataError] = field(default_factory=list)
    duplicates_within: int = 0
    # (train line, validation line) pairs of the same normalised text; set on the training file's report.
    leakage: list[tuple[int, int]] = field(default_factory=list)
    max_tokens: int | None = None  # set once a length check is recorded
    truncated: int = 0
    truncated_lines: list[int] = field(default_factory=list)
    max_examples_per_class: int = MAX_EXAMPLES_PER_CLASS

    @property
    def invalid(self) -> int:
        return self.total_lines - self.valid

    @property
    def invalid_fraction(self) -> float:
        return self.invalid / self.total_lines if self.total_lines else 0.0

    def add_error(self, error: DataError) -> None:
        seen = self.counts.get(error.error_class, 0)
        if seen < self.max_examples_per_class:
            self.errors.append(error)
        self.counts[error.error_class] = seen + 1

    def record_length_check(self, check: LengthCheck) -> None:
        if self.max_tokens is not None:
            raise RuntimeError(f"{self.source_name}: a length check is already recorded")
        self.max_tokens = check.max_tokens
        for error in check.errors:
            self.add_error(error)
        self.valid -= len(check.errors)
        self.truncated = check.truncated
        self.truncated_lines = list(check.truncated_lines)

    def acceptable(self, max_invalid_fraction: float) -> bool:
        """Whether training may go on, skipping the invalid lines. A file without a valid example never is."""
        return self.valid > 0 and self.invalid_fraction <= max_invalid_fraction

    def summary(self) -> str:
        if self.total_lines == 0:
            return f"dataset {self.source_name}: empty (no examples)"
        percent = f"{100 * self.invalid_fraction:.3g}%"
        out = [
            f"dataset {self.source_name}: {self.total_lines} lines, {self.valid} valid, "
            f"{self.invalid} invalid ({percent})"
        ]
        for error_class in ERROR_CLASSES:
            count = self.counts.get(error_class, 0)
            if not count:
                continue
            examples = sorted((e for e in self.errors if e.error_class == error_class), key=lambda e: e.line)
            out.append(f"  {error_class}: {count} ({_lines_text([e.line for e in examples], count)})")
            out.append(f"    e.g. line {examples[0].line}: {examples[0].message}")
        if self.truncated:
            out.append(
                f"  truncated: {self.truncated} examples longer than {self.max_tokens} tokens "
                f"({_lines_text(sorted(self.truncated_lines), self.truncated)})"
            )
        if self.duplicates_within:
            out.append(f"  duplicates: {self.duplicates_within} examples repeat an earlier example exactly")
        if self.leakage:
            shown = ", ".join(f"train line {t} = validation line {v}" for t, v in self.leakage[:5])
            more = f", ... and {len(self.leakage) - 5} more" if len(self.leakage) > 5 else ""
            out.append(f"  leakage: {len(self.leakage)} validation examples repeat training examples, case, "
                       f"whitespace and punctuation ignored ({shown}{more})")
        return "\n".join(out)


def _lines_text(shown: list[int], count: int) -> str:
    if count == 1:
        return f"line {shown[0]}"
    more = f", ... and {count - len(shown)} more" if count > len(shown) else ""
    return f"lines {', '.join(map(str, shown))}{more}"


# --- parsing and validation ------------------------------------------------------------------------------------


class _InvalidLine(Exception):
    def __init__(self, error_class: str, message: str) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.message = message


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _shown(value: str, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 4] + '..."'


def _required_string(obj: dict[str, Any], name: str, path: str | None = None, *, allow_empty: bool = False) -> str:
    shown = path or f'"{name}"'
    # null is what exporters (pandas, SQL dumps) write for an absent value, so it reads as missing.
    if obj.get(name) is None:
        raise _InvalidLine(MISSING_FIELD, f"{shown} is {'null' if name in obj else 'missing'}")
    value = obj[name]
    if not isinstance(value, str):
        raise _InvalidLine(WRONG_TYPE, f"{shown} is {_json_type(value)}, expected a string")
    if not allow_empty and not value.strip():
        raise _InvalidLine(EMPTY_FIELD, f"{shown} is {'empty' if not value else 'blank (whitespace only)'}")
    return value


def _prompt_completion_fields(obj: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": _required_string(obj, "prompt"), "completion": _required_string(obj, "completion")}


def _text_fields(obj: dict[str, Any]) -> dict[str, Any]:
    return {"text": _required_string(obj, "text")}


def _chat_fields(obj: dict[str, Any]) -> dict[str, Any]:
    if obj.get("messages") is None:
        raise _InvalidLine(MISSING_FIELD, f'"messages" is {"null" if "messages" in obj else "missing"}')
    messages = obj["messages"]
    if not isinstance(messages, list):
        raise _InvalidLine(WRONG_TYPE, f'"messages" is {_json_type(messages)}, expected an array')
    if not messages:
        raise _InvalidLine(EMPTY_FIELD, '"messages" is empty')
    normalized = []
    for index, message in enumerate(messages):
        path = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _InvalidLine(WRONG_TYPE, f"{path} is {_json_type(message)}, expected an object")
        role = _required_string(message, "role", f"{path}.role")
        if role not in CHAT_ROLES:
            raise _InvalidLine(UNKNOWN_ROLE, f"{path}.role {_shown(role)} is not one of {', '.join(CHAT_ROLES)}")
        # Exporters write an empty system prompt when there is none; it is harmless, unlike an empty turn.
        content = _required_string(message, "content", f"{path}.content", allow_empty=role == "system")
        normalized.append({"role": role, "content": content})
    if not any(message["role"] == "assistant" for message in normalized):
        raise _InvalidLine(MISSING_ASSISTANT_TURN, '"messages" has no assistant turn: nothing to train on')
    return {"messages": normalized}


def _text_label_validator(labels: Sequence[str] | None) -> Callable[[dict[str, Any]], dict[str, Any]]:
    declared = frozenset(labels or ())
    listed = ", ".join(list(labels or ())[:10]) + (", ..." if len(declared) > 10 else "")

    def fields(obj: dict[str, Any]) -> dict[str, Any]:
        text = _required_string(obj, "text")
        label = _required_string(obj, "label")
        if declared and label not in declared:
            raise _InvalidLine(UNKNOWN_LABEL, f'"label" {_shown(label)} is not one of the declared labels: {listed}')
        return {"text": text, "label": label}

    return fields


def _validator(fmt: str, labels: Sequence[str] | None) -> Callable[[dict[str, Any]], dict[str, Any]]:
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if labels and fmt != "text-label":
        raise ValueError(f"labels apply only to text-label data, not {fmt}")
    if fmt == "text-label":
        return _text_label_validator(labels)
    return {"prompt-completion": _prompt_completion_fields, "chat": _chat_fields, "text": _text_fields}[fmt]


def _unpaired_surrogate(value: Any, path: str) -> str | None:
    """The path of the first string holding a lone surrogate, which tokenizers refuse to encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, list):
        items: Iterable[tuple[str, Any]] = ((f"{path}[{i}]", item) for i, item in enumerate(value))
    else:
        items = ((f"{path}.{k}" if path else k, item) for k, item in value.items())
    return next((found for p, item in items if (found := _unpaired_surrogate(item, p)) is not None), None)


def _parse_line(
    raw: bytes, validate: Callable[[dict[str, Any]], dict[str, Any]], fmt: str, line: int, source: str
) -> Record:
    if not raw.strip():
        raise _InvalidLine(EMPTY_LINE, "blank line (only blank lines at the end of the file are ignored)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _InvalidLine(INVALID_UTF8, f"byte 0x{raw[e.start]:02x} at offset {e.start} is not valid UTF-8") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise _InvalidLine(INVALID_JSON, f"{e.msg} at column {e.colno}") from None
    except RecursionError:
        raise _InvalidLine(INVALID_JSON, "nested too deeply") from None
    except ValueError as e:  # e.g. an integer beyond Python's digit limit
        raise _InvalidLine(INVALID_JSON, str(e)) from None
    if not isinstance(obj, dict):
        raise _InvalidLine(NOT_AN_OBJECT, f"the line is {_json_type(obj)}, expected a JSON object")
    fields = validate(obj)
    # Raw UTF-8 cannot hold a surrogate; only a \uD800-style escape can, so most lines skip the walk.
    if "\\u" in text and (path := _unpaired_surrogate(fields, "")) is not None:
        shown = f'"{path}"' if path.isidentifier() else path  # quoted like the other messages' top-level fields
        raise _InvalidLine(INVALID_UTF8, f"{shown} contains an unpaired surrogate escape, which is not valid Unicode")
    names = FORMAT_FIELDS[fmt]
    extra = {k: v for k, v in obj.items() if k not in names and (v is None or isinstance(v, str | int | float))}
    return Record(line=line, source=source, fields=fields, extra=extra)


def parse_jsonl(
    data: bytes,
    fmt: str,
    *,
    labels: Sequence[str] | None = None,
    source: str = TRAIN,
    source_name: str = "train.jsonl",
) -> tuple[list[Record], DataReport]:
    """Validate every line; invalid lines are reported (one error each, the first found) and left out.

    `labels` (text-label only; None or empty: not declared) makes any other label an unknown_label error.
    """
    validate = _validator(fmt, labels)
    # Split on b"\n" only: str.splitlines would also break inside JSON strings holding U+2028 and friends.
    lines = data.split(b"\n")
    if lines[0].startswith(_BOM):  # written by some Windows editors; harmless
        lines[0] = lines[0][len(_BOM) :]
    while lines and not lines[-1].strip():
        lines.pop()
    report = DataReport(source_name=source_name, total_lines=len(lines))
    records = []
    for number, raw in enumerate(lines, start=1):
        try:
            records.append(_parse_line(raw, validate, fmt, number, source))
        except _InvalidLine as e:
            report.add_error(DataError(number, e.error_class, e.message, source_name))
    report.valid = len(records)
    report.duplicates_within = duplicates_within(records)
    return records, report


# --- lengths ---------------------------------------------------------------------------------------------------


def render_chat_plain(messages: list[dict[str, str]]) -> str:
    """A stand-in for the chat template: `role: content` turns joined by newlines.

    The role word approximates the per-turn markup of a real template, which adds a few more tokens;
    pass the tokenizer's own template as `render_chat` for exact counts.
    """
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _token_extent(
    fields: dict[str, Any], fmt: str, count_tokens: Callable[[str], int], render_chat: ChatRenderer, max_tokens: int
) -> tuple[int, int | None]:
    """(tokens before the first trained-on token, total tokens or None when the first already overflows)."""
    if fmt == "prompt-completion":
        # The trainer tokenizes prompt + completion as one string, so count the concatenation, not the sum:
        # merges across the boundary make the two differ.
        before = count_tokens(fields["prompt"])
        return before, None if before >= max_tokens else count_tokens(fields["prompt"] + fields["completion"])
    if fmt == "chat":
        messages = fields["messages"]
        first_assistant = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        before = count_tokens(render_chat(messages[:first_assistant])) if first_assistant else 0
        return before, None if before >= max_tokens else count_tokens(render_chat(messages))
    return 0, count_tokens(fields["text"])  # text, text-label: every token is trained on (or classified)


def check_lengths(
    records: Iterable[Record],
    count_tokens: Callable[[str], int],
    max_tokens: int,
    fmt: str,
    *,
    render_chat: ChatRenderer | None = None,
    source_name: str = "",
) -> LengthCheck:
    """too_long for examples with nothing left to train on after right-truncation to max_tokens; count the rest
    that are truncated.

    prompt-completion: too_long when the prompt alone fills max_tokens. chat: when the turns before the first
    assistant turn do (rendered with `render_chat`, default `render_chat_plain`). text, text-label: never too_long.
    `count_tokens` should count what the model sees, special tokens included.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    _validator(fmt, None)
    render = render_chat or render_chat_plain
    check = LengthCheck(max_tokens=max_tokens)
    for record in records:
        before, total = _token_extent(record.fields, fmt, count_tokens, render, max_tokens)
        if total is None:
            what = "the prompt" if fmt == "prompt-completion" else "the turns before the first assistant turn"
            check.errors.append(
                DataError(
                    record.line,
                    TOO_LONG,
                    f"{what} take {before} tokens, at or beyond max_tokens {max_tokens}: "
                    "nothing would be left to train on after truncation",
                    source_name,
                )
            )
        elif total > max_tokens:
            check.truncated += 1
            if len(check.truncated_lines) < MAX_EXAMPLES_PER_CLASS:
                check.truncated_lines.append(record.line)
    return check


# --- splitting and leakage -------------------------------------------------------------------------------------


def duplicates_within(records: Sequence[Record]) -> int:
    """How many records repeat an earlier one exactly."""
    return len(records) - len({record.key for record in records})


def _stratum(record: Record, field_name: str) -> str:
    if field_name in record.fields:
        return canonical_json(record.fields[field_name])
    if field_name in record.extra:
        return canonical_json(record.extra[field_name])
    return MISSING_STRATUM


def split_records(
    records: Sequence[Record], validation_fraction: float, seed: int, stratify_by: str | None = None
) -> tuple[list[Record], list[Record]]:
    """(train, validation), both in an order shuffled by `random.Random(seed)`; deterministic per seed.

    With stratify_by (a field of the format, or another top-level scalar key of the lines; absent: one
    "missing" stratum), every stratum of >= 2 examples lands in both splits and the rest proportionally.
    A stratum of one example stays in training, so a high-cardinality field can leave validation short.
    """
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    shuffled = list(records)
    random.Random(seed).shuffle(shuffled)
    target = validation_size(len(shuffled), validation_fraction)
    if stratify_by is None or target == 0:
        in_validation = [index < target for index in range(len(shuffled))]
    else:
        strata: dict[str, list[int]] = defaultdict(list)
        for index, record in enumerate(shuffled):
            strata[_stratum(record, stratify_by)].append(index)
        quota = allocate({k: len(v) for k, v in strata.items()}, validation_fraction, target)
        in_validation = [False] * len(shuffled)
        for k, indices in strata.items():
            for index in indices[: quota[k]]:
                in_validation[index] = True
    train = [_in_split(r, TRAIN) for r, v in zip(shuffled, in_validation, strict=True) if not v]
    validation = [_in_split(r, VALIDATION) for r, v in zip(shuffled, in_validation, strict=True) if v]
    return train, validation


def _in_split(record: Record, source: str) -> Record:
    return record if record.source == source else replace(record, source=source)


# --- all together ----------------------------------------------------------------------------------------------


@dataclass
class LoadedData:
    fmt: str
    train: list[Record]
    validation: list[Record]
    reports: list[DataReport]  # the training file's, then the validation file's when there is one
    leakage: list[tuple[int, int]]  # (train line, validation line) still in the splits, same normalised text
    labels: list[str]  # text-label: the declared labels in id order, else those found, sorted; [] otherwise
    digest: str  # sha256 of the dataset file, "+" that of the validation file when there is one
    leakage_outcome: Outcome | None = None  # set once spec.dataset.leakage is applied (dataset_input.py)
    findings: list[dict] = field(default_factory=list)  # the dataset policy's (dataset_policy.Finding.as_dict)

    def acceptable(self, max_invalid_fraction: float) -> bool:
        return all(report.acceptable(max_invalid_fraction) for report in self.reports)

    def summary(self) -> str:
        return "\n".join(report.summary() for report in self.reports)

    def apply_length_check(
        self, count_tokens: Callable[[str], int], max_tokens: int, *, render_chat: ChatRenderer | None = None
    ) -> None:
        """Record too_long errors and truncation on the reports and drop the too_long records."""
        kw = {"render_chat": render_chat}
        if len(self.reports) == 1:  # a split of one file: line numbers are unique across both splits
            ordered = sorted(self.train + self.validation, key=lambda r: r.line)
            name = self.reports[0].source_name
            check = check_lengths(ordered, count_tokens, max_tokens, self.fmt, source_name=name, **kw)
            self.reports[0].record_length_check(check)
            drop_train = drop_validation = check.too_long_lines
        else:
            checks = [
                check_lengths(records, count_tokens, max_tokens, self.fmt, source_name=report.source_name, **kw)
                for records, report in zip((self.train, self.validation), self.reports, strict=True)
            ]
            for check, report in zip(checks, self.reports, strict=True):
                report.record_length_check(check)
            drop_train, drop_validation = checks[0].too_long_lines, checks[1].too_long_lines
        self.train = [r for r in self.train if r.line not in drop_train]
        self.validation = [r for r in self.validation if r.line not in drop_validation]
        kept_train, kept_validation = {r.line for r in self.train}, {r.line for r in self.validation}
        self.leakage = [(t, v) for t, v in self.leakage if t in kept_train and v in kept_validation]
        self.reports[0].leakage = self.leakage


def load_dataset(
    train_bytes: bytes,
    fmt: str,
    *,
    labels: Sequence[str] | None = None,
    validation_bytes: bytes | None = None,
    validation_fraction: float = 0.1,
    seed: int = 42,
    stratify_by: str | None = None,
    source_name: str = "train.jsonl",
    validation_source_name: str = "validation.jsonl",
) -> LoadedData:
    """Validate, split (unless validation_bytes is given: then both files are kept in file order) and find
    leakage (normalised text, `leakage.find_pairs`). Acceptance and the leakage policy are the caller's call:
    `LoadedData.acceptable(max_invalid_fraction)`, `dataset_input.load_data`."""
    records, report = parse_jsonl(train_bytes, fmt, labels=labels, source=TRAIN, source_name=source_name)
    reports = [report]
    if validation_bytes is None:
        train, validation = split_records(records, validation_fraction, seed, stratify_by)
    else:
        train = records
        validation, validation_report = parse_jsonl(
            validation_bytes, fmt, labels=labels, source=VALIDATION, source_name=validation_source_name
        )
        reports.append(validation_report)
    leakage = find_pairs(train, validation, fmt)
    report.leakage = leakage
    found_labels: list[str] = []
    if fmt == "text-label":
        found_labels = list(labels) if labels else sorted({r.fields["label"] for r in (*train, *validation)})
    blobs = (train_bytes,) if validation_bytes is None else (train_bytes, validation_bytes)
    return LoadedData(
        fmt=fmt,
        train=train,
        validation=validation,
        reports=reports,
        leakage=leakage,
        labels=found_labels,
        digest="+".join(dataset_digest(blob) for blob in blobs),
    )

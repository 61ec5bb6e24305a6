"""The trainer's dataset checks (kubetune_trainer.data): validation, reports, lengths, splits, leakage, digest."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter

import pytest

from kubetune.api.v1alpha1.dataset import DATASET_FORMATS
from kubetune_trainer import data
from kubetune_trainer.data import (
    DataError,
    DataReport,
    Record,
    check_lengths,
    dataset_digest,
    duplicates_within,
    load_dataset,
    parse_jsonl,
    split_records,
)


def jsonl(*rows: object) -> bytes:
    """One line per row: bytes and str rows are written as they are, anything else as JSON."""
    lines = []
    for row in rows:
        if isinstance(row, bytes):
            lines.append(row)
        elif isinstance(row, str):
            lines.append(row.encode())
        else:
            lines.append(json.dumps(row).encode())
    return b"\n".join(lines) + b"\n"


def words(text: str) -> int:
    return len(text.split())


PC = {"prompt": "2+2=", "completion": " 4"}
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
TEXT = {"text": "some text"}
TL = {"text": "great movie", "label": "pos"}
GOOD = {"prompt-completion": PC, "chat": CHAT, "text": TEXT, "text-label": TL}


def test_formats_match_the_api():
    assert data.FORMATS == DATASET_FORMATS


def test_importing_does_not_import_torch():
    code = "import sys, kubetune_trainer.data; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("fmt", data.FORMATS)
def test_valid_lines_become_records_of_the_format_fields_only(fmt):
    row = {**GOOD[fmt], "id": 7, "meta": {"nested": True}}
    records, report = parse_jsonl(jsonl(row, row), fmt)
    assert (report.total_lines, report.valid, report.counts, report.errors) == (2, 2, {}, [])
    assert [r.line for r in records] == [1, 2]
    assert {r.source for r in records} == {"train"}
    assert records[0].fields == GOOD[fmt]
    assert records[0].key == json.dumps(GOOD[fmt], sort_keys=True, separators=(",", ":"))
    assert records[0].extra == {"id": 7}  # only scalar extras are kept (for stratify_by)
    assert report.duplicates_within == 1


def test_chat_messages_are_normalized_to_role_and_content():
    row = {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "q", "name": "x"},
                        {"role": "assistant", "content": "a", "weight": 1}]}
    records, report = parse_jsonl(jsonl(row), "chat")
    assert report.valid == 1
    assert records[0].fields == {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "q"},
                                              {"role": "assistant", "content": "a"}]}


ERROR_CASES = [
    ("prompt-completion", b"\xff\xfe not utf-8", "invalid_utf8", "byte 0xff at offset 0 is not valid UTF-8"),
    ("prompt-completion", '{"prompt": "a\\ud800", "completion": "b"}', "invalid_utf8", '"prompt" contains an unpaired'),
    ("chat", '{"messages": [{"role": "user", "content": "\\udc00"}, {"role": "assistant", "content": "b"}]}',
     "invalid_utf8", "messages[0].content contains an unpaired"),
    ("prompt-completion", '{"prompt": "a", "completion": ', "invalid_json", "Expecting value at column 31"),
    ("text", "not json", "invalid_json", "Expecting value at column 1"),
    ("text", '["a list"]', "not_an_object", "the line is an array, expected a JSON object"),
    ("text", '"a string"', "not_an_object", "the line is a string, expected a JSON object"),
    ("text", "   ", "empty_line", "blank line"),
    ("prompt-completion", {"prompt": "a"}, "missing_field", '"completion" is missing'),
    ("prompt-completion", {"prompt": "a", "completion": None}, "missing_field", '"completion" is null'),
    ("chat", {"conversation": []}, "missing_field", '"messages" is missing'),
    ("chat", {"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}, "missing_field",
     "messages[0].content is missing"),
    ("chat", {"messages": [{"content": "a"}]}, "missing_field", "messages[0].role is missing"),
    ("text-label", {"text": "a"}, "missing_field", '"label" is missing'),
    ("prompt-completion", {"prompt": "", "completion": "b"}, "empty_field", '"prompt" is empty'),
    ("prompt-completion", {"prompt": "a", "completion": " \n"}, "empty_field", '"completion" is blank'),
    ("text", {"text": ""}, "empty_field", '"text" is empty'),
    ("chat", {"messages": []}, "empty_field", '"messages" is empty'),
    ("chat", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}, "empty_field",
     "messages[1].content is empty"),
    ("text-label", {"text": "a", "label": ""}, "empty_field", '"label" is empty'),
    ("prompt-completion", {"prompt": 3, "completion": "b"}, "wrong_type", '"prompt" is a number, expected a string'),
    ("text", {"text": ["a"]}, "wrong_type", '"text" is an array, expected a string'),
    ("text-label", {"text": "a", "label": 1}, "wrong_type", '"label" is a number, expected a string'),
    ("text-label", {"text": "a", "label": True}, "wrong_type", '"label" is a boolean, expected a string'),
    ("chat", {"messages": {"role": "user"}}, "wrong_type", '"messages" is an object, expected an array'),
    ("chat", {"messages": ["hi"]}, "wrong_type", "messages[0] is a string, expected an object"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}, "wrong_type",
     "messages[0].content is an array, expected a string"),
    ("chat", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                           {"role": "bot", "content": "c"}]}, "unknown_role",
     'messages[2].role "bot" is not one of system, user, assistant'),
    ("chat", {"messages": [{"role": "tool", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "unknown_role", 'messages[0].role "tool"'),
    ("chat", {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}]},
     "missing_assistant_turn", '"messages" has no assistant turn'),
]


@pytest.mark.parametrize(("fmt", "bad", "error_class", "message"), ERROR_CASES)
def test_every_error_class_is_reported_with_its_line(fmt, bad, error_class, message):
    records, report = parse_jsonl(jsonl(GOOD[fmt], bad, GOOD[fmt]), fmt, source_name="s3://b/train.jsonl")
    assert [r.line for r in records] == [1, 3]
    assert (report.total_lines, report.valid, report.invalid) == (3, 2, 1)
    assert report.counts == {error_class: 1}
    [error] = report.errors
    assert (error.line, error.error_class, error.source_name) == (2, error_class, "s3://b/train.jsonl")
    assert message in error.message
    assert str(error).startswith(f"s3://b/train.jsonl line 2: {error_class}: ")


def test_error_cases_cover_every_class_but_the_length_and_label_ones():
    covered = {case[2] for case in ERROR_CASES}
    assert covered == set(data.ERROR_CLASSES) - {"too_long", "unknown_label"}


def test_unknown_label_against_declared_labels():
    rows = jsonl({"text": "a", "label": "pos"}, {"text": "b", "label": "neutral"}, {"text": "c", "label": "neg"})
    records, report = parse_jsonl(rows, "text-label", labels=["pos", "neg"])
    assert [r.line for r in records] == [1, 3]
    assert report.counts == {"unknown_label": 1}
    assert str(report.errors[0]) == (
        'train.jsonl line 2: unknown_label: "label" "neutral" is not one of the declared labels: pos, neg'
    )
    # Without declared labels every label is fine.
    assert parse_jsonl(rows, "text-label")[1].valid == 3


def test_labels_only_for_text_label_and_formats_are_checked():
    with pytest.raises(ValueError, match="labels apply only to text-label"):
        parse_jsonl(jsonl(PC), "prompt-completion", labels=["a"])
    with pytest.raises(ValueError, match="unknown dataset format 'csv'"):
        parse_jsonl(jsonl(PC), "csv")


def test_counts_are_exact_while_stored_examples_are_capped():
    rows = [PC] + ["{broken"] * 25 + [{"prompt": "a"}]
    _, report = parse_jsonl(jsonl(*rows), "prompt-completion")
    assert report.counts == {"invalid_json": 25, "missing_field": 1}
    assert Counter(e.error_class for e in report.errors) == {"invalid_json": 20, "missing_field": 1}
    assert "  invalid_json: 25 (lines 2, 3, 4," in report.summary()
    assert "24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36" not in report.summary()
    assert ", 21, ... and 5 more)" in report.summary()


def test_one_error_per_line_the_first_found():
    _, report = parse_jsonl(jsonl({"prompt": 1}), "prompt-completion")
    assert report.counts == {"wrong_type": 1}


@pytest.mark.parametrize(
    "raw",
    [
        jsonl(TEXT, TEXT),  # a trailing newline
        jsonl(TEXT, TEXT)[:-1],  # none
        jsonl(TEXT, TEXT) + b"\n  \n\r\n",  # trailing blank lines
        jsonl(TEXT, TEXT).replace(b"\n", b"\r\n"),  # CRLF
        b"\xef\xbb\xbf" + jsonl(TEXT, TEXT),  # a UTF-8 byte order mark
    ],
)
def test_line_endings_trailing_blank_lines_and_bom_are_fine(raw):
    _, report = parse_jsonl(raw, "text")
    assert (report.total_lines, report.valid, report.counts) == (2, 2, {})
    assert report.acceptable(0)


def test_a_blank_line_inside_the_file_is_an_error():
    _, report = parse_jsonl(jsonl(TEXT, "", TEXT), "text")
    assert report.counts == {"empty_line": 1}
    assert report.errors[0].line == 2


def test_json_strings_with_unicode_line_separators_stay_one_line():
    raw = json.dumps({"text": "a\u2028b\u0085c"}, ensure_ascii=False).encode() + b"\n"
    records, report = parse_jsonl(raw, "text")
    assert report.valid == 1
    assert records[0].fields["text"] == "a\u2028b\u0085c"


def test_acceptance_with_and_without_tolerance():
    _, report = parse_jsonl(jsonl(*[TEXT] * 9, "{oops"), "text")
    assert report.invalid_fraction == pytest.approx(0.1)
    assert not report.acceptable(0)
    assert report.acceptable(0.5)
    assert report.acceptable(0.1)  # the bound is inclusive
    assert not report.acceptable(0.09)

    _, all_bad = parse_jsonl(jsonl("{oops", "{oops"), "text")
    assert not all_bad.acceptable(0.5)
    assert not all_bad.acceptable(1.0)  # nothing valid to train on

    _, empty = parse_jsonl(b"", "text")
    assert (empty.total_lines, empty.invalid_fraction) == (0, 0.0)
    assert not empty.acceptable(1.0)
    assert empty.summary() == "dataset train.jsonl: empty (no examples)"


def test_summary():
    rows = [TEXT] * 996 + ["{x"]
    rows[4] = rows[8] = "{x"
    rows[11] = {"text": 5}
    _, report = parse_jsonl(jsonl(*rows, TEXT, TEXT, TEXT), "text", source_name="s3://b/k")
    assert report.summary() == (
        "dataset s3://b/k: 1000 lines, 996 valid, 4 invalid (0.4%)\n"
        "  invalid_json: 3 (lines 5, 9, 997)\n"
        "    e.g. line 5: Expecting property name enclosed in double quotes at column 2\n"
        "  wrong_type: 1 (line 12)\n"
        '    e.g. line 12: "text" is a number, expected a string\n'
        "  duplicates: 995 examples repeat an earlier example exactly"
    )


# --- lengths ---------------------------------------------------------------------------------------------------


def test_check_lengths_prompt_completion():
    rows = [
        {"prompt": "a b c d e", "completion": "f"},  # the prompt fills max_tokens: nothing left to train on
        {"prompt": "a b c d", "completion": "e f g"},  # truncated
        {"prompt": "a b", "completion": "c d e"},  # exactly max_tokens: kept whole
        {"prompt": "a b c d e f", "completion": "g"},  # too long
    ]
    records, _ = parse_jsonl(jsonl(*rows), "prompt-completion")
    check = check_lengths(records, words, 5, "prompt-completion", source_name="t.jsonl")
    assert [(e.line, e.error_class) for e in check.errors] == [(1, "too_long"), (4, "too_long")]
    assert str(check.errors[0]).startswith("t.jsonl line 1: too_long: the prompt take 5 tokens, at or beyond")
    assert (check.truncated, check.truncated_lines) == (1, [2])
    assert check.too_long_lines == {1, 4}


def test_check_lengths_counts_the_concatenation_not_the_sum():
    # A tokenizer that merges across the prompt/completion boundary: "ab" is one token.
    def merging(text: str) -> int:
        return len(text.replace("ab", "X"))

    records, _ = parse_jsonl(jsonl({"prompt": "xa", "completion": "by"}), "prompt-completion")
    assert check_lengths(records, merging, 3, "prompt-completion").truncated == 0  # 3 tokens, not 2 + 2


def test_check_lengths_chat_uses_the_turns_before_the_first_assistant_turn():
    def chat(*turns):
        return {"messages": [{"role": role, "content": content} for role, content in turns]}

    rows = [
        # "system: s1 s2\nuser: u1 u2" is 6 whitespace tokens: the assistant turn starts at 6 >= 6
        chat(("system", "s1 s2"), ("user", "u1 u2"), ("assistant", "a")),
        # 5 before the assistant turn, 7 in all: truncated, but the assistant turn is partly kept
        chat(("system", "s1"), ("user", "u1 u2"), ("assistant", "a")),
        # an assistant turn first: never too_long; a later long user turn only truncates
        chat(("assistant", "a"), ("user", "u " * 20)),
        chat(("user", "u"), ("assistant", "a")),
    ]
    records, _ = parse_jsonl(jsonl(*rows), "chat")
    check = check_lengths(records, words, 6, "chat")
    assert [e.line for e in check.errors] == [1]
    assert "the turns before the first assistant turn take 6 tokens" in check.errors[0].message
    assert (check.truncated, check.truncated_lines) == (2, [2, 3])

    # The trainer passes its chat template for exact counts.
    rendered = []
    check_lengths(records[:1], len, 1000, "chat", render_chat=lambda ms: rendered.append(ms) or "")
    assert rendered == [rows[0]["messages"][:2], rows[0]["messages"]]


@pytest.mark.parametrize("fmt", ["text", "text-label"])
def test_check_lengths_text_only_truncates(fmt):
    records, _ = parse_jsonl(jsonl({**GOOD[fmt], "text": "w " * 50}, GOOD[fmt]), fmt)
    check = check_lengths(records, words, 10, fmt)
    assert (check.errors, check.truncated, check.truncated_lines) == ([], 1, [1])


def test_check_lengths_rejects_a_useless_limit():
    with pytest.raises(ValueError, match="max_tokens"):
        check_lengths([], words, 0, "text")


def test_length_check_on_loaded_data_drops_too_long_records_and_reports():
    rows = [{"prompt": f"p{i}", "completion": "c"} for i in range(18)]
    rows[3] = {"prompt": "long " * 10, "completion": "c"}
    rows[10] = {"prompt": "p", "completion": "long " * 10}
    loaded = load_dataset(jsonl(*rows), "prompt-completion", validation_fraction=0.2, source_name="d")
    assert loaded.acceptable(0)
    loaded.apply_length_check(words, 8)
    [report] = loaded.reports
    assert (report.valid, report.counts, report.max_tokens) == (17, {"too_long": 1}, 8)
    assert 4 not in {r.line for r in loaded.train + loaded.validation}
    assert len(loaded.train) + len(loaded.validation) == 17
    assert (report.truncated, report.truncated_lines) == (1, [11])
    assert "  too_long: 1 (line 4)\n" in report.summary()
    assert "  truncated: 1 examples longer than 8 tokens (line 11)" in report.summary()
    assert not loaded.acceptable(0)
    assert loaded.acceptable(0.1)
    with pytest.raises(RuntimeError, match="already recorded"):
        loaded.apply_length_check(words, 8)


def test_length_check_with_a_validation_file_reports_per_file():
    train = jsonl({"prompt": "a", "completion": "b"}, {"prompt": "x " * 9, "completion": "b"})
    validation = jsonl({"prompt": "x " * 9, "completion": "b"}, {"prompt": "c", "completion": "d"})
    loaded = load_dataset(train, "prompt-completion", validation_bytes=validation,
                          source_name="t.jsonl", validation_source_name="v.jsonl")
    assert loaded.leakage == [(2, 1)]
    loaded.apply_length_check(words, 5)  # both lines of the pair are too long: the pair is gone with them
    assert [str(e).split(":")[0] for r in loaded.reports for e in r.errors] == ["t.jsonl line 2", "v.jsonl line 1"]
    assert [r.line for r in loaded.train] == [1]
    assert [r.line for r in loaded.validation] == [2]
    assert loaded.leakage == loaded.reports[0].leakage == []


# --- splits ----------------------------------------------------------------------------------------------------


def records_of(labels: list[str]) -> list[Record]:
    return [Record(i, "train", {"text": f"t{i}", "label": label}) for i, label in enumerate(labels, start=1)]


def lines(records: list[Record]) -> list[int]:
    return [r.line for r in records]


def test_split_sizes_sources_and_no_loss():
    records = records_of(["a"] * 100)
    train, validation = split_records(records, 0.1, seed=1)
    assert (len(train), len(validation)) == (90, 10)
    assert sorted(lines(train) + lines(validation)) == list(range(1, 101))
    assert {r.source for r in train} == {"train"}
    assert {r.source for r in validation} == {"validation"}


def test_split_fraction_zero_and_tiny_data():
    records = records_of(["a"] * 5)
    train, validation = split_records(records, 0, seed=1)
    assert (sorted(lines(train)), validation) == ([1, 2, 3, 4, 5], [])
    assert split_records(records[:1], 0.5, seed=1)[1] == []  # one example: training keeps it
    assert len(split_records(records[:3], 0.01, seed=1)[1]) == 1  # a validation set was asked for
    assert len(split_records(records[:2], 0.5, seed=1)[0]) == 1  # training keeps at least one
    with pytest.raises(ValueError, match="validation_fraction"):
        split_records(records, 1.0, seed=1)


def test_split_is_deterministic_per_seed_and_differs_across_seeds():
    records = records_of(["a"] * 50 + ["b"] * 50)
    for stratify_by in (None, "label"):
        first = split_records(records, 0.2, seed=7, stratify_by=stratify_by)
        again = split_records(records, 0.2, seed=7, stratify_by=stratify_by)
        other = split_records(records, 0.2, seed=8, stratify_by=stratify_by)
        assert first == again
        assert set(lines(first[1])) != set(lines(other[1]))


@pytest.mark.parametrize("seed", range(20))
def test_stratified_split_puts_a_rare_class_in_both_splits(seed):
    records = records_of(["common"] * 97 + ["rare"] * 2 + ["single"])
    train, validation = split_records(records, 0.1, seed=seed, stratify_by="label")
    by_split = {name: Counter(r.fields["label"] for r in split) for name, split in
                (("train", train), ("validation", validation))}
    assert by_split["validation"] == {"common": 9, "rare": 1}
    assert by_split["train"] == {"common": 88, "rare": 1, "single": 1}


def test_stratified_split_is_proportional_and_close_to_the_fraction():
    records = records_of(["a"] * 100 + ["b"] * 60 + ["c"] * 40 + ["d"] * 3 + ["e"] * 2)
    _, validation = split_records(records, 0.1, seed=3, stratify_by="label")
    # 20.5 rounds to 21; the one-per-class minimum of d and e overshoots by one, taken back from the largest class
    assert len(validation) == 21
    assert Counter(r.fields["label"] for r in validation) == {"a": 9, "b": 6, "c": 4, "d": 1, "e": 1}


def test_stratified_split_minimums_are_taken_back_from_the_largest_classes():
    records = records_of(["big"] * 20 + [f"r{i}" for i in range(5) for _ in range(2)])
    _, validation = split_records(records, 0.2, seed=0, stratify_by="label")
    counts = Counter(r.fields["label"] for r in validation)
    assert len(validation) == 6  # round(0.2 * 30)
    assert counts == {"big": 1, **{f"r{i}": 1 for i in range(5)}}


def test_stratify_by_an_extra_key_and_a_missing_stratum():
    records = [Record(i, "train", {"text": f"t{i}"}, extra={"lang": "de"} if i <= 2 else {}) for i in range(1, 21)]
    train, validation = split_records(records, 0.1, seed=5, stratify_by="lang")
    assert sum(r.extra.get("lang") == "de" for r in validation) == 1
    assert sum(r.extra.get("lang") == "de" for r in train) == 1
    assert len(validation) == 2


# --- leakage and digest ----------------------------------------------------------------------------------------


def test_duplicates_within():
    train = [Record(1, "train", {"text": "a"}), Record(2, "train", {"text": "b"}), Record(5, "train", {"text": "a"})]
    validation = [Record(1, "validation", {"text": "c"}), Record(2, "validation", {"text": "a"})]
    assert duplicates_within(train) == 1
    assert duplicates_within(validation) == 0


def test_duplicate_keys_ignore_extra_keys_and_key_order():
    rows = jsonl({"prompt": "a", "completion": "b", "id": 1}, '{"completion": "b", "prompt": "a", "id": 2}')
    records, report = parse_jsonl(rows, "prompt-completion")
    assert records[0].key == records[1].key
    assert report.duplicates_within == 1


def test_load_dataset_with_a_validation_file_reports_leakage_per_file():
    train = jsonl(TL, {"text": "x", "label": "neg"}, {"text": "y", "label": "pos"})
    validation = jsonl({"text": "y", "label": "pos"}, "{bad", {"text": "z", "label": "mid"}, TL)
    loaded = load_dataset(train, "text-label", validation_bytes=validation,
                          source_name="s3://b/train.jsonl", validation_source_name="s3://b/val.jsonl")
    assert lines(loaded.train) == [1, 2, 3]  # no split, file order
    assert lines(loaded.validation) == [1, 3, 4]
    assert loaded.leakage == [(3, 1), (1, 4)]
    assert [r.source_name for r in loaded.reports] == ["s3://b/train.jsonl", "s3://b/val.jsonl"]
    assert str(loaded.reports[1].errors[0]).startswith("s3://b/val.jsonl line 2: invalid_json")
    assert loaded.labels == ["mid", "neg", "pos"]
    assert "leakage: 2 validation examples repeat training examples, case, whitespace and punctuation ignored " \
           "(train line 3 = validation line 1, train line 1 = validation line 4)" in loaded.summary()
    assert loaded.digest == f"{dataset_digest(train)}+{dataset_digest(validation)}"
    assert not loaded.acceptable(0)
    assert loaded.acceptable(0.3)


def test_load_dataset_split_with_labels():
    rows = [{"text": f"t{i}", "label": "pos" if i % 10 else "neg"} for i in range(40)] + [TL, TL]
    loaded = load_dataset(jsonl(*rows), "text-label", labels=["pos", "neg"], stratify_by="label", seed=1)
    assert loaded.labels == ["pos", "neg"]  # declared: id order kept
    assert Counter(r.fields["label"] for r in loaded.validation) == {"pos": 3, "neg": 1}
    assert len(loaded.train) + len(loaded.validation) == 42
    assert len(loaded.reports) == 1
    assert loaded.reports[0].duplicates_within == 1
    assert loaded.leakage == loaded.reports[0].leakage
    assert loaded.acceptable(0)
    assert load_dataset(jsonl(PC), "prompt-completion").labels == []


def test_dataset_digest():
    assert dataset_digest(b"abc") == "sha256:" + hashlib.sha256(b"abc").hexdigest()
    assert dataset_digest(b"a", b"bc") == dataset_digest(b"abc")  # over the raw bytes, in order
    assert dataset_digest(b"a", b"b") != dataset_digest(b"b", b"a")
    assert dataset_digest() == "sha256:" + hashlib.sha256(b"").hexdigest()


def test_data_error_without_a_file_name():
    assert str(DataError(7, "missing_field", '"completion" is missing')) == (
        'line 7: missing_field: "completion" is missing'
    )


def test_report_counts_never_drop_below_what_was_seen():
    report = DataReport("x", total_lines=30, valid=0, max_examples_per_class=2)
    for line in range(1, 31):
        report.add_error(DataError(line, "invalid_json", "m"))
    assert report.counts == {"invalid_json": 30}
    assert len(report.errors) == 2

"""kubetune.api.documents: scalars resolved as go-yaml v2 resolves them (goyaml.v2/resolve.go in
kubernetes-sigs/yaml) and converted as sigs.k8s.io/yaml converts them to JSON; the loader's limits."""

from __future__ import annotations

import pytest

from kubetune.api import documents


def _value(text: str):
    return documents.load(f"v: {text}\n".encode(), "t.yaml")[0].value["v"]


@pytest.mark.parametrize(("written", "read"), [
    ("2e-4", 0.0002), ("1E3", 1000), ("-1.5e+2", -150), ("+.5", 0.5), (".5", 0.5), ("1.", 1), ("2.0", 2),
    ("1_000", 1000), ("0x1F", 31), ("010", 8), ("0o17", 15), ("0b101", 5), ("-0b11", -3), ("08", 8), ("+1", 1),
    ("1e400", "1e400"), ("1:30", "1:30"), ("0.1.2", "0.1.2"), ("2024-01-01", "2024-01-01"),
    ("2001-12-14t21:59:43.10-05:00", "2001-12-14t21:59:43.10-05:00"), ("y", True), ("NO", False), ("on", True),
    ("~", None), ("null", None), ("'3'", "3"), ('"true"', "true"), ("!!str 12", "12"), ("!!float 3", 3),
    ("<<", "<<"), ("!custom text", "text"), ("99999999999999999999", 100000000000000000000),
])
def test_scalars_read_as_kubectl_reads_them(written, read):
    value = _value(written)
    assert value == read and type(value) is type(read), (written, value)


@pytest.mark.parametrize("written", [".nan", ".NaN", ".inf", "+.INF", "-.inf", "!!float .nan"])
def test_values_json_cannot_carry_are_refused_with_their_path(written):
    with pytest.raises(documents.InputError, match=r"t\.yaml:1: document 1: v: .* is not a value JSON can carry"):
        _value(written)


def test_keys_become_strings_as_in_sigs_k8s_yaml():
    value = documents.load(b"1: a\non: b\n1.5: c\n", "t.yaml")[0].value
    assert value == {"1": "a", "true": "b", "1.5": "c"}


def test_merge_keys_and_duplicates():
    value = documents.load(b"a: &d {p: 1, q: 2}\nb:\n  <<: *d\n  q: 3\n", "t.yaml")[0].value
    assert value["b"] == {"p": 1, "q": 3}  # the mapping's own key wins over the merged one
    with pytest.raises(documents.InputError, match=r't\.yaml:3: document 1: b\.q: mapping key "q" already defined '
                                                   r"at line 2"):
        documents.load(b"b:\n  q: 1\n  q: 2\n", "t.yaml")


def test_aliases_within_go_yamls_ratio_are_expanded_and_beyond_it_refused():
    fine = documents.load(b"a: &a [1, 2]\nb: *a\nc: *a\n", "t.yaml")[0].value
    assert fine["c"] == [1, 2]
    laughs = b"a: &a [x, x, x, x, x, x, x, x, x, x]\n" + b"".join(
        b"%c: &%c [%s]\n" % (98 + i, 98 + i, b", ".join([b"*%c" % (97 + i)] * 10)) for i in range(6))
    with pytest.raises(documents.InputError, match="excessive aliasing"):
        documents.load(laughs, "t.yaml")


def test_depth_and_size_limits():
    documents.load(b"a: " + b"[" * 99 + b"]" * 99 + b"\n", "t.yaml")
    with pytest.raises(documents.InputError, match="nested more than 100 levels deep"):
        documents.load(b"a: " + b"[" * 101 + b"]" * 101 + b"\n", "t.yaml")
    big = b"a: " + b"x" * (documents.MAX_REQUEST_BYTES + 1) + b"\n---\nb: 1\n"
    with pytest.raises(documents.InputError, match=r"t\.yaml:1: document 1: more than 3145728 bytes"):
        documents.load(big, "t.yaml")


def test_documents_are_numbered_in_the_file_and_lists_expanded():
    loaded = documents.load(b"---\n---\nkind: List\nitems:\n- {kind: A}\n- {kind: B}\n---\nkind: C\n", "t.yaml")
    assert [(doc.where, doc.value["kind"]) for doc in loaded] == [
        ("document 2, items[0]", "A"), ("document 2, items[1]", "B"), ("document 3", "C")]


def test_shape_errors_and_generate_name():
    assert documents.shape_errors({"apiVersion": "v", "kind": 3, "metadata": None, "spec": None}) == [
        ("kind", "Invalid value: 3: must be a string"),
        ("metadata.name", "Required value: name or generateName is required"),
        ("spec", "Invalid value: null: must be an object")]
    created, warnings = documents.as_created({"metadata": {"generateName": "g" * 70}})
    assert created["metadata"]["name"] == "g" * 58 + "xxxxx" and warnings[0][0] == "metadata.generateName"

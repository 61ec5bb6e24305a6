"""Random bytes and random YAML structures through `kubetune validate` and the admission path
(`validation.validate` on whatever the loader returns): an exit code of 0, 1 or 2, never a traceback,
Python internals or the last-resort guard's message, and bounded time and memory per example.
"""

from __future__ import annotations

import copy
import signal
import tracemalloc
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubetune.api import documents
from kubetune.api import v1alpha1 as api
from kubetune.api.schema import iter_fields
from kubetune.api.validation import root_schema, validate
from kubetune_operator import cli
from tests.conftest import REPO_ROOT
from tests.unit.test_bad_input_corpus import UNREADABLE

SECONDS, PEAK_BYTES = 5, 64 * 2**20  # per example
SETTINGS = settings(max_examples=120, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FIELD_NAMES = sorted({part.removesuffix("[]") for kind in api.KINDS for path, _ in iter_fields(root_schema(kind))
                      for part in path.split(".") if part})
EXAMPLES = [doc for path in sorted((REPO_ROOT / "examples").glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if isinstance(doc, dict) and doc.get("kind") in api.KINDS]

# text the user wrote is echoed as written: none that looks like Python's own (None, a \n escape)
user_text = st.text(st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="\\"), max_size=30).filter(
    lambda text: not UNREADABLE.search(text))
keys = st.one_of(st.sampled_from(FIELD_NAMES), user_text.map(lambda text: text[:12]))
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True),
    user_text, st.dates().map(str), st.sampled_from(["2e-4", "1E3", ".nan", "-.inf", "yes", "0x1F", "~",
                                                                "<<", "08", "1_000", "", "s3:///key", "file:///"]))
structures = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                           st.dictionaries(keys, inner, max_size=6)), max_leaves=40)
objects = st.fixed_dictionaries(
    {"apiVersion": st.one_of(st.just(api.API_VERSION), structures),
     "kind": st.sampled_from([*sorted(api.KINDS), "List"]),
     "metadata": st.one_of(st.fixed_dictionaries({"name": st.text(max_size=70).filter(
         lambda text: not UNREADABLE.search(text))}), structures),  # a name is echoed as written too
     "spec": st.one_of(st.dictionaries(st.sampled_from(FIELD_NAMES), structures, max_size=8), structures)})
yamlish = st.lists(st.sampled_from([*"ab:-[]{},&*!|>'\"#%@` \n\t.0123456789e", "---\n", "<<: ", "\ufeff", "? ",
                                     "!!int ", "&x ", "*x", "\n  "]), max_size=120).map("".join)


@st.composite
def mutated_examples(draw) -> dict:
    """A shipped example with one field, at any depth, replaced by a random structure."""
    doc = copy.deepcopy(draw(st.sampled_from(EXAMPLES)))
    paths = []
    stack = [(doc, [])]
    while stack:
        value, path = stack.pop()
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, child in items:
            paths.append([*path, key])
            stack.append((child, [*path, key]))
    path = draw(st.sampled_from(paths))
    target = doc
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = draw(structures)
    return doc


class TooSlow(Exception):
    pass


def _bounded(run):
    """Run `run()` under a wall-clock alarm and tracemalloc; its result."""
    def alarm(signum, frame):
        raise TooSlow(f"more than {SECONDS} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, SECONDS)
    tracemalloc.start()
    try:
        result = run()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert peak < PEAK_BYTES, f"peak memory {peak} bytes"
    return result


def _check_cli_and_admission(raw: bytes, path: Path, capsys) -> None:
    path.write_bytes(raw)
    code = _bounded(lambda: cli.main(["validate", "-f", str(path)]))
    out, err = capsys.readouterr()
    assert code in (0, 1, 2), code
    assert not UNREADABLE.search(out + err), out + err
    assert "unexpected problem" not in err, err  # the last-resort guard: a crash kubetune has no message for
    try:
        loaded = documents.load(raw, str(path))
    except documents.InputError:
        return
    for doc in loaded:
        result = _bounded(lambda doc=doc: validate(doc.value))
        for error in result.errors:
            assert not UNREADABLE.search(str(error)), error


@SETTINGS
@given(raw=st.binary(max_size=400))
def test_random_bytes(raw, tmp_path, capsys):
    _check_cli_and_admission(raw, tmp_path / "input.yaml", capsys)


@SETTINGS
@given(text=yamlish)
def test_random_yaml_like_text(text, tmp_path, capsys):
    _check_cli_and_admission(text.encode("utf-8"), tmp_path / "input.yaml", capsys)


@SETTINGS
@given(document=st.one_of(objects, mutated_examples(), structures))
def test_random_structures(document, tmp_path, capsys):
    try:
        raw = yaml.safe_dump(document, allow_unicode=True).encode("utf-8", "surrogatepass")
    except yaml.YAMLError:
        pytest.skip("not representable as YAML")
    _check_cli_and_admission(raw, tmp_path / "input.yaml", capsys)

"""The input corpus (tests/corpus/inputs): raw files and `--set` items, each run through `cli.main` as a user
runs it, with the exit code, the lines and the cluster's verdict its sidecar states (format:
tests/corpus/README.md), never a traceback, in bounded time and memory.
"""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest
import yaml

from kubetune_operator import cli
from tests.unit.test_bad_input_corpus import UNREADABLE

INPUTS = Path(__file__).resolve().parents[1] / "corpus" / "inputs"
CASES = sorted(INPUTS.glob("*.expect.yaml"))
VERDICTS = ("refused", "accepted", "unparseable by kubectl")
SECONDS, PEAK_BYTES = 10.0, 96 * 2**20  # per case: a 4 MiB file, a billion laughs and 20000 brackets included


def _expectation(case: Path) -> dict:
    return yaml.safe_load(case.read_text())


def _input_path(expect: dict, tmp_path: Path) -> str:
    if expect.get("path") == "missing":
        return str(tmp_path / "missing.yaml")
    if expect.get("path") == "directory":
        return str(tmp_path)
    if "generate" in expect:  # inputs too big to keep in git: built from the sidecar
        spec = expect["generate"]
        text = spec["prefix"] + spec["repeat"] * spec["count"] + spec.get("close", "") * spec["count"]
        path = tmp_path / "generated.yaml"
        path.write_text(text + spec.get("suffix", ""))
        return str(path)
    return str(INPUTS / expect["input"])


def test_corpus_covers_every_class():
    names = [case.name.removesuffix(".expect.yaml") for case in CASES]
    assert len(CASES) >= 25
    for prefix in ("encoding-", "alias-", "nesting-", "size-", "documents-", "metadata-", "spec-", "kind-",
                   "duplicate-key-", "number-", "string-", "set-", "file-"):
        assert any(name.startswith(prefix) for name in names), prefix
    referenced = {_expectation(case).get("input") for case in CASES}
    kept = {path.name for path in INPUTS.iterdir() if not path.name.endswith(".expect.yaml")}
    assert kept - {".gitattributes"} <= referenced, f"input files no sidecar names: {kept - referenced}"


@pytest.mark.parametrize("case", CASES, ids=[c.name.removesuffix(".expect.yaml") for c in CASES])
def test_input_is_handled_as_its_sidecar_says(case, tmp_path, capsys):
    expect = _expectation(case)
    assert expect["api_server"] in VERDICTS, expect["api_server"]
    assert expect.get("why"), f"{case.name}: say in `why` what the input is"
    command = expect.get("command", ["validate"])
    argv = [command[0], "-f", _input_path(expect, tmp_path), *command[1:]]
    if command[0] == "local":
        argv += ["--run-dir", str(tmp_path / "runs")]

    tracemalloc.start()
    started = time.monotonic()
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse refusing a flag's value
        code = exc.code
    elapsed = time.monotonic() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    out, err = capsys.readouterr()
    assert code == expect["exit"], f"{case.name}: exit {code}\nstdout: {out}\nstderr: {err}"
    for text in expect.get("stderr", []):
        assert text in err, f"{case.name}: {text!r} not in stderr:\n{err}"
    for text in expect.get("stdout", []):
        assert text in out, f"{case.name}: {text!r} not in stdout:\n{out}"
    assert not UNREADABLE.search(out + err), f"{case.name}: Python internals shown:\n{out}{err}"
    assert elapsed < SECONDS and peak < PEAK_BYTES, (case.name, elapsed, peak)
    if expect["api_server"] != "accepted":
        assert code != 0, f"{case.name}: the cluster would not take it, so kubetune must not either"
    if command[0] == "validate" and err.startswith("error: "):  # the loader's refusal, not an object's errors
        assert len(err.strip().splitlines()) == 1, f"{case.name}: unreadable input is one line:\n{err}"

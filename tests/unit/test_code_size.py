"""Sizes that keep the code readable: modules, functions and module docstrings (ast-based).

No module over 600 lines, no function over 80 lines (decorators included), no module docstring over 8
lines (the prose belongs in docs/). Every violation is listed, with its file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO_ROOT

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
MAX_DOCSTRING_LINES = 8
ROOTS = ("operator", "trainer_image", "testing", "bench", "tests")
# Folders holding generated or third-party code, not written by hand (none today).
SKIPPED_PARTS = {".venv", "__pycache__", "build", "dist", "generated"}


def python_files() -> list[Path]:
    files = []
    for root in ROOTS:
        for path in sorted((REPO_ROOT / root).rglob("*.py")):
            if not SKIPPED_PARTS.intersection(path.relative_to(REPO_ROOT).parts):
                files.append(path)
    return files


def violations(path: Path) -> list[str]:
    """Every size violation of one file, as `file:line: what`."""
    rel = path.relative_to(REPO_ROOT)
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(rel))
    found = []
    lines = len(source.splitlines())
    if lines > MAX_MODULE_LINES:
        found.append(f"{rel}:1: module of {lines} lines (at most {MAX_MODULE_LINES})")
    docstring = ast.get_docstring(tree, clean=True)
    if docstring and len(docstring.strip().splitlines()) > MAX_DOCSTRING_LINES:
        found.append(f"{rel}:1: module docstring of {len(docstring.strip().splitlines())} lines "
                     f"(at most {MAX_DOCSTRING_LINES}; move the prose to docs/)")
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            length = node.end_lineno - start + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{rel}:{node.lineno}: function {node.name} of {length} lines "
                             f"(at most {MAX_FUNCTION_LINES})")
    return found


def test_the_checker_sees_the_repository():
    assert len(python_files()) > 100


def test_the_checker_finds_each_kind_of_violation(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.REPO_ROOT", tmp_path)
    body = "".join(f"    x{n} = {n}\n" for n in range(MAX_FUNCTION_LINES))
    docstring = '"""' + "\n".join(["line"] * (MAX_DOCSTRING_LINES + 1)) + '"""\n'
    filler = "\n" * MAX_MODULE_LINES
    (tmp_path / "big.py").write_text(docstring + "@staticmethod\ndef long():\n" + body + filler)
    found = violations(tmp_path / "big.py")
    assert [v.split(": ", 1)[1].split(" of ")[0] for v in found] == [
        "module", "module docstring", "function long"]


def test_no_module_function_or_docstring_is_too_long():
    found = [violation for path in python_files() for violation in violations(path)]
    assert not found, f"{len(found)} size violation(s):\n" + "\n".join(found)

#!/usr/bin/env python3
"""Commit messages: a subject of at most 72 characters, and a body saying why for any real change.

`check-commits.py` checks every non-merge commit after BASELINE up to HEAD (what `make lint` and CI run);
`check-commits.py --message-file FILE` checks a message about to be committed (the commit-msg hook).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

# main's HEAD when the rule was introduced (issue 14). History before it was written without the rule
# (subjects of ~180 characters, no bodies) and is not rewritten: only commits after it are checked.
BASELINE = "f6510251b23b6e2099e680cc48ed83102a0a0ab0"
MAX_SUBJECT = 72
# A change of at most this many lines (added + removed) may go without a body: a typo, a version bump.
SMALL_CHANGE_LINES = 10
SCISSORS = "------------------------ >8 ------------------------"


def _git(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def parse_message(text: str) -> tuple[str, str]:
    """(subject, body) of a message as git would record it: comments and a verbose diff dropped."""
    lines = []
    for line in text.splitlines():
        if line.startswith("#") and SCISSORS in line:
            break
        if not line.startswith("#"):
            lines.append(line.rstrip())
    while lines and not lines[0].strip():
        lines.pop(0)
    subject = lines[0].strip() if lines else ""
    body = "\n".join(lines[1:]).strip()
    return subject, body


def changed_lines(numstat: str) -> int:
    """Added + removed lines of `git diff --numstat` output (a binary file counts as one line)."""
    total = 0
    for row in numstat.splitlines():
        parts = row.split("\t")
        if len(parts) >= 3:
            total += sum(int(n) if n.isdigit() else 1 for n in parts[:2])
    return total


def problems(subject: str, body: str, lines_changed: int) -> list[str]:
    """What is wrong with one message (empty when nothing is)."""
    found = []
    if not subject:
        found.append("empty subject")
    elif len(subject) > MAX_SUBJECT:
        found.append(f"subject is {len(subject)} characters (at most {MAX_SUBJECT}): say what in the subject, "
                     "why in the body")
    if lines_changed > SMALL_CHANGE_LINES and not body:
        found.append(f"no body for a change of {lines_changed} lines: add a blank line and a body saying why")
    return found


def check_range(base: str, head: str, cwd: Path | None = None) -> int:
    try:
        _git("cat-file", "-e", f"{base}^{{commit}}", cwd=cwd)
    except subprocess.CalledProcessError:
        print(f"check-commits: baseline {base[:12]} is not in this clone (shallow or foreign): skipped")
        return 0
    shas = _git("rev-list", "--no-merges", "--reverse", f"{base}..{head}", cwd=cwd).split()
    failures = 0
    for sha in shas:
        subject, body = parse_message(_git("log", "-1", "--format=%B", sha, cwd=cwd))
        lines = changed_lines(_git("show", "--numstat", "--format=", sha, cwd=cwd))
        for problem in problems(subject, body, lines):
            failures += 1
            print(f"{sha[:12]} {subject[:60]!r}: {problem}")
    print(f"check-commits: {len(shas)} commit(s) after {base[:12]} checked, {failures} problem(s)")
    return 1 if failures else 0


def check_message_file(path: Path) -> int:
    subject, body = parse_message(path.read_text(encoding="utf-8", errors="replace"))
    # The index being committed (git sets GIT_INDEX_FILE for `commit -a` and `commit FILES`).
    lines = changed_lines(_git("diff", "--cached", "--numstat"))
    found = problems(subject, body, lines)
    for problem in found:
        print(f"commit-msg: {problem}", file=sys.stderr)
    return 1 if found else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--message-file", type=Path, help="check this message (the commit-msg hook)")
    parser.add_argument("--base", default=BASELINE, help="check the commits after this one")
    parser.add_argument("--head", default="HEAD")
    args = parser.parse_args(argv)
    if args.message_file:
        return check_message_file(args.message_file)
    return check_range(args.base, args.head)


if __name__ == "__main__":
    sys.exit(main())

"""scripts/check-commits.py and the scripts/commit-msg hook, on a throwaway repository."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "check-commits.py"
HOOK = REPO_ROOT / "scripts" / "commit-msg"
GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid", "GIT_CONFIG_GLOBAL": os.devnull}


def git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=repo, env=GIT_ENV, capture_output=True, text=True, check=check)


def commit(repo: Path, message: str, lines: int, check: bool = True) -> subprocess.CompletedProcess:
    path = repo / "file.txt"
    previous = path.read_text() if path.exists() else ""
    path.write_text(previous + "".join(f"line {len(previous)} {n}\n" for n in range(lines)))
    git(repo, "add", "file.txt")
    return subprocess.run(["git", "commit", "-q", "-F", "-"], cwd=repo, env=GIT_ENV, input=message,
                          capture_output=True, text=True, check=check)


def check(repo: Path, base: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--base", base], cwd=repo, capture_output=True,
                          text=True, check=False)


@pytest.fixture
def repo(tmp_path) -> Path:
    git(tmp_path, "init", "-q", "-b", "main")
    commit(tmp_path, "x" * 200 + "\n", lines=50)  # history before the baseline is exempt
    return tmp_path


def test_good_messages_pass(repo):
    base = git(repo, "rev-parse", "HEAD").stdout.strip()
    commit(repo, "Add the thing\n\nBecause the other thing needed it.\n", lines=40)
    commit(repo, "Fix a typo\n", lines=2)  # small: no body needed
    result = check(repo, base)
    assert result.returncode == 0, result.stdout
    assert "2 commit(s)" in result.stdout


def test_long_subject_fails(repo):
    base = git(repo, "rev-parse", "HEAD").stdout.strip()
    commit(repo, "y" * 73 + "\n\nWhy.\n", lines=2)
    result = check(repo, base)
    assert result.returncode == 1
    assert "subject is 73 characters" in result.stdout


def test_change_without_body_fails(repo):
    base = git(repo, "rev-parse", "HEAD").stdout.strip()
    commit(repo, "Change many lines\n", lines=30)
    result = check(repo, base)
    assert result.returncode == 1
    assert "no body for a change of 30 lines" in result.stdout


def test_merge_commits_are_not_checked(repo):
    base = git(repo, "rev-parse", "HEAD").stdout.strip()
    git(repo, "checkout", "-q", "-b", "side")
    commit(repo, "Side change\n\nWhy it was needed.\n", lines=20)
    git(repo, "checkout", "-q", "main")
    (repo / "other.txt").write_text("other\n")
    git(repo, "add", "other.txt")
    git(repo, "commit", "-q", "-m", "Other change")
    git(repo, "merge", "-q", "--no-ff", "--no-edit", "side")
    result = check(repo, base)
    assert result.returncode == 0, result.stdout
    assert "2 commit(s)" in result.stdout


def test_a_clone_without_the_baseline_is_skipped(repo):
    result = check(repo, "0" * 40)
    assert result.returncode == 0
    assert "skipped" in result.stdout


def test_the_commit_msg_hook_refuses_and_accepts(repo):
    (repo / ".git" / "hooks" / "commit-msg").unlink(missing_ok=True)
    (repo / ".git" / "hooks").mkdir(exist_ok=True)
    (repo / ".git" / "hooks" / "commit-msg").symlink_to(HOOK)
    refused = commit(repo, "z" * 80 + "\n\nWhy.\n", lines=1, check=False)
    assert refused.returncode != 0 and "subject is 80 characters" in refused.stderr
    refused = commit(repo, "Big change\n# a comment is not a body\n", lines=30, check=False)
    assert refused.returncode != 0 and "no body" in refused.stderr
    commit(repo, "Big change\n\nThe reason for it.\n", lines=30)
    assert git(repo, "log", "-1", "--format=%s").stdout.strip() == "Big change"

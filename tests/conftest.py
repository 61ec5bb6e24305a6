from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KUBETUNE_SHARED", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"shared material not found at {SHARED} (set KUBETUNE_SHARED)")
    return SHARED


def shared_file(*parts: str) -> Path:
    """A file of the read-only ../shared material (read in place, never copied)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"{path} not found: the tests read ../shared in place (or set KUBETUNE_SHARED)")
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A random tiny Llama + word-level tokenizer for the tests' corpus (tests/trainer/conftest.py)."""
    from kubetune_testing.tiny import make_tiny_llama
    from tests.trainer.conftest import lm_corpus

    texts = [f"{r['prompt']} {r['completion']}" for r in lm_corpus()] + ["system user assistant"]
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), texts)

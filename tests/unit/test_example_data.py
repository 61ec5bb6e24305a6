"""The intent data the project ships (examples/data/intents) is regenerable and passes the trainer's checks."""

from __future__ import annotations

import subprocess
import sys

from kubetune_trainer import data
from tests.conftest import REPO_ROOT

INTENTS = REPO_ROOT / "examples" / "data" / "intents"


def test_the_generator_reproduces_the_shipped_files():
    result = subprocess.run([sys.executable, str(INTENTS / "make_intents.py"), "--check"], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_shipped_data_is_clean_balanced_and_leak_free():
    loaded = data.load_dataset((INTENTS / "train.jsonl").read_bytes(), "text-label",
                               validation_bytes=(INTENTS / "validation.jsonl").read_bytes())
    assert loaded.acceptable(0.0), loaded.summary()
    assert loaded.leakage == []
    assert len(loaded.labels) == 12
    per_label = {label: sum(r.fields["label"] == label for r in loaded.validation) for label in loaded.labels}
    assert set(per_label.values()) == {10}

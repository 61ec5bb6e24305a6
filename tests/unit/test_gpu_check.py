"""scripts/gpu-check.sh and scripts/gpu-wheels.sh where no GPU is: loud failures, the wheel budget."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bash(script: str, *args: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", f"scripts/{script}", *args], cwd=REPO_ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_without_cuda_the_script_fails_loudly_and_writes_the_table(tmp_path: Path):
    empty = tmp_path / "wheels"
    empty.mkdir()
    out = tmp_path / "out"
    env = {"PYTHON": sys.executable, "GPU_WHEELS": str(empty), "OUT": str(out), "CUDA_VISIBLE_DEVICES": ""}
    done = _bash("gpu-check.sh", env=env, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "gpu-check: FAILED: cuda: no CUDA" in done.stderr
    assert "sees no GPU" in done.stderr
    report = json.loads((out / "gpu-check.json").read_text())
    assert list(report["failed"]) == ["cuda"] and list(report["rows"]) == ["cuda"]  # nothing ran after it
    assert report["probe"]["packages"]["torch"]  # it ran on the given Python, with its own torch
    table = (out / "gpu-check.md").read_text()
    assert "| cuda | FAILED |" in table and "FAILED (cuda)" in table


def test_a_check_that_breaks_fails_the_run(tmp_path: Path):
    # --cpu-smoke runs the mechanics on CPU; a check that cannot finish in time is a failure, never a skip
    gpu_check = str(REPO_ROOT / "bench" / "gpu_check.py")
    done = subprocess.run([sys.executable, gpu_check, "--cpu-smoke", "--only", "packed-sdpa", "--timeout", "0.5",
                           "--out", str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "gpu-check: FAILED: packed-sdpa: timed out after 0.5 s" in done.stderr
    row = json.loads((tmp_path / "gpu-check.json").read_text())["rows"]["packed-sdpa"]
    assert row["status"] == "FAILED"


def test_the_packed_attention_check_runs_through_the_table(tmp_path: Path):
    gpu_check = str(REPO_ROOT / "bench" / "gpu_check.py")
    done = subprocess.run([sys.executable, gpu_check, "--cpu-smoke", "--only", "packed-sdpa,packed-flash-varlen",
                           "--out", str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=180,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr + (tmp_path / "gpu-check.log").read_text()
    rows = json.loads((tmp_path / "gpu-check.json").read_text())["rows"]
    packed = rows["packed-sdpa"]["result"]
    assert packed["max_error"] <= packed["tolerance"] < packed["control_min_error"]
    if importlib.util.find_spec("flash_attn") is None:
        assert rows["packed-flash-varlen"]["status"] == "absent"  # said so in the table, not a silent skip
    assert "| packed-sdpa | ok |" in done.stdout


def test_an_unknown_check_name_is_refused(tmp_path: Path):
    assert _gpu_check_module().main(["--only", "lora-2b", "--out", str(tmp_path)]) == 1


def test_cuda_failure_names_what_broke():
    cuda_failure = _gpu_check_module().cuda_failure
    cpu_build = {"cuda": False, "torch_cuda": None, "packages": {"torch": "2.13.0+cpu"}}
    assert "no CUDA: torch 2.13.0+cpu (a CPU-only build) sees no GPU" in cuda_failure(cpu_build)
    no_driver = {"cuda": False, "torch_cuda": "13.0", "packages": {"torch": "2.11.0"}}
    assert "built for CUDA 13.0" in cuda_failure(no_driver)
    assert "ImportError" in cuda_failure({"cuda": False, "error": "ImportError: libcuda.so.1", "packages": {}})
    working = {"cuda": True, "matmul_finite": True, "bf16": True, "device": "NVIDIA H100 80GB HBM3"}
    assert cuda_failure(working) is None
    assert "non-finite" in cuda_failure(working | {"matmul_finite": False})
    assert "no bf16" in cuda_failure(working | {"bf16": False})


def _wheel(folder: Path, name: str, size: int) -> None:
    folder.mkdir(exist_ok=True)
    with (folder / name).open("wb") as handle:
        handle.truncate(size)  # sparse: the apparent size is what travels


BNB = "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"


@pytest.mark.parametrize(("files", "message"), [
    ({BNB: 65 * 2**20}, "over the 64 MiB that travels"),
    ({BNB: 40 * 2**20, "notes.bin": 25 * 2**20}, "over the 64 MiB that travels"),  # every file travels
    ({BNB: 1024, "bitsandbytes-0.49.2-py3-none-manylinux_2_24_x86_64.whl": 1024}, "two versions of bitsandbytes"),
    ({"bitsandbytes-0.50.2-py3-none-macosx_14_0_arm64.whl": 1024}, "not a Python 3.12 wheel for Linux x86_64"),
    ({"flash_attn-2.8.3-cp311-cp311-linux_x86_64.whl": 1024}, "not a Python 3.12 wheel for Linux x86_64"),
    ({}, "no wheel in"),
])
def test_the_wheel_folder_check_refuses(tmp_path: Path, files: dict, message: str):
    folder = tmp_path / "wheels"
    folder.mkdir()
    for name, size in files.items():
        _wheel(folder, name, size)
    done = _bash("gpu-wheels.sh", "--check", env={"GPU_WHEELS": str(folder)}, timeout=30)
    assert done.returncode == 1, done.stdout
    assert message in done.stderr


def test_the_wheel_folder_check_accepts_a_folder_within_budget(tmp_path: Path):
    folder = tmp_path / "wheels"
    _wheel(folder, BNB, 43_139_553)  # the size of the real one
    done = _bash("gpu-wheels.sh", "--check", env={"GPU_WHEELS": str(folder)}, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "41.14 MiB of the 64 MiB budget" in done.stdout


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed here")
def test_the_scripts_are_shellcheck_clean():
    done = subprocess.run(["shellcheck", "scripts/gpu-check.sh", "scripts/gpu-wheels.sh"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout

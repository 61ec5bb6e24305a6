"""Threads per trainer process: the CPUs the cgroup quota and affinity allow, shared by the pod's
processes; the user's OMP_NUM_THREADS wins."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kubetune_trainer import threads


@pytest.mark.parametrize(("cpu_max", "expected"), [
    ("200000 100000", 2.0), ("150000 100000", 1.5), ("max 100000", None), ("50000 100000", 0.5)])
def test_cgroup_v2_quota(cpu_max, expected):
    assert threads.quota_cpus(cpu_max=cpu_max) == expected


@pytest.mark.parametrize(("quota", "period", "expected"), [("400000", "100000", 4.0), ("-1", "100000", None)])
def test_cgroup_v1_quota(quota, period, expected):
    assert threads.quota_cpus(cfs_quota_us=quota, cfs_period_us=period) == expected


def test_no_cgroup_files_no_quota():
    assert threads.quota_cpus() is None


@pytest.mark.parametrize(("quota", "affinity", "processes", "expected"), [
    (None, 16, 1, 16),  # no quota: the cores it may run on
    (4.0, 16, 1, 4),  # the quota binds before the node's cores
    (2.5, 16, 1, 2),  # a thread past the quota only waits for its slice
    (8.0, 4, 1, 4),  # the affinity mask binds before a larger quota
    (8.0, 16, 2, 4),  # shared by the pod's processes
    (0.5, 16, 1, 1),  # at least one
    (2.0, 16, 4, 1),
])
def test_threads_per_process(quota, affinity, processes, expected):
    assert threads.threads_per_process(quota, affinity, processes) == expected


def test_the_launcher_sets_omp_num_threads_unless_the_user_did(monkeypatch):
    monkeypatch.setattr(threads, "pod_quota", lambda: 3.0)
    monkeypatch.setattr(threads, "affinity_cpus", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads.set_launcher_threads(local_world_size=1)
    assert threads.os.environ["OMP_NUM_THREADS"] == "3"
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    threads.set_launcher_threads(local_world_size=2)
    assert threads.os.environ["OMP_NUM_THREADS"] == "7"


def test_this_machines_choice_is_within_its_cpus():
    chosen, basis = threads.chosen_threads(local_world_size=1)
    assert 1 <= chosen <= basis["affinityCpus"]


def _workers_see(env: dict, processes: int) -> list[str]:
    """OMP_NUM_THREADS as the launcher's workers see it (torchrun's own flags, a shell as the worker)."""
    done = subprocess.run([sys.executable, "-m", "kubetune_trainer.launch", "--standalone",
                           f"--nproc-per-node={processes}", "--no-python", "sh", "-c", 'echo "omp=$OMP_NUM_THREADS"'],
                          env=env, capture_output=True, text=True, timeout=120, check=True)
    return [line[4:] for line in done.stdout.splitlines() if line.startswith("omp=")]


def test_the_launchers_workers_get_the_pods_cpus_or_the_users_setting():
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    assert _workers_see(env, 1) == [str(threads.chosen_threads(1)[0])]  # torchrun alone would leave it unset
    assert _workers_see({**env, "OMP_NUM_THREADS": "3"}, 2) == ["3", "3"]

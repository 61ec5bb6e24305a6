"""Intra-op threads for the CPUs this process may use: the cgroup quota and the affinity mask, shared by
the pod's processes. Why (spin-waiting OpenMP threads on busy cores): docs/trainer.md, CPU threads."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")


def quota_cpus(cpu_max: str | None = None, cfs_quota_us: str | None = None,
               cfs_period_us: str | None = None) -> float | None:
    """CPUs the cgroup allows, from cgroup v2's `cpu.max` ("200000 100000", or "max 100000": none) or
    v1's `cpu.cfs_quota_us` (-1: none) over `cpu.cfs_period_us`; None without a quota."""
    if cpu_max is not None:
        fields = cpu_max.split()
        if len(fields) == 2 and fields[0] != "max":
            return int(fields[0]) / int(fields[1])
        return None
    if cfs_quota_us is not None and cfs_period_us is not None and int(cfs_quota_us) > 0:
        return int(cfs_quota_us) / int(cfs_period_us)
    return None


def threads_per_process(quota: float | None, affinity: int, local_world_size: int) -> int:
    """The usable CPUs (the quota rounded down: a thread past it only waits for its slice) shared by the
    pod's processes, at least 1 each."""
    cpus = affinity if quota is None else min(affinity, max(1, math.floor(quota)))
    return max(1, cpus // max(1, local_world_size))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_cgroup_v2() -> Path:
    """This process's cgroup v2 directory ("0::/path" in /proc/self/cgroup; "/" inside a cgroup namespace)."""
    for line in (_read(Path("/proc/self/cgroup")) or "").splitlines():
        if line.startswith("0::"):
            return CGROUP_ROOT / line[3:].lstrip("/")
    return CGROUP_ROOT


def pod_quota() -> float | None:
    cpu_max = _read(_own_cgroup_v2() / "cpu.max") or _read(CGROUP_ROOT / "cpu.max")
    if cpu_max is not None:
        return quota_cpus(cpu_max=cpu_max)
    v1 = CGROUP_ROOT / "cpu"
    return quota_cpus(cfs_quota_us=_read(v1 / "cpu.cfs_quota_us"), cfs_period_us=_read(v1 / "cpu.cfs_period_us"))


def affinity_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def chosen_threads(local_world_size: int) -> tuple[int, dict]:
    """The thread count for one of `local_world_size` processes, and what it was derived from (logged)."""
    quota, affinity = pod_quota(), affinity_cpus()
    threads = threads_per_process(quota, affinity, local_world_size)
    return threads, {"threads": threads, "cgroupQuotaCpus": quota, "affinityCpus": affinity,
                     "localWorldSize": local_world_size}


def set_launcher_threads(local_world_size: int) -> None:
    """torchrun's workers read OMP_NUM_THREADS: set it before torchrun would default it to 1 for more than
    one process. An OMP_NUM_THREADS already in the environment is the user's, and kept."""
    if "OMP_NUM_THREADS" in os.environ:
        log.info("threads per process from OMP_NUM_THREADS", extra={"threads": os.environ["OMP_NUM_THREADS"]})
        return
    threads, basis = chosen_threads(local_world_size)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    log.info("threads per process for the pod's CPUs", extra=basis)


def set_worker_threads() -> None:
    """In a trainer process: torch already follows OMP_NUM_THREADS when set (by the user or the
    launcher); otherwise (started without the launcher) size its pool the same way."""
    import torch

    if "OMP_NUM_THREADS" in os.environ:
        log.info("torch threads", extra={"threads": torch.get_num_threads(), "source": "OMP_NUM_THREADS"})
        return
    threads, basis = chosen_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(threads)
    log.info("torch threads for the pod's CPUs", extra=basis)

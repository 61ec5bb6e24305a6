"""The emulator's cost per request with 1,000 to 40,000 stored objects: indexed (`object_index`) vs kmock's
scans (`emulator_oracle.ScanningEmulator`, the baseline), both served over HTTP in this one process and
forgetting served requests (as in bench/scale.py), so what grows is the stored objects alone.

    .venv/bin/python bench/emulator_list.py --sizes 1000 10000 40000 --out /tmp/emulator_list.json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import aiohttp
import kmock

REPO_ROOT = Path(__file__).resolve().parents[1]
for _src in (REPO_ROOT / "operator", REPO_ROOT / "testing"):
    if str(_src) not in sys.path:
        sys.path.insert(0, str(_src))
from common import load_average  # noqa: E402  (bench/, on sys.path)
from kubetune_testing.emulator import K8sEmulator, declare_resources  # noqa: E402
from kubetune_testing.emulator_oracle import ScanningEmulator  # noqa: E402
from kubetune_testing.served_requests import ForgetfulEmulator  # noqa: E402


class Indexed(ForgetfulEmulator):
    """The emulator bench/scale.py serves (kmock's request history forgotten, docs/testing.md)."""


class Scanning(ScanningEmulator, ForgetfulEmulator):
    """The same with kmock's scans: the baseline."""


NAMESPACES = 10
JOB_LABEL = "kubetune.io/finetunejob"
FTJ = kmock.resource("kubetune.io", "v1alpha1", "finetunejobs")
PYTORCHJOB = kmock.resource("kubeflow.org", "v1", "pytorchjobs")
CONFIGMAP = kmock.resource("", "v1", "configmaps")
EVENT = kmock.resource("", "v1", "events")


def populate(emulator: K8sEmulator, size: int) -> int:
    """`size` objects as bench/scale.py leaves them: per FineTuneJob its PyTorchJob and job ConfigMap
    (labelled with the job, owned by it) and an Event; stored directly (no HTTP). Returns the jobs."""
    jobs = size // 4
    for i in range(jobs):
        ns, name, uid = f"team-{i % NAMESPACES}", f"ftj-{i}", f"uid-{i}"
        owner = [{"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "name": name, "uid": uid,
                  "controller": True}]
        child = {"namespace": ns, "labels": {JOB_LABEL: name}, "ownerReferences": owner}
        emulator.objects[FTJ, ns, name] = {"metadata": {"name": name, "namespace": ns, "uid": uid},
                                          "spec": {"backend": "pytorchjob"}, "status": {"phase": "Pending"}}
        emulator.objects[PYTORCHJOB, ns, name] = {"metadata": {"name": name, "uid": f"{uid}-p", **child},
                                                  "spec": {"runPolicy": {"suspend": False}}}
        emulator.objects[CONFIGMAP, ns, f"{name}-config"] = {
            "metadata": {"name": f"{name}-config", "uid": f"{uid}-c", **child}, "data": {"job.json": "{}"}}
        emulator.objects[EVENT, ns, f"{name}.1"] = {
            "metadata": {"name": f"{name}.1", "namespace": ns, "uid": f"{uid}-e"}, "reason": "Created",
            "involvedObject": {"kind": "FineTuneJob", "name": name, "namespace": ns, "uid": uid}}
    return jobs


async def timed(requests: int, call) -> float:
    """The median microseconds of `requests` sequential calls."""
    samples = []
    for i in range(requests):
        start = time.perf_counter()
        await call(i)
        samples.append((time.perf_counter() - start) * 1e6)
    return round(statistics.median(samples), 1)


async def measure(emulator_class: type[K8sEmulator], size: int, requests: int) -> dict[str, float]:
    async with emulator_class() as emulator, kmock.Server(emulator), aiohttp.ClientSession() as session:
        declare_resources(emulator)
        jobs = populate(emulator, size)
        base = str(emulator.url).rstrip("/")

        def job(i: int) -> tuple[str, str]:
            j = (i * 7919) % jobs  # spread over the jobs and namespaces
            return f"team-{j % NAMESPACES}", f"ftj-{j}"

        async def list_children(i: int) -> None:
            ns, name = job(i)
            url = f"{base}/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs"
            async with session.get(url, params={"labelSelector": f"{JOB_LABEL}={name}"}) as response:
                assert response.status == 200 and len((await response.json())["items"]) == 1

        async def get_job(i: int) -> None:
            ns, name = job(i)
            async with session.get(f"{base}/apis/kubetune.io/v1alpha1/namespaces/{ns}/finetunejobs/{name}") as r:
                assert r.status == 200

        async def create(i: int) -> None:
            ns, name = job(i)
            body = {"metadata": {"name": f"new-{i}", "labels": {JOB_LABEL: name}}, "data": {"k": "v"}}
            async with session.post(f"{base}/api/v1/namespaces/{ns}/configmaps", json=body) as response:
                assert response.status in (200, 201), await response.text()

        await list_children(0)  # connection and first-use costs out of the samples
        return {"list_ns_label_us": await timed(requests, list_children),
                "get_us": await timed(requests, get_job), "create_us": await timed(requests, create)}


def history_mib(size: int, patches: int) -> dict[str, float]:
    """MiB the stored objects hold after `patches` status patches of each (kmock's Object.patch, as a
    write does), every version kept (kmock's default) vs `bounded_history`."""
    held: dict[str, float] = {}
    for bounded in (False, True):
        emulator_class = type("Emulator", (Indexed,), {"bounded_history": bounded})
        gc.collect()
        tracemalloc.start()
        emulator = emulator_class()
        populate(emulator, size)
        for patch in range(patches):
            for obj in emulator.objects.values():
                obj.patch({"status": {"observedGeneration": patch}})
        gc.collect()
        held["bounded_mib" if bounded else "every_version_mib"] = round(tracemalloc.get_traced_memory()[0] / 2**20, 1)
        tracemalloc.stop()
        del emulator
    return held


async def run(sizes: list[int], requests: int, patches: int, history_objects: int) -> dict:
    results = {}
    for size in sizes:
        indexed = await measure(Indexed, size, requests)
        scanning = await measure(Scanning, size, requests)
        result = results[str(size)] = {"indexed": indexed, "kmock_scan": scanning,
                                       "ratio": {k: round(scanning[k] / indexed[k], 1) for k in indexed}}
        print(f"{size:>6} objects: " + ", ".join(
            f"{k} {scanning[k]:.0f} -> {indexed[k]:.0f} ({result['ratio'][k]}x)" for k in indexed), flush=True)
    if patches:  # memory is linear in the objects: 1,000 of them tell (tracemalloc makes patches slow)
        held = history_mib(history_objects, patches)
        results["history"] = {"objects": history_objects, "patches": patches, **held}
        print(f"{history_objects} objects, {patches} patches each, MiB held: {held}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 40000])
    parser.add_argument("--requests", type=int, default=30, help="timed requests per operation and size")
    parser.add_argument("--patches", type=int, default=10,
                        help="status patches of each of 1,000 objects: the memory of kept vs bounded history (0: skip)")
    parser.add_argument("--smoke", action="store_true", help="200 objects, 3 requests, 2 patches (CI)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sizes, requests, patches, history_objects = (([200], 3, 2, 200) if args.smoke
                                                 else (args.sizes, args.requests, args.patches, 1000))
    load_before = load_average()
    results = asyncio.run(run(sizes, requests, patches, history_objects))
    report = {"settings": {"sizes": sizes, "requests": requests, "patches": patches, "namespaces": NAMESPACES},
              "load_before": load_before, "load_after": load_average(), "results": results}
    print(f"load average {report['load_before']} before, {report['load_after']} after")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

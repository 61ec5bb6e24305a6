"""The emulator of bench/scale.py in a process of its own, so that its CPU is measured apart from the
client's and the two do not share one interpreter: `python bench/scale_emulator.py` serves the KMock
emulator over HTTP, prints its URL, then answers one JSON command per stdin line with one JSON line
(see `EmulatorProcess` for the commands). What is measured: BENCHMARKS.md ("Scale")."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for _src in (REPO_ROOT / "operator", REPO_ROOT / "testing"):
    if str(_src) not in sys.path:
        sys.path.insert(0, str(_src))

import kmock  # noqa: E402

from kubetune.api import serving  # noqa: E402
from kubetune_testing.emulator import declare_resources  # noqa: E402
from kubetune_testing.served_requests import ForgetfulEmulator  # noqa: E402

WRITES = (kmock.action.CREATE, kmock.action.UPDATE)  # POST and PATCH: what the operator and kopf write
STREAM_LIMIT = 1 << 30  # a latencies answer at 10,000 jobs is a few hundred KiB on one line


class CountingEmulator(ForgetfulEmulator):
    """The emulator, plus: every request counted by verb and resource, and when each kubetune child was
    created (keyed by its owner), so convergence is timed where it happens, with no extra requests.

    A served request is forgotten (ForgetfulEmulator): with kmock's whole history kept, at 30
    FineTuneJobs 165 of the 190 CPU seconds of this process went to kmock's filtering and a FineTuneJob
    waited 60 s for its PyTorchJob (--keep-history brings that back)."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.counts: collections.Counter = collections.Counter()
        self.parent_seen: dict[tuple[str, str, str], float] = {}  # (plural, ns, name) -> POST arrived
        self.children: dict[tuple[str, str, str], dict[str, float]] = collections.defaultdict(dict)
        self.duplicates: list[str] = []
        self.forget_versions = True

    async def _handle(self, request: kmock.Request):
        plural = request.resource.plural if request.resource is not None else "-"
        action = request.action.name if request.action is not None else request.method.name
        if action == "LIST" and request.params.get("watch") in ("true", "1"):
            action = "WATCH"
        self.counts[action, plural] += 1
        if request.action == kmock.action.CREATE and isinstance(request.data, dict) and plural in (
                "finetunejobs", "adapterdeployments"):
            meta = request.data.get("metadata") or {}
            self.parent_seen.setdefault((plural, request.namespace or meta.get("namespace"), meta.get("name")),
                                        time.monotonic())
        response = await super()._handle(request)
        if self.forget_versions and request.action in WRITES and response.status < 400:
            self.forget_old_versions(request)
        if request.action == kmock.action.CREATE and isinstance(request.data, dict) and response.status < 400:
            meta = request.data.get("metadata") or {}
            for owner in meta.get("ownerReferences") or []:
                key = (owner.get("kind"), meta.get("namespace"), owner.get("name"))
                child = f"{request.data.get('kind') or plural}/{meta.get('name')}"
                if child in self.children[key]:
                    self.duplicates.append(child)
                self.children[key][child] = time.monotonic()
        return response

    def forget_old_versions(self, request: kmock.Request) -> None:
        """Keeps only an object's current version, as an API server does once etcd compacts: kmock keeps
        every version of every object (the bench reads none), memory that grows with every write and so
        with the settle's length, not only with the objects."""
        name = request.name
        if request.action == kmock.action.CREATE and isinstance(request.data, dict):
            name = (request.data.get("metadata") or {}).get("name") or name
        key = (request.resource, request.namespace, name)
        if key not in self.objects:  # kmock's ObjectsArray has no get()
            return
        stored = self.objects[key]
        if not stored.deleted and len(stored.history) > 1:
            del stored.history[:-1]


def first_child(job_name: str) -> str:
    """A FineTuneJob's first workload: its CPU data stage (`<job>-data`), created before any GPU stage."""
    return f"PyTorchJob/{job_name}-data"


class Expected:
    """A set of parents the bench created (the bulk, the probes) and what each one's children must be."""

    def __init__(self, jobs: list[list[str]], adeps: list[list[str]]):
        self.jobs = [tuple(job) for job in jobs]  # (namespace, name)
        self.adeps = [tuple(adep) for adep in adeps]  # (namespace, name, job)
        # the parents still missing a child: the bench asks 4 times a second, over 11,000 parents at 10,000
        self.waiting_jobs, self.waiting_adeps = list(self.jobs), list(self.adeps)

    def adep_children(self, k8s: CountingEmulator, namespace: str, name: str) -> list[float]:
        """Creation times of an AdapterDeployment's Deployment and desired-state ConfigMap (what it has)."""
        config_map = f"ConfigMap/{serving.desired_config_map_name(name)}"
        return [t for child, t in k8s.children["AdapterDeployment", namespace, name].items()
                if child.startswith("Deployment/") or child == config_map]

    def missing(self, k8s: CountingEmulator) -> int:
        """Children not created yet (one per FineTuneJob, two per AdapterDeployment)."""
        self.waiting_jobs = [(ns, name) for ns, name in self.waiting_jobs
                             if first_child(name) not in k8s.children["FineTuneJob", ns, name]]
        adep_missing = {adep: 2 - min(2, len(self.adep_children(k8s, adep[0], adep[1])))
                        for adep in self.waiting_adeps}
        self.waiting_adeps = [adep for adep, count in adep_missing.items() if count]
        return len(self.waiting_jobs) + sum(adep_missing.values())

    def latencies(self, k8s: CountingEmulator) -> dict:
        """Per parent, its POST arriving -> its child's POST answered; and the last such child."""
        out: dict = {"FineTuneJob": [], "AdapterDeployment": [], "last_child": None}
        created = []
        for ns, name in self.jobs:
            child = k8s.children["FineTuneJob", ns, name].get(first_child(name))
            seen = k8s.parent_seen.get(("finetunejobs", ns, name))
            if child is not None and seen is not None:
                out["FineTuneJob"].append(child - seen)
                created.append(child)
        for ns, name, _ in self.adeps:
            times = self.adep_children(k8s, ns, name)
            seen = k8s.parent_seen.get(("adapterdeployments", ns, name))
            if len(times) >= 2 and seen is not None:
                out["AdapterDeployment"].append(max(times) - seen)
                created.append(max(times))
        out["last_child"] = max(created, default=None)
        return out


def answer(k8s: CountingEmulator, sets: dict[str, Expected], command: dict) -> dict:
    op = command["op"]
    if op == "namespaces":  # KMock's HTTP side cannot create cluster-scoped objects
        for namespace in command["names"]:
            k8s.objects[kmock.resource("", "v1", "namespaces"), None, namespace] = {
                "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
        return {}
    if op == "expect":
        sets[command["set"]] = Expected(command["jobs"], command.get("adeps", []))
        return {}
    if op == "missing":
        return {"missing": sets[command["set"]].missing(k8s)}
    if op == "latencies":
        return sets[command["set"]].latencies(k8s)
    if op == "counts":
        return {"counts": [[verb, plural, count] for (verb, plural), count in k8s.counts.items()]}
    if op == "state":
        pytorchjobs = sum(1 for key, obj in k8s.objects.items() if key[0].plural == "pytorchjobs" and not obj.deleted)
        versions = sum(len(obj.history) for obj in k8s.objects.values())
        return {"duplicates": k8s.duplicates[:10], "pytorchjobs": pytorchjobs, "objects": len(k8s.objects),
                "object_versions": versions}
    raise ValueError(f"unknown command op {op!r} (line: {json.dumps(command)[:200]})")


async def serve(keep_history: bool, keep_versions: bool) -> None:
    CountingEmulator.forget_served = not keep_history
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader(limit=STREAM_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    sets: dict[str, Expected] = {}
    async with CountingEmulator() as k8s, kmock.Server(k8s):
        k8s.forget_versions = not keep_versions
        declare_resources(k8s)
        print(json.dumps({"url": str(k8s.url), "pid": os.getpid()}), flush=True)
        while line := await stdin.readline():
            command = json.loads(line)
            if command["op"] == "stop":
                break
            print(json.dumps(answer(k8s, sets, command)), flush=True)


class EmulatorProcess:
    """The parent's handle: commands `namespaces` (names), `expect` (set, jobs, adeps), `missing` (set),
    `latencies` (set), `counts`, `state`; `stop` ends it. One command at a time."""

    def __init__(self, process: asyncio.subprocess.Process, url: str):
        self.process, self.url, self.lock = process, url, asyncio.Lock()

    @classmethod
    async def start(cls, log_file, keep_history: bool, keep_versions: bool) -> EmulatorProcess:
        args = [sys.executable, str(Path(__file__).resolve())]
        args += (["--keep-history"] if keep_history else []) + (["--keep-versions"] if keep_versions else [])
        process = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log_file,
            limit=STREAM_LIMIT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = await asyncio.wait_for(process.stdout.readline(), timeout=60)
        if not line:
            raise SystemExit(f"the emulator process exited ({await process.wait()}) before serving; see its log")
        return cls(process, json.loads(line)["url"])

    async def call(self, op: str, **fields) -> dict:
        async with self.lock:
            self.process.stdin.write(json.dumps({"op": op, **fields}).encode() + b"\n")
            await self.process.stdin.drain()
            line = await self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the emulator process exited ({self.process.returncode}) during {op!r}")
        return json.loads(line)

    async def requests(self) -> collections.Counter:
        counts = (await self.call("counts"))["counts"]
        return collections.Counter({(verb, plural): count for verb, plural, count in counts})

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.stdin.write(b'{"op": "stop"}\n')
            self.process.stdin.close()
            try:
                await asyncio.wait_for(self.process.wait(), timeout=30)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


if __name__ == "__main__":
    asyncio.run(serve(keep_history="--keep-history" in sys.argv[1:], keep_versions="--keep-versions" in sys.argv[1:]))

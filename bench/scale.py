"""Scale: N FineTuneJobs and N/10 AdapterDeployments against the emulator, the operator as a real process.

    .venv/bin/python bench/scale.py --sizes 100 300 1000 --out /tmp/scale.json   # several minutes
    .venv/bin/python bench/scale.py --sizes 5 --settle 1 --out /tmp/scale.json  # smoke, < 30 s
Exits 1 when a size does not converge within `--timeout`. What is measured: BENCHMARKS.md ("Scale")."""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for _src in (REPO_ROOT / "operator", REPO_ROOT / "testing"):
    if str(_src) not in sys.path:
        sys.path.insert(0, str(_src))

import aiohttp  # noqa: E402
import kmock  # noqa: E402
import psutil  # noqa: E402
import yaml  # noqa: E402

from common import load_average  # noqa: E402  (bench/, on sys.path)
from kubetune.api import serving  # noqa: E402
from kubetune.clients import kube  # noqa: E402
from kubetune_operator.controllers.adapterdeployment import ADAPTERDEPLOYMENTS  # noqa: E402
from kubetune_testing import operator_process, seaweedfs  # noqa: E402
from kubetune_testing.emulator import declare_resources  # noqa: E402
from kubetune_testing.factories import adapterdeployment, finetunejob  # noqa: E402
from kubetune_testing.served_requests import ForgetfulEmulator  # noqa: E402


class CountingEmulator(ForgetfulEmulator):
    """The emulator, plus: every request counted by verb and resource, and when each kubetune child was
    created (keyed by its owner), so convergence is timed where it happens, with no extra requests.

    A served request is forgotten (ForgetfulEmulator): with kmock's whole history kept, at 30
    FineTuneJobs 165 of the 190 CPU seconds of this process went to kmock's filtering and a FineTuneJob
    waited 60 s for its PyTorchJob (--keep-history brings that back)."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.counts: collections.Counter = collections.Counter()
        self.parent_seen: dict[tuple[str, str, str], float] = {}  # (kind, ns, name) -> POST arrived
        self.children: dict[tuple[str, str, str], dict[str, float]] = collections.defaultdict(dict)
        self.duplicates: list[str] = []

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
        if request.action == kmock.action.CREATE and isinstance(request.data, dict) and response.status < 400:
            meta = request.data.get("metadata") or {}
            for owner in meta.get("ownerReferences") or []:
                key = (owner.get("kind"), meta.get("namespace"), owner.get("name"))
                child = f"{request.data.get('kind') or plural}/{meta.get('name')}"
                if child in self.children[key]:
                    self.duplicates.append(child)
                self.children[key][child] = time.monotonic()
        return response


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def histogram_quantile(text: str, name: str, q: float) -> tuple[float | None, int]:
    """Prometheus' histogram_quantile over a text exposition: (quantile, count of observations)."""
    buckets = []
    for le, value in re.findall(rf'^{name}_bucket{{le="([^"]+)"}} (\S+)$', text, re.M):
        buckets.append((float("inf") if le == "+Inf" else float(le), float(value)))
    if not buckets or buckets[-1][1] == 0:
        return None, 0
    total = buckets[-1][1]
    rank, lower, below = q * total, 0.0, 0.0
    for upper, cumulative in buckets:
        if cumulative >= rank:
            if upper == float("inf"):
                return lower, int(total)
            return lower + (upper - lower) * (rank - below) / max(cumulative - below, 1e-9), int(total)
        lower, below = upper, cumulative
    return lower, int(total)


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a process in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def start_s3(root: Path) -> seaweedfs.Weed:
    """SeaweedFS as the integration tests start it (kubetune_testing.seaweedfs)."""
    try:
        return seaweedfs.start(root)
    except seaweedfs.SeaweedFSError as exc:
        raise SystemExit(str(exc)) from None


async def http_get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as response:
        return response.status, await response.text()


async def scrape(session: aiohttp.ClientSession, port: int, result: dict, prefix: str, keep: Path) -> None:
    """The operator's reconcile histograms (p50, p99, passes) and its error counters, into result."""
    _, text = await http_get(session, f"http://127.0.0.1:{port}/metrics")
    keep.write_text(text)
    for kind, metric in (("FineTuneJob", "kubetune_finetunejob_reconcile_seconds"),
                         ("AdapterDeployment", "kubetune_adapterdeployment_reconcile_seconds")):
        p50, count = histogram_quantile(text, metric, 0.5)
        p99, _ = histogram_quantile(text, metric, 0.99)
        result[f"{prefix}{kind}_reconcile_p50_s"], result[f"{prefix}{kind}_reconcile_p99_s"] = _round(p50), _round(p99)
        result[f"{prefix}{kind}_reconciles"] = count
    errors = 0
    for value in re.findall(r"^kubetune_\w+_reconcile_errors_total (\S+)$", text, re.M):
        errors += int(float(value))
    result[f"{prefix}reconcile_errors"] = errors


def job_doc(name: str, namespace: str, endpoint: str) -> dict:
    doc = finetunejob()
    doc["metadata"] = {"name": name, "namespace": namespace}
    doc["spec"]["output"] = {"uri": f"s3://{seaweedfs.BUCKET}/{namespace}", "endpoint": endpoint,
                             "credentials": {"secretName": "s3-creds"}}
    return doc


def adep_doc(name: str, namespace: str, job: str) -> dict:
    doc = adapterdeployment()
    doc["metadata"] = {"name": name, "namespace": namespace}
    doc["spec"]["runtime"] = {"managed": {"replicas": 1}}
    doc["spec"]["adapters"] = [{"name": "bot", "source": {"fineTuneJobRef": {"name": job}}}]
    return doc


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system + times.children_user + times.children_system


async def run_size(n_jobs: int, n_adeps: int, args, s3_endpoint: str, keys: tuple[str, str], work: Path,
                   s3_pid: int) -> dict:
    namespaces = [f"scale-{i}" for i in range(min(args.namespaces, max(n_jobs, 1)))]
    jobs = [(namespaces[i % len(namespaces)], f"job-{i}") for i in range(n_jobs)]
    adeps = [(ns, f"serve-{i}", job) for i, (ns, job) in enumerate(jobs[:n_adeps])]
    result: dict = {"jobs": n_jobs, "adapterdeployments": n_adeps, "namespaces": len(namespaces),
                    "load_before": load_average()}
    async with CountingEmulator() as k8s, kmock.Server(k8s):
        declare_resources(k8s)
        client = kube.KubeClient(str(k8s.url), timeout=120)
        await populate(k8s, client, namespaces, keys)
        kubeconfig = write_kubeconfig(work / f"kubeconfig-{n_jobs}", str(k8s.url))
        log_path = work / f"operator-{n_jobs}.log"
        with open(log_path, "wb") as log_file:
            operator = await start_operator(args, namespaces, kubeconfig, s3_endpoint, log_file)
        process, metrics_port = operator.process, operator.metrics_port
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        try:
            await wait_healthy(operator, log_path)
            run = Measured(k8s, process, s3_pid, jobs, adeps)
            await run.converge(client, args, s3_endpoint, result)
            run.record_costs(result)
            run.record_latencies(result)
            if process.returncode is None:
                await scrape(session, metrics_port, result, "", work / f"metrics-{n_jobs}.txt")
            if args.settle > 0 and process.returncode is None:
                await run.settle(args.settle, result)
                if process.returncode is None:
                    await scrape(session, metrics_port, result, "settled_", work / f"metrics-{n_jobs}-settled.txt")
            pytorchjobs = [k for k in k8s.objects if k[0].plural == "pytorchjobs" and not k8s.objects[k].deleted]
            result["pytorchjobs"] = len(pytorchjobs)
            result["duplicate_child_creates"] = k8s.duplicates[:10]
            result["load_after"] = load_average()
        finally:
            await session.close()
            await operator.stop(grace=60)
            await client.close()
        result["operator_exit"] = process.returncode
        result.update(log_counts(log_path))
    return result


async def populate(k8s: CountingEmulator, client: kube.KubeClient, namespaces: list[str],
                   keys: tuple[str, str]) -> None:
    """The namespaces, each with the `s3-creds` Secret the jobs name."""
    for namespace in namespaces:  # KMock's HTTP side cannot create cluster-scoped objects
        k8s.objects[kmock.resource("", "v1", "namespaces"), None, namespace] = {
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
    for namespace in namespaces:
        await client.create(kube.SECRETS, {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds", "namespace": namespace},
            "data": {"AWS_ACCESS_KEY_ID": base64.b64encode(keys[0].encode()).decode(),
                     "AWS_SECRET_ACCESS_KEY": base64.b64encode(keys[1].encode()).decode()}})


def write_kubeconfig(path: Path, server: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": server.rstrip("/")}}],
        "users": [{"name": "operator", "user": {"token": "operator-token"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "operator"}}]}))
    return path


async def start_operator(args, namespaces: list[str], kubeconfig: Path, s3_endpoint: str,
                         log_file) -> operator_process.OperatorProcess:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "KUBETUNE_S3_ENDPOINT": s3_endpoint,
           "PYTHONUNBUFFERED": "1"}
    # `--all-namespaces` (the chart's default) dies at start-up: main.run passes namespaces=None to
    # kopf.operator, whose namespace observer iterates it (TypeError). Scope to the namespaces instead.
    scope = ["--all-namespaces"] if args.all_namespaces else [a for ns in namespaces for a in ("--namespace", ns)]
    return await operator_process.start(env, *scope, stdout=log_file)


async def wait_healthy(operator: operator_process.OperatorProcess, log_path: Path) -> None:
    deadline = time.monotonic() + 60
    while not await operator.healthy():
        if operator.process.returncode is not None or time.monotonic() > deadline:
            raise SystemExit(f"operator did not start:\n{log_path.read_text()[-3000:]}")
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)  # kopf's watches settle


def log_counts(log_path: Path) -> dict:
    """ERROR and WARNING lines of the operator's log; the ones after SIGTERM are counted apart (timers cut
    short at shutdown)."""
    log_lines = log_path.read_text(errors="replace").splitlines()
    stop = next((i for i, line in enumerate(log_lines) if "Signal SIGTERM is received" in line), len(log_lines))

    def is_error(line: str) -> bool:
        return '"level": "ERROR"' in line or "Traceback" in line

    return {"log_errors": sum(1 for line in log_lines[:stop] if is_error(line)),
            "log_errors_at_shutdown": sum(1 for line in log_lines[stop:] if is_error(line)),
            "log_warnings": sum(1 for line in log_lines[:stop] if '"level": "WARNING"' in line),
            "log_first_error": next((line[:400] for line in log_lines[:stop] if is_error(line)), None)}


def first_child(job_name: str) -> str:
    """A FineTuneJob's first workload: its CPU data stage (`<job>-data`), created before any GPU stage."""
    return f"PyTorchJob/{job_name}-data"


class Measured:
    """One size's run once the operator is up: the baselines taken before the creates, and what is
    measured from them."""

    def __init__(self, k8s: CountingEmulator, process: asyncio.subprocess.Process, s3_pid: int,
                 jobs: list[tuple[str, str]], adeps: list[tuple[str, str, str]]):
        self.k8s, self.process, self.jobs, self.adeps = k8s, process, jobs, adeps
        self.proc = psutil.Process(process.pid)
        self.idle_rss = proc_status(process.pid)["VmRSS"]
        self.cpu_before = sum(self.proc.cpu_times()[:2])
        self.me, self.s3_process = psutil.Process(), psutil.Process(s3_pid)
        self.me_before, self.s3_before = cpu_seconds(self.me), cpu_seconds(self.s3_process)
        self.requests_before = sum(k8s.counts.values())
        self.counts_before = collections.Counter(k8s.counts)

    @property
    def objects(self) -> int:
        return len(self.jobs) + len(self.adeps)

    def missing(self) -> int:
        k8s = self.k8s
        left = sum(1 for ns, name in self.jobs if first_child(name) not in k8s.children["FineTuneJob", ns, name])
        for ns, name, _ in self.adeps:
            have = k8s.children["AdapterDeployment", ns, name]
            left += (f"Deployment/{name}" not in have and not any(c.startswith("Deployment/") for c in have))
            left += f"ConfigMap/{serving.desired_config_map_name(name)}" not in have
        return left

    async def converge(self, client: kube.KubeClient, args, s3_endpoint: str, result: dict) -> None:
        """Create everything, as fast as the client can, and wait until every child exists."""
        semaphore = asyncio.Semaphore(args.concurrency)

        async def create(resource, doc):
            async with semaphore:
                await client.create(resource, doc)

        t0 = time.monotonic()
        creations = [create(kube.FINETUNEJOBS, job_doc(name, ns, s3_endpoint)) for ns, name in self.jobs]
        creations += [create(ADAPTERDEPLOYMENTS, adep_doc(name, ns, job)) for ns, name, job in self.adeps]
        create_task = asyncio.gather(*creations)
        converged = False
        while True:
            await asyncio.sleep(0.25)
            if self.process.returncode is not None:
                break
            if create_task.done() and "create_s" not in result:
                create_task.result()  # raises if a create failed
                result["create_s"] = round(time.monotonic() - t0, 3)
            if create_task.done() and self.missing() == 0:
                converged = True
                break
            if time.monotonic() - t0 > args.timeout:
                break
        done_at = time.monotonic()
        if not create_task.done():
            create_task.cancel()
        result["converged"] = converged
        result["missing"] = self.missing()
        result["converge_s"] = round(done_at - t0, 3)
        # the last child's creation time, not when this loop noticed it
        child_times = [t for key, children in self.k8s.children.items()
                       if key[0] in ("FineTuneJob", "AdapterDeployment") for t in children.values()]
        if converged and child_times:
            result["converge_s"] = round(max(child_times) - t0, 3)
        result["converge_s_per_object"] = round(result["converge_s"] / max(self.objects, 1), 5)

    def record_costs(self, result: dict) -> None:
        """CPU, memory and API requests from the baselines to now."""
        alive = self.process.returncode is None
        result["operator_alive"] = alive
        status = proc_status(self.process.pid) if alive else {}
        result["cpu_s"] = round(sum(self.proc.cpu_times()[:2]) - self.cpu_before, 2) if alive else None
        result["emulator_cpu_s"] = round(cpu_seconds(self.me) - self.me_before, 2)  # this process: emulator + client
        result["s3_cpu_s"] = round(cpu_seconds(self.s3_process) - self.s3_before, 2)
        result["rss_idle_mib"] = round(self.idle_rss / 1024, 1)
        result["rss_peak_mib"] = round(status.get("VmHWM", 0) / 1024, 1)
        result["rss_after_mib"] = round(status.get("VmRSS", 0) / 1024, 1)
        result["rss_kib_per_object"] = round((status.get("VmRSS", self.idle_rss) - self.idle_rss)
                                             / max(self.objects, 1), 1)
        counts = self.k8s.counts - self.counts_before
        requests = sum(self.k8s.counts.values()) - self.requests_before
        by_verb = collections.Counter()
        for (verb, _plural), count in counts.items():
            by_verb[verb] += count
        result["requests"] = requests
        result["requests_per_object"] = round(requests / max(self.objects, 1), 2)
        result["requests_by_verb"] = dict(by_verb.most_common())
        result["requests_by_resource"] = {f"{v} {p}": c for (v, p), c in counts.most_common(12)}

    def record_latencies(self, result: dict) -> None:
        """Per object, the parent's POST arriving -> its child's POST answered (emulator side)."""
        k8s = self.k8s
        latencies = {"FineTuneJob": [], "AdapterDeployment": []}
        for ns, name in self.jobs:
            created = k8s.children["FineTuneJob", ns, name].get(first_child(name))
            if created is not None and ("finetunejobs", ns, name) in k8s.parent_seen:
                latencies["FineTuneJob"].append(created - k8s.parent_seen["finetunejobs", ns, name])
        for ns, name, _ in self.adeps:
            have = k8s.children["AdapterDeployment", ns, name]
            times = [t for c, t in have.items() if c.startswith("Deployment/")
                     or c == f"ConfigMap/{serving.desired_config_map_name(name)}"]
            if len(times) >= 2 and ("adapterdeployments", ns, name) in k8s.parent_seen:
                latencies["AdapterDeployment"].append(max(times) - k8s.parent_seen["adapterdeployments", ns, name])
        for kind, values in latencies.items():
            result[f"{kind}_child_latency_p50_s"] = _round(percentile(values, 0.5))
            result[f"{kind}_child_latency_p99_s"] = _round(percentile(values, 0.99))

    async def settle(self, seconds: float, result: dict) -> None:
        """Steady state: the per-object timers alone."""
        before, cpu0, t1 = sum(self.k8s.counts.values()), sum(self.proc.cpu_times()[:2]), time.monotonic()
        me0 = cpu_seconds(self.me)
        await asyncio.sleep(seconds)
        if self.process.returncode is None:
            elapsed = time.monotonic() - t1
            result["settle_s"] = round(elapsed, 1)
            result["settle_requests_per_s"] = round((sum(self.k8s.counts.values()) - before) / elapsed, 1)
            result["settle_operator_cpu_share"] = round((sum(self.proc.cpu_times()[:2]) - cpu0) / elapsed, 2)
            result["settle_emulator_cpu_share"] = round((cpu_seconds(self.me) - me0) / elapsed, 2)
            result["rss_settled_mib"] = round(proc_status(self.process.pid)["VmRSS"] / 1024, 1)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


COLUMNS = [("jobs", "FTJ"), ("adapterdeployments", "ADep"), ("create_s", "create s"), ("converge_s", "converge s"),
           ("converge_s_per_object", "s/obj"), ("FineTuneJob_child_latency_p50_s", "FTJ->PJ p50"),
           ("FineTuneJob_child_latency_p99_s", "FTJ->PJ p99"), ("AdapterDeployment_child_latency_p99_s", "AD->Dep p99"),
           ("FineTuneJob_reconcile_p50_s", "rec p50"), ("FineTuneJob_reconcile_p99_s", "rec p99"),
           ("FineTuneJob_reconciles", "FTJ passes"),
           ("settled_AdapterDeployment_reconcile_p50_s", "AD rec p50"),
           ("settled_AdapterDeployment_reconcile_p99_s", "AD rec p99"),
           ("rss_idle_mib", "RSS idle"), ("rss_peak_mib", "RSS peak"),
           ("rss_after_mib", "RSS after"), ("rss_kib_per_object", "KiB/obj"), ("cpu_s", "CPU s"),
           ("emulator_cpu_s", "emu CPU s"),
           ("requests", "requests"), ("requests_per_object", "req/obj"), ("settle_requests_per_s", "settle req/s"),
           ("settle_operator_cpu_share", "settle CPU"), ("settle_emulator_cpu_share", "settle emu CPU")]


def table(results: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for result in results:
        lines.append("| " + " | ".join("" if result.get(key) is None else str(result.get(key))
                                       for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def ratios(results: list[dict]) -> dict | None:
    if len(results) < 2:
        return None
    small, large = results[0], results[-1]
    out = {"sizes": [small["jobs"], large["jobs"]], "objects": round(large["jobs"] / max(small["jobs"], 1), 2)}
    extra = large["jobs"] + large["adapterdeployments"] - small["jobs"] - small["adapterdeployments"]
    if extra > 0 and large.get("rss_after_mib") and small.get("rss_after_mib"):  # marginal memory per object
        out["marginal_rss_kib_per_object"] = round((large["rss_after_mib"] - small["rss_after_mib"]) * 1024 / extra, 1)
    for key in ("converge_s", "converge_s_per_object", "cpu_s", "emulator_cpu_s", "requests", "requests_per_object",
                "rss_after_mib",
                "rss_peak_mib", "FineTuneJob_child_latency_p50_s", "FineTuneJob_child_latency_p99_s",
                "FineTuneJob_reconcile_p50_s", "FineTuneJob_reconcile_p99_s", "settle_requests_per_s"):
        if small.get(key) and large.get(key) is not None:
            out[key] = round(large[key] / small[key], 2)
    return out


async def main_async(args) -> int:
    CountingEmulator.forget_served = not args.keep_history
    work = Path(tempfile.mkdtemp(prefix="kubetune-scale-"))
    weed = start_s3(work)
    keys = (seaweedfs.ACCESS_KEY, seaweedfs.SECRET_KEY)
    results = []
    try:
        for size in args.sizes:
            n_adeps = max(1, size // 10) if args.adeps is None else args.adeps
            print(f"size {size} FineTuneJobs + {n_adeps} AdapterDeployments ... (load {load_average()})", flush=True)
            result = await run_size(size, n_adeps, args, weed.server.endpoint, keys, work, weed.process.pid)
            results.append(result)
            print(json.dumps(result), flush=True)
            if not result["converged"]:
                break
    finally:
        weed.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report = {"settings": {"sizes": args.sizes, "namespaces": args.namespaces, "concurrency": args.concurrency,
                           "settle_s": args.settle, "timeout_s": args.timeout, "cpus": os.cpu_count(),
                           "kmock_keeps_history": args.keep_history, "all_namespaces": args.all_namespaces},
              "results": results, "ratio_largest_vs_smallest": ratios(results)}
    print(table(results))
    if report["ratio_largest_vs_smallest"]:
        print("ratio largest/smallest:", json.dumps(report["ratio_largest_vs_smallest"]))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    ok = len(results) == len(args.sizes) and all(
        r["converged"] and r["operator_exit"] == 0 and not r["duplicate_child_creates"] for r in results)
    if not ok:
        print("NOT CONVERGED (or the operator died, or a child was created twice)", file=sys.stderr)
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000], help="FineTuneJobs per run")
    parser.add_argument("--adeps", type=int, default=None, help="AdapterDeployments per run (default: size/10, >= 1)")
    parser.add_argument("--namespaces", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=16, help="creates in flight")
    parser.add_argument("--timeout", type=float, default=900, help="seconds a size may take to converge")
    parser.add_argument("--settle", type=float, default=20, help="seconds to measure the steady load after")
    parser.add_argument("--all-namespaces", action="store_true",
                        help="run the operator with --all-namespaces instead of one --namespace per namespace")
    parser.add_argument("--keep-history", action="store_true",
                        help="let kmock keep every request (its routing then costs O(requests so far) per request)")
    parser.add_argument("--out", help="write the JSON report here")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (operator logs)")
    args = parser.parse_args()
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())

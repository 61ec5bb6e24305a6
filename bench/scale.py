"""Scale: N FineTuneJobs and N/10 AdapterDeployments against the emulator, the operator as a real process.

    .venv/bin/python bench/scale.py --out /tmp/scale.json            # 1,000 / 3,000 / 10,000: the issue 19 run
    .venv/bin/python bench/scale.py --sizes 100 300 --out /tmp/s.json  # a few minutes
    .venv/bin/python bench/scale.py --sizes 5 --probes 3 --settle 1   # smoke, < 40 s
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
import psutil  # noqa: E402
import yaml  # noqa: E402

import scale_report as report_  # noqa: E402  (bench/, on sys.path)
from common import load_average  # noqa: E402
from kubetune.clients import kube  # noqa: E402
from kubetune_operator.controllers.adapterdeployment import ADAPTERDEPLOYMENTS  # noqa: E402
from kubetune_testing import operator_process, seaweedfs  # noqa: E402
from kubetune_testing.factories import adapterdeployment, finetunejob  # noqa: E402
from scale_emulator import EmulatorProcess  # noqa: E402


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
        p50, count = report_.histogram_quantile(text, metric, 0.5)
        p99, _ = report_.histogram_quantile(text, metric, 0.99)
        result[f"{prefix}{kind}_reconcile_p50_s"] = report_.rounded(p50)
        result[f"{prefix}{kind}_reconcile_p99_s"] = report_.rounded(p99)
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
    with open(work / f"emulator-{n_jobs}.log", "wb") as emulator_log:
        emulator = await EmulatorProcess.start(emulator_log, args.keep_history, args.keep_versions)
    client = kube.KubeClient(emulator.url, timeout=120)
    try:
        await populate(emulator, client, namespaces, keys)
        kubeconfig = write_kubeconfig(work / f"kubeconfig-{n_jobs}", emulator.url)
        log_path = work / f"operator-{n_jobs}.log"
        with open(log_path, "wb") as log_file:
            operator = await start_operator(args, namespaces, kubeconfig, s3_endpoint, log_file)
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        try:
            await wait_healthy(operator, log_path)
            run = Measured(emulator, operator.process, s3_pid, jobs, adeps)
            await run.measure(client, args, s3_endpoint, namespaces, result)
            if operator.process.returncode is None:
                await scrape(session, operator.metrics_port, result, "", work / f"metrics-{n_jobs}.txt")
            if args.settle > 0 and operator.process.returncode is None:
                await run.settle(args.settle, n_jobs, result)
                if operator.process.returncode is None:
                    await scrape(session, operator.metrics_port, result, "settled_",
                                 work / f"metrics-{n_jobs}-settled.txt")
            # the others wait (Pending, their periodic passes due): after the settle, so that the probes
            # measure the create path beside the steady load, not beside the burst's trailing events
            if args.probes > 0 and result["converged"] and operator.process.returncode is None:
                await run.probe(client, args, s3_endpoint, namespaces, result)
            state = await emulator.call("state")
            result["pytorchjobs"], result["duplicate_child_creates"] = state["pytorchjobs"], state["duplicates"]
            result["emulator_objects"], result["emulator_object_versions"] = state["objects"], state["object_versions"]
            result.update(run.bench_memory())
            result["load_after"] = load_average()
        finally:
            await session.close()
            await operator.stop(grace=60)
        result["operator_exit"] = operator.process.returncode
        result.update(log_counts(log_path))
    finally:
        await client.close()
        await emulator.stop()
    return result


async def populate(emulator: EmulatorProcess, client: kube.KubeClient, namespaces: list[str],
                   keys: tuple[str, str]) -> None:
    """The namespaces, each with the `s3-creds` Secret the jobs name."""
    await emulator.call("namespaces", names=namespaces)
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


class CpuClock:
    """CPU seconds of each process of a run, and of the whole machine (`busy`: every core's non-idle time,
    so that other engineers' processes show as `others`)."""

    def __init__(self, processes: dict[str, psutil.Process]):
        self.processes, self.last = processes, {}

    def sample(self) -> dict[str, float]:
        for name, process in self.processes.items():
            try:
                self.last[name] = cpu_seconds(process)
            except psutil.NoSuchProcess:  # it died: its last figure stays
                self.last.setdefault(name, 0.0)
        machine = psutil.cpu_times()
        self.last["busy"] = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0) - getattr(
            machine, "guest", 0.0) - getattr(machine, "guest_nice", 0.0)  # guest time is in user already
        return dict(self.last)


class Measured:
    """One size's run once the operator is up: the baselines taken before the creates, and what is
    measured from them."""

    def __init__(self, emulator: EmulatorProcess, process: asyncio.subprocess.Process, s3_pid: int,
                 jobs: list[tuple[str, str]], adeps: list[tuple[str, str, str]]):
        self.emulator, self.process, self.jobs, self.adeps = emulator, process, jobs, adeps
        self.proc = psutil.Process(process.pid)
        self.idle_rss = proc_status(process.pid)["VmRSS"]
        self.clock = CpuClock({"operator": self.proc, "emulator": psutil.Process(emulator.process.pid),
                               "client": psutil.Process(), "s3": psutil.Process(s3_pid)})

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    @property
    def objects(self) -> int:
        return len(self.jobs) + len(self.adeps)

    async def measure(self, client: kube.KubeClient, args, s3_endpoint: str, namespaces: list[str],
                      result: dict) -> None:
        """The bulk: create, converge, and what it cost."""
        await self.emulator.call("expect", set="bulk", jobs=self.jobs, adeps=self.adeps)
        counts_before, cpu_before = await self.emulator.requests(), self.clock.sample()
        t0 = time.monotonic()
        await self.converge(client, args, s3_endpoint, t0, result)
        cpu_after = self.clock.sample()
        wall = time.monotonic() - t0
        self.record_costs(result, counts_before, await self.emulator.requests(), cpu_before, cpu_after, wall)
        latencies = await self.emulator.call("latencies", set="bulk")
        if result["converged"] and latencies["last_child"] is not None:  # the last child, not when it was noticed
            result["converge_s"] = round(latencies["last_child"] - t0, 3)
        result["converge_s_per_object"] = round(result["converge_s"] / max(self.objects, 1), 5)
        record_latencies(latencies, "", result)

    async def converge(self, client: kube.KubeClient, args, s3_endpoint: str, t0: float, result: dict) -> None:
        """Create everything, as fast as the client can, and wait until every child exists."""
        semaphore = asyncio.Semaphore(args.concurrency)

        async def create(resource, doc):
            async with semaphore:
                await client.create(resource, doc)

        creations = [create(kube.FINETUNEJOBS, job_doc(name, ns, s3_endpoint)) for ns, name in self.jobs]
        creations += [create(ADAPTERDEPLOYMENTS, adep_doc(name, ns, job)) for ns, name, job in self.adeps]
        create_task = asyncio.gather(*creations)
        converged, missing = False, None
        while self.alive:
            await asyncio.sleep(0.25)
            if create_task.done() and "create_s" not in result:
                create_task.result()  # raises if a create failed
                result["create_s"] = round(time.monotonic() - t0, 3)
            missing = (await self.emulator.call("missing", set="bulk"))["missing"]
            if create_task.done() and missing == 0:
                converged = True
                break
            if time.monotonic() - t0 > args.timeout:
                break
        if not create_task.done():
            create_task.cancel()
        result["converged"], result["missing"] = converged, missing
        result["converge_s"] = round(time.monotonic() - t0, 3)

    def record_costs(self, result: dict, counts_before: collections.Counter, counts_after: collections.Counter,
                     cpu_before: dict, cpu_after: dict, wall: float) -> None:
        """CPU (seconds and cores, per process), memory and API requests of the bulk."""
        status = proc_status(self.process.pid) if self.alive else {}
        result["operator_alive"] = self.alive
        for name, key in (("operator", "cpu_s"), ("emulator", "emulator_cpu_s"), ("client", "client_cpu_s"),
                          ("s3", "s3_cpu_s"), ("busy", "machine_busy_cpu_s")):
            result[key] = round(cpu_after[name] - cpu_before[name], 2)
        result["converge_cores"] = report_.cpu_shares(cpu_before, cpu_after, wall)
        result["limited_by"] = report_.limited_by(result["converge_cores"], os.cpu_count() or 1)
        result["rss_idle_mib"] = round(self.idle_rss / 1024, 1)
        result["rss_peak_mib"] = round(status.get("VmHWM", 0) / 1024, 1)
        result["rss_after_mib"] = round(status.get("VmRSS", 0) / 1024, 1)
        result["rss_kib_per_object"] = round((status.get("VmRSS", self.idle_rss) - self.idle_rss)
                                             / max(self.objects, 1), 1)
        counts = counts_after - counts_before
        by_verb = collections.Counter()
        for (verb, _plural), count in counts.items():
            by_verb[verb] += count
        result["requests"] = sum(counts.values())
        result["requests_per_object"] = round(result["requests"] / max(self.objects, 1), 2)
        result["requests_by_verb"] = dict(by_verb.most_common())
        result["requests_by_resource"] = {f"{v} {p}": c for (v, p), c in counts.most_common(12)}

    async def probe(self, client: kube.KubeClient, args, s3_endpoint: str, namespaces: list[str],
                    result: dict) -> None:
        """With every bulk job waiting (its timers running), new FineTuneJobs at a steady rate, spread over
        the namespaces: how long the create path takes behind the timer load."""
        probes = [(namespaces[i % len(namespaces)], f"probe-{i}") for i in range(args.probes)]
        await self.emulator.call("expect", set="probes", jobs=probes)
        cpu_before, t0, creates = self.clock.sample(), time.monotonic(), []
        for index, (ns, name) in enumerate(probes):
            await asyncio.sleep(max(0.0, t0 + index / args.probe_rate - time.monotonic()))
            creates.append(asyncio.create_task(client.create(kube.FINETUNEJOBS, job_doc(name, ns, s3_endpoint))))
        await asyncio.gather(*creates)
        missing = len(probes)
        while self.alive and time.monotonic() - t0 < len(probes) / args.probe_rate + args.probe_timeout:
            if (missing := (await self.emulator.call("missing", set="probes"))["missing"]) == 0:
                break
            await asyncio.sleep(0.1)
        result["probes"], result["probe_missing"], result["probe_rate"] = len(probes), missing, args.probe_rate
        result["probe_s"] = round(time.monotonic() - t0, 2)
        result["probe_cores"] = report_.cpu_shares(cpu_before, self.clock.sample(), time.monotonic() - t0)
        record_latencies(await self.emulator.call("latencies", set="probes"), "probe_", result)

    async def settle(self, seconds: float, unfinished_jobs: int, result: dict) -> None:
        """Steady state: the per-object timers alone, per 1,000 unfinished (all Pending) jobs."""
        counts_before, cpu_before, t1 = await self.emulator.requests(), self.clock.sample(), time.monotonic()
        await asyncio.sleep(seconds)
        if not self.alive:
            return
        counts, elapsed = await self.emulator.requests() - counts_before, time.monotonic() - t1
        cores = report_.cpu_shares(cpu_before, self.clock.sample(), elapsed)
        per_1000 = 1000 / max(unfinished_jobs, 1)
        result["settle_s"], result["settle_unfinished_jobs"] = round(elapsed, 1), unfinished_jobs
        result["settle_requests_per_s"] = round(sum(counts.values()) / elapsed, 1)
        result["settle_requests_by_resource"] = {f"{verb} {plural}": round(count / elapsed, 2)
                                                 for (verb, plural), count in counts.most_common(8)}
        result["settle_cores"] = cores
        result["settle_operator_cpu_share"], result["settle_emulator_cpu_share"] = cores["operator"], cores["emulator"]
        result["settle_requests_per_s_per_1000_jobs"] = round(result["settle_requests_per_s"] * per_1000, 1)
        result["settle_operator_cores_per_1000_jobs"] = round(cores["operator"] * per_1000, 3)
        result["rss_settled_mib"] = round(proc_status(self.process.pid)["VmRSS"] / 1024, 1)
        result["rss_peak_mib"] = round(proc_status(self.process.pid)["VmHWM"] / 1024, 1)

    def bench_memory(self) -> dict:
        """Peak RSS of the emulator's process and of this one (the client), in MiB."""
        out = {}
        for name, pid in (("emulator", self.emulator.process.pid), ("client", os.getpid())):
            try:
                out[f"{name}_rss_peak_mib"] = round(proc_status(pid)["VmHWM"] / 1024, 1)
            except FileNotFoundError:
                out[f"{name}_rss_peak_mib"] = None
        return out


def record_latencies(latencies: dict, prefix: str, result: dict) -> None:
    """p50/p99 of the parent's POST arriving -> its child's POST answered (emulator side)."""
    for kind in ("FineTuneJob", "AdapterDeployment"):
        if latencies[kind] or kind == "FineTuneJob" or not prefix:
            result[f"{prefix}{kind}_child_latency_p50_s"] = report_.rounded(report_.percentile(latencies[kind], 0.5))
            result[f"{prefix}{kind}_child_latency_p99_s"] = report_.rounded(report_.percentile(latencies[kind], 0.99))


async def main_async(args) -> int:
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
    report_.add_slopes(results)
    report = {"settings": {"sizes": args.sizes, "namespaces": args.namespaces, "concurrency": args.concurrency,
                           "probes": args.probes, "probe_rate": args.probe_rate, "settle_s": args.settle,
                           "timeout_s": args.timeout, "cpus": os.cpu_count(),
                           "kmock_keeps_history": args.keep_history,
                           "kmock_keeps_versions": args.keep_versions, "all_namespaces": args.all_namespaces},
              "results": results, "ratio_largest_vs_smallest": report_.ratios(results)}
    print(report_.table(results))
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
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000, 10000], help="FineTuneJobs per run")
    parser.add_argument("--adeps", type=int, default=None, help="AdapterDeployments per run (default: size/10, >= 1)")
    parser.add_argument("--namespaces", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=16, help="creates in flight")
    parser.add_argument("--timeout", type=float, default=900, help="seconds a size may take to converge")
    parser.add_argument("--probes", type=int, default=50,
                        help="FineTuneJobs created after convergence, while the others wait (0: none)")
    parser.add_argument("--probe-rate", type=float, default=5.0, help="probe creates per second")
    parser.add_argument("--probe-timeout", type=float, default=120,
                        help="seconds the probes may take after the last is created")
    parser.add_argument("--settle", type=float, default=30,
                        help="seconds to measure the steady load after (30: one resync period of a Pending job)")
    parser.add_argument("--all-namespaces", action="store_true",
                        help="run the operator with --all-namespaces instead of one --namespace per namespace")
    parser.add_argument("--keep-history", action="store_true",
                        help="let kmock keep every request (its routing then costs O(requests so far) per request)")
    parser.add_argument("--keep-versions", action="store_true",
                        help="let kmock keep every version of every object (memory grows with every write)")
    parser.add_argument("--out", help="write the JSON report here")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (operator and emulator logs)")
    args = parser.parse_args()
    if args.probe_rate <= 0:
        parser.error(f"--probe-rate must be > 0 (got {args.probe_rate})")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())

"""bench/scale.py's arithmetic and report: quantiles, which process limited a run, the slopes between
sizes and the markdown table in BENCHMARKS.md's format. Pure functions of the results (column meanings:
BENCHMARKS.md, "Scale")."""

from __future__ import annotations

import itertools
import re

SATURATED_CORES = 0.9  # a single-threaded Python process near one full core cannot go faster
PROCESSES = ("operator", "emulator", "client", "s3")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


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


def cpu_shares(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
    """Cores each process (and the machine: `busy`; `others`: busy minus ours) used over `wall` seconds."""
    wall = max(wall, 1e-9)
    shares = {name: round((after[name] - before[name]) / wall, 2) for name in (*PROCESSES, "busy")}
    shares["others"] = round(max(0.0, shares["busy"] - sum(shares[name] for name in PROCESSES)), 2)
    return shares


def limited_by(shares: dict[str, float], cpus: int) -> str:
    """The process that limited a run: the one at a saturated core, else the machine when its cores were
    all busy (other processes included), else none (the highest named)."""
    name = max(PROCESSES, key=lambda process: shares[process])
    if shares[name] >= SATURATED_CORES:
        return name
    if shares["busy"] >= SATURATED_CORES * cpus:
        return f"cores ({name} highest)"
    return f"none ({name} highest)"


def add_slopes(results: list[dict]) -> None:
    """Per size after the first: RSS per 1,000 added objects since the previous size, and requests per
    object relative to the smallest size."""
    for previous, result in itertools.pairwise(results):
        added = objects(result) - objects(previous)
        if added > 0 and result.get("rss_after_mib") and previous.get("rss_after_mib"):
            result["rss_mib_per_1000_objects"] = round((result["rss_after_mib"] - previous["rss_after_mib"])
                                                       * 1000 / added, 2)
    if results and results[0].get("requests_per_object"):
        for result in results:
            if result.get("requests_per_object") is not None:
                result["requests_per_object_vs_smallest"] = round(
                    result["requests_per_object"] / results[0]["requests_per_object"], 2)


def objects(result: dict) -> int:
    return result["jobs"] + result["adapterdeployments"]


def ratios(results: list[dict]) -> dict | None:
    if len(results) < 2:
        return None
    small, large = results[0], results[-1]
    out = {"sizes": [small["jobs"], large["jobs"]], "objects": round(large["jobs"] / max(small["jobs"], 1), 2)}
    extra = objects(large) - objects(small)
    if extra > 0 and large.get("rss_after_mib") and small.get("rss_after_mib"):  # marginal memory per object
        out["marginal_rss_kib_per_object"] = round((large["rss_after_mib"] - small["rss_after_mib"]) * 1024 / extra, 1)
    for key in ("converge_s", "converge_s_per_object", "cpu_s", "emulator_cpu_s", "requests", "requests_per_object",
                "rss_after_mib", "rss_peak_mib", "FineTuneJob_child_latency_p50_s", "FineTuneJob_child_latency_p99_s",
                "probe_FineTuneJob_child_latency_p50_s", "probe_FineTuneJob_child_latency_p99_s",
                "FineTuneJob_reconcile_p50_s", "FineTuneJob_reconcile_p99_s", "settle_requests_per_s",
                "settle_requests_per_s_per_1000_jobs", "settle_operator_cores_per_1000_jobs"):
        if small.get(key) and large.get(key) is not None:
            out[key] = round(large[key] / small[key], 2)
    return out


def _pair(result: dict, first: str, second: str, sep: str = " / ") -> str:
    return sep.join("-" if result.get(key) is None else f"{result[key]:g}" for key in (first, second))


def _row(result: dict) -> list[str]:
    shares = result.get("converge_cores") or {}
    probes = f"{_pair(result, 'probe_FineTuneJob_child_latency_p50_s', 'probe_FineTuneJob_child_latency_p99_s')}"
    if result.get("probes"):
        probes += f" ({result['probes'] - result.get('probe_missing', 0)} of {result['probes']})"
    converge = f"**{result['converge_s']:g}**" if result.get("converged") else (
        f"**not in {result['converge_s']:g} s** ({result.get('missing')} children missing)")
    return [
        f"{result['jobs']:,} + {result['adapterdeployments']:,}", converge,
        _pair(result, "FineTuneJob_child_latency_p50_s", "FineTuneJob_child_latency_p99_s"), probes,
        _pair(result, "AdapterDeployment_child_latency_p50_s", "AdapterDeployment_child_latency_p99_s"),
        _pair(result, "FineTuneJob_reconcile_p50_s", "FineTuneJob_reconcile_p99_s"),
        " / ".join(f"{shares[name]:g}" if name in shares else "-" for name in (*PROCESSES, "others")),
        result.get("limited_by") or "-",
        " / ".join(f"{result[key]:g}" if result.get(key) is not None else "-"
                   for key in ("rss_idle_mib", "rss_peak_mib", "rss_after_mib")),
        "-" if result.get("rss_mib_per_1000_objects") is None else f"{result['rss_mib_per_1000_objects']:g}",
        f"{result.get('requests_per_object', '-')} (x{result.get('requests_per_object_vs_smallest', '-')})",
        _pair(result, "settle_requests_per_s_per_1000_jobs", "settle_operator_cores_per_1000_jobs", ", "),
    ]


HEADER = ["FineTuneJobs + ADeps", "converge s", "FTJ -> PyTorchJob p50 / p99 s (bulk)",
          "FTJ -> PyTorchJob p50 / p99 s while the others wait (probes)", "ADep -> children p50 / p99 s",
          "FTJ reconcile p50 / p99 s", "cores operator / emulator / client / S3 / others", "limited by",
          "operator RSS idle / peak / after MiB", "RSS MiB per 1,000 objects", "requests per object (x smallest)",
          "settle per 1,000 unfinished jobs: req/s, operator cores"]


def table(results: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_row(result)) + " |" for result in results]
    return "\n".join(lines)

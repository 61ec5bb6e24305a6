"""Canary analysis (pure): compare a canary version against the stable one over a window.

The agents report cumulative per-version counters (`serving.VersionMetrics`) on their Pods. A window
is the difference between the sums over pods now and a snapshot taken when the analysis step
started; an agent that restarted since (its counters began again) contributes its whole current
counters instead of a negative difference.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubetune.api import serving

PASS, FAIL, WAIT = "Pass", "Fail", "Wait"


@dataclass(frozen=True)
class Window:
    requests: int = 0
    errors: int = 0
    latency_buckets: tuple[int, ...] = ()
    confidence_sum: float = 0.0
    confidence_count: int = 0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def mean_confidence(self) -> float | None:
        return self.confidence_sum / self.confidence_count if self.confidence_count else None

    def latency_quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding the q-quantile (Prometheus' histogram_quantile, without
        interpolation: conservative). None without requests; +Inf bucket -> the largest finite bound."""
        total = sum(self.latency_buckets)
        if not total:
            return None
        rank = q * total
        seen = 0
        for bound, count in zip((*serving.LATENCY_BUCKETS, serving.LATENCY_BUCKETS[-1]), self.latency_buckets,
                                strict=False):
            seen += count
            if seen >= rank:
                return bound
        return serving.LATENCY_BUCKETS[-1]


def snapshot(reports: dict[str, dict], version: str) -> dict[str, dict]:
    """Per-pod counters of `version` now: {pod: {"started", "requests", ...}} (stored in status)."""
    out = {}
    for pod, report in reports.items():
        metrics = (report.get("metrics") or {}).get(version)
        if metrics:
            out[pod] = {"started": report.get("started"), **metrics}
    return out


def window(reports: dict[str, dict], version: str, baseline: dict[str, dict]) -> Window:
    """Counters of `version` since `baseline` (a `snapshot`), summed over pods."""
    requests = errors = confidence_count = 0
    confidence_sum = 0.0
    buckets = [0] * (len(serving.LATENCY_BUCKETS) + 1)
    for pod, report in reports.items():
        now = (report.get("metrics") or {}).get(version)
        if not now:
            continue
        before = baseline.get(pod)
        if before is None or before.get("started") != report.get("started"):
            before = {}  # new pod, or its agent restarted: everything it counted is in the window
        requests += max(0, now.get("requests", 0) - before.get("requests", 0))
        errors += max(0, now.get("errors", 0) - before.get("errors", 0))
        confidence_sum += max(0.0, now.get("confidence_sum", 0.0) - before.get("confidence_sum", 0.0))
        confidence_count += max(0, now.get("confidence_count", 0) - before.get("confidence_count", 0))
        old = before.get("latency_buckets") or [0] * len(buckets)
        for i, count in enumerate(now.get("latency_buckets") or []):
            if i < len(buckets):
                buckets[i] += max(0, count - (old[i] if i < len(old) else 0))
    return Window(requests, errors, tuple(buckets), confidence_sum, confidence_count)


@dataclass(frozen=True)
class Verdict:
    outcome: str  # Pass | Fail | Wait
    metric: str = ""  # the metric that failed (error-rate, latency-p95, confidence)
    message: str = ""


def judge(canary: Window, stable: Window, thresholds: dict, elapsed_seconds: float) -> Verdict:
    """The analysis step's verdict. Waits until the window has passed and the canary served
    `minRequests`; a failing metric fails at once (no need to wait out the window to roll back)."""
    min_requests = int(thresholds.get("minRequests", 100))
    if canary.requests >= min_requests:
        increase, limit = canary.error_rate - stable.error_rate, thresholds.get("maxErrorRateIncrease", 0.01)
        if increase > limit:
            return Verdict(FAIL, "error-rate", f"canary error rate {canary.error_rate:.3f} vs stable "
                           f"{stable.error_rate:.3f} (+{increase:.3f} > {limit})")
        canary_p95, stable_p95 = canary.latency_quantile(0.95), stable.latency_quantile(0.95)
        ratio_limit = thresholds.get("maxLatencyRatio", 1.5)
        if canary_p95 is not None and stable_p95 and canary_p95 / stable_p95 > ratio_limit:
            return Verdict(FAIL, "latency-p95", f"canary p95 latency {canary_p95:g}s vs stable {stable_p95:g}s "
                           f"(x{canary_p95 / stable_p95:.2f} > x{ratio_limit})")
        c_conf, s_conf = canary.mean_confidence, stable.mean_confidence
        drop_limit = thresholds.get("maxConfidenceDrop", 0.05)
        if c_conf is not None and s_conf is not None and s_conf - c_conf > drop_limit:
            return Verdict(FAIL, "confidence", f"canary mean confidence {c_conf:.3f} vs stable {s_conf:.3f} "
                           f"(-{s_conf - c_conf:.3f} > {drop_limit})")
    window_seconds = thresholds.get("windowSeconds", 300)
    if elapsed_seconds < window_seconds or canary.requests < min_requests:
        return Verdict(WAIT, message=f"{canary.requests}/{min_requests} canary requests, "
                       f"{int(elapsed_seconds)}/{window_seconds}s of the window")
    return Verdict(PASS, message=f"canary error rate {canary.error_rate:.3f} (stable {stable.error_rate:.3f}) over "
                   f"{canary.requests} requests")

"""The agent's measurements: per-version counters for its report and their Prometheus twins."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary

from kubetune.api import serving
from kubetune_agent import plan


class Telemetry:
    """Per-version cumulative counters (for the report) and their Prometheus twins (for /metrics), in a
    registry of this agent's own."""

    def __init__(self):
        self.registry = CollectorRegistry()
        labels = ["alias", "version"]
        self.requests = Counter("kubetune_agent_requests", "Requests routed to a version (any status).", labels,
                                registry=self.registry)
        self.errors = Counter("kubetune_agent_errors", "Routed requests that failed: engine status >= 500, "
                              "engine unreachable, or the version missing in the engine.", labels,
                              registry=self.registry)
        self.latency = Histogram("kubetune_agent_request_seconds", "Time from forwarding a request to the end of "
                                 "the engine's response.", labels, buckets=serving.LATENCY_BUCKETS,
                                 registry=self.registry)
        self.confidence = Summary("kubetune_agent_confidence", "Confidence of answers: /classify: the top class "
                                  "probability per input; completions and chats with logprobs (asked for on "
                                  "sampled requests): mean top-1 token probability per choice.", labels,
                                  registry=self.registry)
        self.entropy = Summary("kubetune_agent_entropy", "Entropy (nats) of answers, alike with the confidence: "
                               "/classify: of the class probabilities per input; generation: mean entropy of the "
                               "top-5 next-token distribution per choice.", labels, registry=self.registry)
        self.rejected = Counter("kubetune_agent_rejected", "Requests not routed to any version (bad request, "
                                "unknown or foreign model, nothing loaded).", ["code"], registry=self.registry)
        self.loaded = Gauge("kubetune_agent_loaded", "1 when the version is loaded in the engine, 0 when desired "
                            "and not (yet) loaded.", ["version"], registry=self.registry)
        self.engine_ready = Gauge("kubetune_agent_engine_ready", "1 when the engine answers /health.",
                                  registry=self.registry)
        self.sync_errors = Counter("kubetune_agent_sync_errors", "Failures of the sync loop, the report and the "
                                   "sampler.", ["reason"], registry=self.registry)
        self.samples = Counter("kubetune_agent_samples", "Sampled request/response records.", ["outcome"],
                               registry=self.registry)
        self.versions: dict[str, serving.VersionMetrics] = {}

    def observe(self, alias: str, version: str, seconds: float, error: bool,
                scores: list[tuple[float, float]]) -> None:
        """One routed request and the (confidence, entropy) scores of its answer (`plan.scores`)."""
        plan.record(self.versions.setdefault(version, serving.VersionMetrics()), seconds, error,
                    [confidence for confidence, _ in scores])
        self.requests.labels(alias, version).inc()
        if error:
            self.errors.labels(alias, version).inc()
        self.latency.labels(alias, version).observe(seconds)
        for confidence, entropy in scores:
            self.confidence.labels(alias, version).observe(confidence)
            self.entropy.labels(alias, version).observe(entropy)

    def set_loaded(self, desired: set[str], loaded: set[str]) -> None:
        self.loaded.clear()
        for name in desired | loaded:
            self.loaded.labels(name).set(1 if name in loaded else 0)

"""The serving contracts, shared by the operator, the agent and the CPU engine (no I/O).

`DesiredState` (operator -> agent, ConfigMap `<adep>-desired`), `AgentReport` (agent -> operator, Pod
annotation `kubetune.io/agent-report`), the inference paths and the served names
`<namespace>/<adapter>@<digest12>`. The engines' LoRA admin APIs are in `kubetune.runtimes`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

DESIRED_API = "kubetune.io/serving-desired/v1"
REPORT_API = "kubetune.io/agent-report/v1"
DESIRED_KEY = "desired.json"
ANNOTATION_REPORT = "kubetune.io/agent-report"
LABEL_ADAPTERDEPLOYMENT = "kubetune.io/adapterdeployment"
# On the desired state and agent RBAC the operator writes into another namespace (cluster-wide rollout):
# the AdapterDeployment's own namespace, as ownerReferences cannot cross namespaces
LABEL_HOME_NAMESPACE = "kubetune.io/adapterdeployment-namespace"

# Inference paths, the same on the agent and on every engine (the control paths: kubetune.runtimes)
ENGINE_COMPLETIONS = "/v1/completions"
ENGINE_CHAT = "/v1/chat/completions"
ENGINE_CLASSIFY = "/classify"

# Latency histogram bucket bounds (seconds) of the agent's per-version metrics
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def desired_config_map_name(adapterdeployment: str, home: str | None = None) -> str:
    """`<adep>-desired` in the AdapterDeployment's namespace; `<home>.<adep>-desired` in a namespace it reaches
    cluster-wide, so it never collides with a local AdapterDeployment of the same name."""
    return f"{home}.{adapterdeployment}-desired" if home else f"{adapterdeployment}-desired"


def alias_name(namespace: str, adapter: str) -> str:
    return f"{namespace}/{adapter}"


def version_name(namespace: str, adapter: str, digest: str) -> str:
    return f"{alias_name(namespace, adapter)}@{digest.partition(':')[2][:12]}"


def qualify(alias: str, namespace: str) -> str:
    """What a client asked for, as an alias: a bare name is in the agent's own namespace."""
    return alias if "/" in alias else alias_name(namespace, alias)


@dataclass(frozen=True)
class Version:
    name: str  # served name, see `version_name`
    digest: str  # sha256:HEX of the adapter (manifest digest)
    manifest_uri: str  # s3://.../manifest.json (file:// in local mode)
    weight: int  # percent of the alias's traffic
    role: str = "stable"  # stable | canary


@dataclass(frozen=True)
class AliasState:
    alias: str  # <namespace>/<adapter name>
    versions: list[Version]


@dataclass(frozen=True)
class DesiredState:
    generation: int  # bumps on every change the operator makes
    adapters: list[AliasState] = field(default_factory=list)
    sampling_rate: float = 0.0
    sampling_uri: str | None = None  # prefix for sampled request/response records (JSON lines)
    api: str = DESIRED_API

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DesiredState:
        raw = json.loads(text)
        if raw.get("api") != DESIRED_API:
            raise ValueError(f"desired state api {raw.get('api')!r} is not {DESIRED_API!r}")
        adapters = [AliasState(alias=a["alias"], versions=[Version(**v) for v in a["versions"]])
                    for a in raw.get("adapters", [])]
        return cls(generation=int(raw["generation"]), adapters=adapters,
                   sampling_rate=float(raw.get("sampling_rate", 0.0)), sampling_uri=raw.get("sampling_uri"))

    def versions(self) -> dict[str, Version]:
        return {v.name: v for a in self.adapters for v in a.versions}


@dataclass
class VersionMetrics:
    """Cumulative counters of one served version since the agent started (Prometheus-style)."""

    requests: int = 0
    errors: int = 0
    latency_sum: float = 0.0
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))  # last: +Inf
    confidence_sum: float = 0.0
    confidence_count: int = 0


@dataclass
class AgentReport:
    generation: int  # the desired state's generation this report reflects (-1: none read yet)
    engine_ready: bool
    loaded: dict[str, str]  # served version name -> digest, as the engine has it loaded right now
    errors: dict[str, dict]  # version name -> {"reason", "message"} (refused or failed to load)
    metrics: dict[str, VersionMetrics]
    started: str  # RFC 3339: when the agent started (counters restart with it)
    updated: str
    api: str = REPORT_API

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AgentReport:
        raw = json.loads(text)
        if raw.get("api") != REPORT_API:
            raise ValueError(f"agent report api {raw.get('api')!r} is not {REPORT_API!r}")
        return cls(generation=int(raw["generation"]), engine_ready=bool(raw["engine_ready"]),
                   loaded=dict(raw.get("loaded", {})), errors=dict(raw.get("errors", {})),
                   metrics={k: VersionMetrics(**v) for k, v in raw.get("metrics", {}).items()},
                   started=raw["started"], updated=raw["updated"])

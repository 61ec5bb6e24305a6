"""The user docs stay true to the code (docs/testing.md, Docs checks).

(a) every metric named in docs/observability.md is exported, and every exported one documented;
(b) every failure reason, Warning Event and drift decision the code gives is in docs/troubleshooting.md.
Reasons are read from the source by anchored patterns, so a refactor of how they are written fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase

REPO = Path(__file__).resolve().parents[2]
OPERATOR = REPO / "operator"  # the contracts (kubetune), the control plane and the agent
CONTRACTS, CONTROL_PLANE, AGENT = OPERATOR / "kubetune", OPERATOR / "kubetune_operator", OPERATOR / "kubetune_agent"
TRAINER = REPO / "trainer_image" / "kubetune_trainer"
DOCS = REPO / "docs"

# `kubetune_...` words in the docs that are module names, not metrics.
NOT_METRICS = {"kubetune_trainer", "kubetune_engine", "kubetune_operator", "kubetune_agent"}


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


# --- (a) metrics -----------------------------------------------------------------------------------------


def _families(metrics: list[MetricWrapperBase]) -> dict[str, str]:
    """Family name -> type ("counter", "histogram", ...), as the client library describes them."""
    out = {}
    for metric in metrics:
        for family in metric.describe():
            out[family.name] = family.type
    return out


def exported_metrics() -> dict[str, str]:
    from kubetune_agent.telemetry import Telemetry
    from kubetune_operator.controllers import metrics as operator_metrics

    operator = [m for m in vars(operator_metrics).values() if isinstance(m, MetricWrapperBase)]
    agent = [m for m in vars(Telemetry()).values() if isinstance(m, MetricWrapperBase)]
    return _families(operator + agent)


def exposed_names(name: str, kind: str) -> set[str]:
    """The names a family shows up under in Prometheus text (and may be written as in the docs)."""
    return {
        "counter": {f"{name}_total"},
        "gauge": {name},
        "histogram": {name, f"{name}_bucket", f"{name}_sum", f"{name}_count"},
        "summary": {name, f"{name}_sum", f"{name}_count"},
    }.get(kind, {name})


def documented_metric_names() -> set[str]:
    words = set(re.findall(r"\bkubetune_[a-z0-9_]*[a-z0-9]", _read(DOCS / "observability.md")))
    return words - NOT_METRICS


def defined_in_source() -> set[str]:
    """Metric names given to a prometheus_client constructor anywhere in the operator package (a metric
    defined outside the two modules imported above would otherwise escape the check)."""
    names = set()
    for path in OPERATOR.rglob("*.py"):
        for kind, name in re.findall(r"\b(Counter|Gauge|Histogram|Summary|Info|Enum)\(\s*\"(kubetune_[a-z0-9_]+)\"",
                                     _read(path)):
            names.add(name.removesuffix("_total") if kind == "Counter" else name)
    return names


def test_every_metric_defined_in_the_source_is_seen_by_this_test():
    assert defined_in_source() <= set(exported_metrics())


def test_every_documented_metric_is_exported():
    allowed = set().union(*(exposed_names(n, k) for n, k in exported_metrics().items()))
    unknown = documented_metric_names() - allowed
    assert not unknown, f"docs/observability.md names metrics nobody exports (or with a wrong suffix): {unknown}"


def test_every_exported_metric_is_documented():
    documented = documented_metric_names()
    missing = [n for n, k in exported_metrics().items() if not exposed_names(n, k) & documented]
    assert not missing, f"exported but not in docs/observability.md: {missing}"


# --- (b) reasons -----------------------------------------------------------------------------------------

# (file, pattern, anchor): every group of `pattern` in `file` is a failure reason; `anchor` must be among them.
REASON_SOURCES = [
    # FineTuneJob: status.fail(reason, ...) -> phase Failed, Failed=True, status.failure.reason, Warning Event
    (CONTROL_PLANE / "reconcile/finetunejob.py", r"\.fail\(\s*\"(\w+)\"", "TrainingJobLost"),
    (CONTROL_PLANE / "reconcile/stage_jobs.py", r"\.fail\(\s*\"(\w+)\"", "SweepFailed"),
    # Accepted=False
    (CONTROL_PLANE / "reconcile/finetunejob.py", r"condition\(\s*\"Accepted\",\s*False,\s*\"(\w+)\"",
     "InvalidSpecUpdate"),
    # a stage's (baseline, sweep) failure reasons, inside BaselineFailed / SweepFailed messages
    (CONTROL_PLANE / "reconcile/stage_jobs.py", r"_stage_failed\(\s*record,\s*\"(\w+)\"", "ResultMissing"),
    # the reason when the training workload's failure has none
    (CONTROL_PLANE / "reconcile/finetunejob.py", r"workload\.reason\s*or\s*\"(\w+)\"", "TrainingFailed"),
    # manifest verification problems: AdapterPublished=False / Failed=True / Validated=False
    (CONTRACTS / "api/manifest.py", r"ManifestProblem\(\s*\"(\w+)\"", "DigestMismatch"),
    (CONTRACTS / "clients/storage.py", r"ManifestProblem\(\s*\"(\w+)\"", "AdapterFileCorrupt"),
    # the trainer's own reasons (progress.json failure.reason -> the FineTuneJob's Failed reason)
    (TRAINER / "__main__.py", r"_report_failure\(\s*config,\s*\"(\w+)\"", "BadInput"),
    (TRAINER / "train.py", r"TrainingHalted\(\s*\"(\w+)\"", "NonFiniteLoss"),
    (TRAINER / "metrics.py", r"return\s+\"(\w+)\",", "LossSpike"),
    # AdapterDeployment Validated=False: an invalid spec, unresolvable sources, preflight refusals
    (CONTROL_PLANE / "controllers/adapterdeployment.py", r"\"Validated\",\s*False,\s*\"(\w+)\"", "InvalidSpec"),
    (CONTROL_PLANE / "controllers/adapterdeployment.py", r"problems=\(\(\s*\"(\w+)\"", "FineTuneJobNotReady"),
    (CONTROL_PLANE / "clients/sources.py", r"problems=\(\(\s*\"(\w+)\"", "StorageUnavailable"),
    (CONTROL_PLANE / "reconcile/adapterdeployment.py", r"problems=\(\(\s*\"(\w+)\"", "SourceUnresolved"),
    (CONTROL_PLANE / "reconcile/adapterdeployment.py", r"problems\.append\(\(\s*\"(\w+)\"", "RankTooHigh"),
    (CONTROL_PLANE / "reconcile/adapterdeployment.py", r"\(\s*\"([A-Z]\w+)\",\s*f\"adapters\[", "AdapterUnsupported"),
    (CONTROL_PLANE / "clients/sources.py", r"AdapterConfigProblem\(\s*\"(\w+)\"", "NotAnAdapter"),
    # cluster-wide rollout: why a namespace refuses (status.namespaces[].reason), its Warning Event
    (CONTROL_PLANE / "reconcile/clusterwide.py", r"\(\"([A-Z][A-Za-z]+)\",\s*(?:f\"|message)", "NotAccepted"),
    (CONTROL_PLANE / "reconcile/clusterwide.py", r"\"Warning\",\s*\"(\w+)\"", "NamespaceRefused"),
    # AdapterDeployment Degraded=True: a rollback's reason, agent errors
    (CONTROL_PLANE / "reconcile/adapterdeployment.py", r"\"rolledBack\"\]\s*=\s*\{[^}]*\"reason\":\s*\"(\w+)\"",
     "AnalysisFailed"),
    (CONTROL_PLANE / "reconcile/adapterdeployment.py", r"\"Degraded\",\s*True,\s*\"(\w+)\"", "AgentErrors"),
    # the agents' per-version error reasons (status.adapters[].podErrors, the AgentErrors message)
    (AGENT / "plan.py", r"^[A-Z_]+\s*=\s*\"([A-Z]\w+)\"\s*$", "LoadFailed"),
    # Secrets or keys the pods reference that do not exist (SecretsFound=False, a Warning Event)
    (CONTROL_PLANE / "reconcile/secrets.py", r"^SECRET_\w+\s*=\s*\"(\w+)\"", "SecretNotFound"),
    # every Warning Event of the state machines
    (CONTROL_PLANE / "reconcile/stage_jobs.py", r"Event\(\s*\"Warning\",\s*\"(\w+)\"", "DataLeakage"),
    (CONTROL_PLANE / "reconcile/adapterdeployment.py", r"Event\(\s*\"Warning\",\s*\"(\w+)\"", "RolledBack"),
    # the drift loop: every decision and Event (it sets no condition), retrain outcomes, gate verdicts
    (CONTROL_PLANE / "reconcile/driftloop.py", r"(?:Event|decision)\(\s*\"(?:Warning|Normal)\",\s*\"(\w+)\"",
     "DriftDetected"),
    (CONTROL_PLANE / "reconcile/driftloop.py", r"\"(?:Warning|Normal)\",\s*\"(\w+)\",\s*(?:f?\"|\()",
     "InsufficientLabelledData"),
    (CONTROL_PLANE / "reconcile/driftloop.py", r"\"reason\":\s*\"(\w+)\"", "RetrainMissing"),
    (CONTROL_PLANE / "reconcile/driftloop.py", r"reason\s*=\s*\"(\w+)\"\s*if\b.*\belse\s*\"(\w+)\"", "RetrainSkipped"),
    (CONTROL_PLANE / "reconcile/driftloop.py", r"GateVerdict\(\s*(?:True|False),\s*\"(\w+)\"",
     "RegressesOnOriginalData"),
    (CONTROL_PLANE / "shell/drift.py", r"problem\s*=\s*\(\s*\"(\w+)\"", "DriftReferenceUnavailable"),
    (CONTROL_PLANE / "shell/drift.py", r"now,\s*\"(\w+)\",\s*str\(exc\)", "RetrainNotStarted"),
]

# Reasons that come from outside this repository's code but users see in the same places.
EXTERNAL_REASONS = {"PyTorchJobFailed"}  # the Kubeflow training operator's Failed reason of a PyTorchJob


def code_reasons() -> dict[str, set[str]]:
    """reason -> the files that set it."""
    found: dict[str, set[str]] = {}
    for path, pattern, anchor in REASON_SOURCES:
        matches = re.findall(pattern, _read(path), flags=re.MULTILINE)
        reasons = {r for m in matches for r in ((m,) if isinstance(m, str) else m) if r}
        assert anchor in reasons, (f"{path.relative_to(REPO)}: pattern {pattern!r} no longer finds {anchor!r}: "
                                   "update REASON_SOURCES to how the code sets reasons now")
        for reason in reasons:
            found.setdefault(reason, set()).add(str(path.relative_to(REPO)))
    return found


def test_reason_extraction_finds_the_known_failures():
    reasons = code_reasons()
    for reason in ("NonFiniteLoss", "BadInput", "DigestMismatch", "ManifestMissing", "SweepFailed", "BaselineFailed",
                   "InvalidSpec", "SourceNotAllowed", "BaseModelMismatch", "AnalysisFailed", "DownloadFailed",
                   "RetrainBudgetExhausted", "RetrainCoolingDown", "RetrainClusterCapReached", "CandidateRejected",
                   "RetrainFailed", "DriftAnalysisFailed"):
        assert reason in reasons, reason


@pytest.fixture(scope="module")
def troubleshooting() -> str:
    return _read(DOCS / "troubleshooting.md")


def test_every_failure_reason_is_in_troubleshooting(troubleshooting):
    documented = set(re.findall(r"`(\w+)`", troubleshooting))
    missing = {r: sorted(files) for r, files in code_reasons().items() if r not in documented}
    missing.update({r: ["(external)"] for r in EXTERNAL_REASONS if r not in documented})
    assert not missing, f"reasons not documented in docs/troubleshooting.md: {missing}"


# --- the chart's values table ------------------------------------------------------------------------------


def _value_keys(values: dict, prefix: str = "") -> set[str]:
    """Dotted keys of values.yaml down to the leaves; free-form maps (resources, empty maps) are leaves."""
    keys = set()
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and path != "resources":
            keys |= _value_keys(value, path + ".")
        else:
            keys.add(path)
    return keys


def _documented_values(readme: str) -> set[str]:
    """Keys in the first column of the README's values table; `.name` after `serviceAccount.create` means
    `serviceAccount.name`."""
    keys = set()
    for line in readme.splitlines():
        if not line.startswith("| `"):
            continue
        parent = ""
        for token in re.findall(r"`([^`]+)`", line.split("|")[1]):
            if token.startswith(".") and parent:
                keys.add(parent + token)
            else:
                keys.add(token)
                parent = token.rsplit(".", 1)[0] if "." in token else ""
    return keys


def test_chart_readme_documents_every_value():
    import yaml

    chart = REPO / "charts" / "kubetune"
    values = yaml.safe_load(_read(chart / "values.yaml"))
    missing = _value_keys(values) - _documented_values(_read(chart / "README.md"))
    assert not missing, f"charts/kubetune/values.yaml keys missing from the README's values table: {sorted(missing)}"

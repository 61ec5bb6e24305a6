"""Prometheus metrics of the operator (served on --metrics-port)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

RECONCILE_SECONDS = Histogram(
    "kubetune_finetunejob_reconcile_seconds",
    "Duration of one FineTuneJob reconcile pass (API reads, manifest check, writes).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RECONCILE_ERRORS = Counter("kubetune_finetunejob_reconcile_errors_total", "Reconciles that failed with an API error.")
CHILDREN_CREATED = Counter("kubetune_children_created_total", "Child objects created.", ["kind"])
PHASE_TRANSITIONS = Counter("kubetune_finetunejob_phase_transitions_total", "FineTuneJob phase changes.", ["phase"])
ADEP_RECONCILE_SECONDS = Histogram(
    "kubetune_adapterdeployment_reconcile_seconds",
    "Duration of one AdapterDeployment reconcile pass (sources, pod reports, writes).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
ADEP_RECONCILE_ERRORS = Counter("kubetune_adapterdeployment_reconcile_errors_total",
                                "AdapterDeployment reconciles that failed with an API error.")
DRIFT_DECISIONS = Counter("kubetune_drift_decisions_total",
                          "Drift-loop decisions by reason (WindowClean, WindowDrifted, DriftDetected, RetrainStarted, "
                          "CandidatePromoted, CandidateRejected, guards holding a retrain back...).", ["reason"])
STATUS_WRITES = Counter("kubetune_status_writes_total",
                        "Status writes by kind (FineTuneJob, AdapterDeployment) and result: written, or throttled "
                        "(only volatile fields such as training progress changed within --status-min-interval).",
                        ["kind", "result"])

"""The Kubeflow PyTorchJob backend: Master + (nodes-1) Workers, torchrun in each pod.

Rendering, reading its conditions into a `WorkloadStatus`, the suspend patch, its API resource and
what `kubetune local` needs to play it.
"""

from __future__ import annotations

from kubetune.api import jobconfig
from kubetune_operator.render import training as render

from . import kueue
from .workload import CREATED, FAILED, RESTARTING, RUNNING, SUCCEEDED, Backend, LocalLaunch, WorkloadStatus

API_VERSION = "kubeflow.org/v1"
KIND = "PyTorchJob"
CONTAINER_NAME = "pytorch"  # the training operator requires this name
# Conditions that mean its pods started at some point (the training operator keeps a condition listed with
# status False once it no longer holds): before any of them, no trainer has written anything.
_STARTED_CONDITIONS = frozenset({RUNNING, RESTARTING, SUCCEEDED, FAILED})


def _run_policy(spec: dict) -> dict:
    policy = spec.get("runPolicy", {})
    run_policy: dict = {
        "suspend": kueue.queueing(spec).suspend,
        "backoffLimit": policy.get("backoffLimit", 3),
        "cleanPodPolicy": "None",
    }
    for key in ("activeDeadlineSeconds", "ttlSecondsAfterFinished"):
        if key in policy:
            run_policy[key] = policy[key]
    # schedulingPolicy is for gang schedulers (Volcano, scheduler-plugins); a Kueue queue is a label
    priority_class = spec.get("scheduling", {}).get("priorityClassName")
    if priority_class:
        run_policy["schedulingPolicy"] = {"priorityClass": priority_class}
    return run_policy


def render_pytorchjob(job: dict, settings: render.RenderSettings, config_data: dict[str, str] | None = None,
                      stage: jobconfig.Stage | None = None) -> dict:
    """The PyTorchJob for a defaulted FineTuneJob's stage."""
    spec = job["spec"]
    stage = stage or jobconfig.Stage()
    nodes, per_node = render.node_layout(spec, stage)
    template = render.pod_template(job, settings, stage, CONTAINER_NAME)
    # ExitCode: 128-255 (signals, EXIT_RETRYABLE) are retried, bad input (EXIT_BAD_INPUT) is not.
    replica_specs = {"Master": {"replicas": 1, "restartPolicy": "ExitCode", "template": template}}
    if nodes > 1:
        replica_specs["Worker"] = {"replicas": nodes - 1, "restartPolicy": "ExitCode", "template": template}
    config_data = config_data if config_data is not None else render.config_map_data(job, stage)
    metadata = render.workload_metadata(job, stage, config_data)
    metadata["labels"].update(kueue.queueing(spec).labels)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": metadata,
        "spec": {
            "nprocPerNode": str(per_node),
            "runPolicy": _run_policy(spec),
            "pytorchReplicaSpecs": replica_specs,
        },
    }


def _true_condition(conditions: list[dict], kind: str) -> dict | None:
    return next((c for c in conditions if c.get("type") == kind and c.get("status") == "True"), None)


def _replica_counts(status: dict) -> dict:
    statuses = status.get("replicaStatuses") or {}
    return {
        replica: {k: int(v.get(k, 0) or 0) for k in ("active", "succeeded", "failed")}
        for replica, v in statuses.items()
        if isinstance(v, dict)
    }


def read_status(pytorchjob: dict) -> WorkloadStatus:
    """The PyTorchJob as the state machine sees it. Failed wins over Succeeded, Restarting over Running."""
    status = pytorchjob.get("status") or {}
    conditions = status.get("conditions") or []
    phase, current = CREATED, None
    for kind in (FAILED, SUCCEEDED, RESTARTING, RUNNING):
        current = _true_condition(conditions, kind)
        if current:
            phase = kind
            break
    replicas = _replica_counts(status)
    metadata = pytorchjob.get("metadata") or {}
    return WorkloadStatus(
        name=metadata.get("name", ""), kind=KIND, labels=dict(metadata.get("labels") or {}), phase=phase,
        started=any(c.get("type") in _STARTED_CONDITIONS for c in conditions),
        reason=(current or {}).get("reason") or "", message=(current or {}).get("message") or "",
        since=(current or {}).get("lastTransitionTime"), start_time=status.get("startTime"),
        completion_time=status.get("completionTime"), replicas=replicas,
        attempts=sum(replicas.get("Master", {}).values()), uid=metadata.get("uid") or "",
        suspended=bool(((pytorchjob.get("spec") or {}).get("runPolicy") or {}).get("suspend")))


def suspend_patch(suspend: bool) -> dict:
    return {"spec": {"runPolicy": {"suspend": suspend}}}


def local_launch(pytorchjob: dict) -> LocalLaunch:
    """Its pods' command and job config; the world is nprocPerNode x its pods (several nodes run as one)."""
    spec = pytorchjob["spec"]
    pod = spec["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    container = pod["containers"][0]
    pods = sum(int(r.get("replicas", 1)) for r in spec["pytorchReplicaSpecs"].values())
    config_map = next(v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v)
    return LocalLaunch(command=list(container["command"]), processes=int(spec["nprocPerNode"]) * pods,
                       config_map=config_map, backoff_limit=int(spec.get("runPolicy", {}).get("backoffLimit", 0) or 0))


BACKEND = Backend(kind=KIND, api_resource=("kubeflow.org", "v1", "pytorchjobs"), render=render_pytorchjob,
                  read_status=read_status, suspend_patch=suspend_patch, local_launch=local_launch)

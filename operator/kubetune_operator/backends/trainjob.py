"""The Kubeflow Trainer v2 backend: a TrainJob on a torch ClusterTrainingRuntime, torchrun in each node.

The trainer pod is the PyTorchJob backend's (render.pod_template), split over the TrainJob's `trainer`
and a runtime patch; status from its Complete/Failed/Suspended conditions and `jobsStatus`. Field
mapping and what a TrainJob cannot carry: docs/operations.md ("Training backends").
"""

from __future__ import annotations

from kubetune.api import jobconfig
from kubetune_operator.render import training as render

from . import kueue
from .workload import CREATED, FAILED, RUNNING, SUCCEEDED, Backend, LocalLaunch, WorkloadStatus

GROUP = "trainer.kubeflow.org"
API_VERSION = f"{GROUP}/v1alpha1"
KIND = "TrainJob"
DEFAULT_RUNTIME = "torch-distributed"  # manifests/base/runtimes/torch_distributed.yaml upstream
# The trainer's replicated job and container in Kubeflow's torch runtimes (pkg/constants: Node = "node").
NODE = "node"
PATCH_MANAGER = "kubetune.io/operator"  # runtimePatches are keyed by manager
# torch-distributed sets no backoffLimit on its Job, so Kubernetes' default applies (docs/operations.md).
JOB_BACKOFF_LIMIT = 6
COMPLETE, FAILED_CONDITION, SUSPENDED = "Complete", "Failed", "Suspended"
# Pod fields a runtime patch may set (trainjob_types.go PodSpecPatch) and a container's (ContainerPatch).
_POD_PATCH_FIELDS = ("serviceAccountName", "volumes", "securityContext", "nodeSelector", "affinity", "tolerations")
_CONTAINER_PATCH_FIELDS = ("volumeMounts", "securityContext")


def _trainer(container: dict, nodes: int, per_node: int) -> dict:
    trainer = {"image": container["image"], "command": list(container["command"]), "env": list(container["env"]),
               "numNodes": nodes, "numProcPerNode": per_node}
    if container.get("resources"):
        trainer["resourcesPerNode"] = container["resources"]
    return trainer


def _runtime_patch(template: dict) -> dict:
    """The pod settings the `trainer` field cannot carry, as a patch of the runtime's `node` job."""
    pod = template["spec"]
    container = pod["containers"][0]
    pod_patch = {key: pod[key] for key in _POD_PATCH_FIELDS if key in pod}
    pod_patch["containers"] = [{"name": NODE, **{key: container[key] for key in _CONTAINER_PATCH_FIELDS}}]
    job_patch = {"metadata": {"labels": dict(template["metadata"]["labels"])},
                 "spec": {"template": {"metadata": template["metadata"], "spec": pod_patch}}}
    return {"manager": PATCH_MANAGER,
            "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{"name": NODE, "template": job_patch}]}}}}


def render_trainjob(job: dict, settings: render.RenderSettings, config_data: dict[str, str] | None = None,
                    stage: jobconfig.Stage | None = None) -> dict:
    """The TrainJob for a defaulted FineTuneJob's stage. With a Kueue queue it is created suspended: Kueue
    admits it by unsuspending it."""
    spec = job["spec"]
    stage = stage or jobconfig.Stage()
    nodes, per_node = render.node_layout(spec, stage)
    template = render.pod_template(job, settings, stage, NODE)
    policy = spec.get("runPolicy", {})
    queueing = kueue.queueing(spec)
    train_spec: dict = {
        "runtimeRef": {"name": spec.get("trainingRuntime") or DEFAULT_RUNTIME, "apiGroup": GROUP,
                       "kind": "ClusterTrainingRuntime"},
        "suspend": queueing.suspend,
        "trainer": _trainer(template["spec"]["containers"][0], nodes, per_node),
        "runtimePatches": [_runtime_patch(template)],
    }
    if "activeDeadlineSeconds" in policy:
        train_spec["activeDeadlineSeconds"] = policy["activeDeadlineSeconds"]
    config_data = config_data if config_data is not None else render.config_map_data(job, stage)
    metadata = render.workload_metadata(job, stage, config_data)
    metadata["labels"].update(queueing.labels)
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": train_spec}


def _condition(conditions: list[dict], kind: str) -> dict | None:
    return next((c for c in conditions if c.get("type") == kind), None)


def _true(condition: dict | None) -> bool:
    return bool(condition) and condition.get("status") == "True"


def _job_counts(status: dict) -> dict:
    """jobsStatus (one entry per replicated job of the runtime: child Jobs, not pods) by name."""
    return {
        entry["name"]: {k: int(entry.get(k, 0) or 0) for k in ("active", "succeeded", "failed")}
        for entry in status.get("jobsStatus") or []
        if isinstance(entry, dict) and entry.get("name")
    }


def _start_time(trainjob: dict, conditions: list[dict]) -> str | None:
    """When it last began to run: its resume, else its creation (the start of activeDeadlineSeconds in
    pkg/controller/trainjob_controller.go reconcileDeadline; a TrainJob has no startTime)."""
    resumed = _condition(conditions, SUSPENDED)
    if resumed and resumed.get("status") == "False":
        return resumed.get("lastTransitionTime")
    return (trainjob.get("metadata") or {}).get("creationTimestamp")


def read_status(trainjob: dict) -> WorkloadStatus:
    """The TrainJob as the state machine sees it. Failed wins over Complete; Running while a node job is
    active; a TrainJob reports no restarts."""
    status = trainjob.get("status") or {}
    conditions = status.get("conditions") or []
    counts = _job_counts(status)
    suspended = bool((trainjob.get("spec") or {}).get("suspend"))
    node = counts.get(NODE, {})
    phase, current = CREATED, _condition(conditions, SUSPENDED) if suspended else None
    for kind, condition_type in ((FAILED, FAILED_CONDITION), (SUCCEEDED, COMPLETE)):
        if _true(_condition(conditions, condition_type)):
            phase, current = kind, _condition(conditions, condition_type)
            break
    else:
        if not suspended and node.get("active"):
            phase = RUNNING
    started = phase in (FAILED, SUCCEEDED) or any(sum(c.values()) for c in counts.values())
    metadata = trainjob.get("metadata") or {}
    return WorkloadStatus(
        name=metadata.get("name", ""), kind=KIND, labels=dict(metadata.get("labels") or {}), phase=phase,
        started=started, reason=(current or {}).get("reason") or "", message=(current or {}).get("message") or "",
        since=(current or {}).get("lastTransitionTime"),
        start_time=_start_time(trainjob, conditions) if started else None,
        completion_time=(current or {}).get("lastTransitionTime") if phase in (FAILED, SUCCEEDED) else None,
        replicas=counts, attempts=sum(node.values()), suspended=suspended, uid=metadata.get("uid") or "")


def suspend_patch(suspend: bool) -> dict:
    return {"spec": {"suspend": suspend}}


def local_launch(trainjob: dict) -> LocalLaunch:
    """Its nodes' command and job config; the world is numProcPerNode x numNodes (several nodes run as one)."""
    spec = trainjob["spec"]
    trainer = spec["trainer"]
    pod_patch = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    volumes = pod_patch["template"]["spec"]["template"]["spec"]["volumes"]
    config_map = next(v["configMap"]["name"] for v in volumes if "configMap" in v)
    return LocalLaunch(command=list(trainer["command"]),
                       processes=int(trainer.get("numProcPerNode", 1)) * int(trainer.get("numNodes", 1)),
                       config_map=config_map, backoff_limit=JOB_BACKOFF_LIMIT, replica=NODE)


BACKEND = Backend(kind=KIND, api_resource=(GROUP, "v1alpha1", "trainjobs"), render=render_trainjob,
                  read_status=read_status, suspend_patch=suspend_patch, local_launch=local_launch)

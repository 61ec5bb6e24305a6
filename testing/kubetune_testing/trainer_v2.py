"""Kubeflow Trainer v2 for a rendered TrainJob (its runtime, JobSet, Job controller, kubelet) as local processes.

Pods as kubeflow/trainer's torch-distributed ClusterTrainingRuntime and the TrainJob's trainer and runtime patch
make them; env as pkg/runtime/framework/plugins/torch/torch.go EnforceMLPolicy injects it; status as
pkg/controller/trainjob_controller.go and plugins/jobset/jobset.go Status write it; refusals as the torch
plugin's Validate and the runtime lookup. Liberties: docs/testing.md ("The Trainer v2 stand-in").
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from kubetune.clients import kube

from .training_operator import (
    LOOPBACK,
    Pod,
    base_env,
    container_env,
    free_port,
    materialise_volumes,
    mount_map,
    now_rfc3339,
    translate,
)
from .training_operator_loop import TrainingOperator

GROUP = "trainer.kubeflow.org"
NODE = "node"  # the torch runtimes' replicated job and trainer container (pkg/constants Node)
# ClusterTrainingRuntimes installed here: manifests/base/runtimes/torch_distributed.yaml (numNodes 1, torch).
RUNTIMES = {"torch-distributed": {"numNodes": 1}}
RESERVED_ENV = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
JOB_BACKOFF_LIMIT = 6  # the runtime's Job sets none: Kubernetes' default
COMPLETE_REASON, COMPLETE_MESSAGE = "AllJobsCompleted", "jobset completed successfully"
FAILED_REASON, FAILED_MESSAGE = "FailedJobs", "jobset failed due to one or more job failures"


def refusal(trainjob: dict, runtimes: dict = RUNTIMES) -> str | None:
    """Why Kubeflow Trainer would not run it (its admission webhook refuses the create), or None."""
    ref = trainjob["spec"].get("runtimeRef") or {}
    if ref.get("kind", "ClusterTrainingRuntime") != "ClusterTrainingRuntime" or ref.get("apiGroup", GROUP) != GROUP:
        return f"unsupported runtime: {ref.get('kind')}.{ref.get('apiGroup')}"
    if ref.get("name") not in runtimes:
        return f'ClusterTrainingRuntime.{GROUP} "{ref.get("name")}" not found'
    reserved = sorted({e["name"] for e in (trainjob["spec"].get("trainer") or {}).get("env") or []} & set(RESERVED_ENV))
    if reserved:
        return f"spec.trainer.env: must not have reserved envs, invalid envs configured: {reserved}"
    return None


def _patched_node_job(trainjob: dict) -> dict:
    """The `node` replicated job's patch (the last patch naming it; kubetune writes one)."""
    found = {}
    for patch in trainjob["spec"].get("runtimePatches") or []:
        jobs = (((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {}).get(
            "replicatedJobs") or []
        found.update(next((j for j in jobs if j.get("name") == NODE), {}))
    return found.get("template") or {}


def nodes_of(trainjob: dict, runtimes: dict = RUNTIMES) -> int:
    trainer = trainjob["spec"].get("trainer") or {}
    return int(trainer.get("numNodes") or runtimes[trainjob["spec"]["runtimeRef"]["name"]]["numNodes"])


def node_pod(trainjob: dict) -> dict:
    """The pod of one node as the runtime template, the trainer and the runtime patch assemble it (before the
    torch plugin's env): the trainer's image, command, env and resources; the patch's pod and container fields."""
    trainer = trainjob["spec"].get("trainer") or {}
    template = (_patched_node_job(trainjob).get("spec") or {}).get("template") or {}
    pod_patch = dict(template.get("spec") or {})
    container_patch = next((c for c in pod_patch.pop("containers", []) if c.get("name") == NODE), {})
    container = {"name": NODE, **{k: v for k, v in container_patch.items() if k != "name"}}
    for key in ("image", "command", "args", "env"):
        if trainer.get(key):
            container[key] = trainer[key]
    if trainer.get("resourcesPerNode"):
        container["resources"] = trainer["resourcesPerNode"]
    container["ports"] = [{"containerPort": 29500}]  # ContainerTrainerPort, for the headless Service
    spec = {**pod_patch, "containers": [container], "restartPolicy": "OnFailure"}  # JobSet's default
    return {"metadata": dict(template.get("metadata") or {}), "spec": spec}


def torch_env(trainjob: dict, node_rank: int, master_port: int) -> list[tuple[str, str]]:
    """The PET_* variables, in EnforceMLPolicy's order. PET_MASTER_ADDR is `<job>-node-0-0.<job>` (the
    headless Service); here it resolves to the loopback address, as PET_NODE_RANK's Job index is the pod's."""
    trainer = trainjob["spec"].get("trainer") or {}
    return [("PET_NNODES", str(nodes_of(trainjob))), ("PET_NPROC_PER_NODE", str(trainer.get("numProcPerNode", "auto"))),
            ("PET_NODE_RANK", str(node_rank)), ("PET_MASTER_ADDR", LOOPBACK), ("PET_MASTER_PORT", str(master_port))]


def pod_name(job_name: str, index: int) -> str:
    """JobSet names a Job `<jobset>-<replicated job>-<index>`; an indexed Job's pod adds its index."""
    return f"{job_name}-{NODE}-0-{index}"


@dataclass
class TrainJobRun:
    """A TrainJob's node pods, run and restarted as its JobSet's Job (restartPolicy OnFailure, backoffLimit 6)
    and the kubelet would; its status as the TrainJob controller writes it. `start()`, then `poll()`."""

    trainjob: dict
    root: Path
    config_maps: dict[str, dict[str, str]] = field(default_factory=dict)
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)
    pods: dict[int, Pod] = field(default_factory=dict)
    history: list[Pod] = field(default_factory=list)
    conditions: list[dict] = field(default_factory=list)
    restarts: int = 0
    master_port: int = 0
    backoff_limit: int = JOB_BACKOFF_LIMIT

    @property
    def name(self) -> str:
        return self.trainjob["metadata"]["name"]

    def start(self) -> None:
        why = refusal(self.trainjob)
        if why:
            self.set_condition("Failed", "TrainingRuntimeNotSupported", why)
            return
        self.master_port = self.master_port or free_port()
        for index in range(nodes_of(self.trainjob)):
            self._create_pod(index)

    def _create_pod(self, index: int) -> Pod:
        name = pod_name(self.name, index)
        attempt = sum(1 for p in self.history if p.name == name)
        pod = Pod(name, NODE, index, self.root / f"{name}.{attempt}")
        self.pods[index] = pod
        self.history.append(pod)
        pod.start(lambda directory: self.pod_process(index, directory))
        return pod

    def pod_process(self, index: int, pod_dir: Path) -> tuple[list[str], dict]:
        """argv and environment of a node's `node` container, mount paths bound to its directories."""
        spec = node_pod(self.trainjob)["spec"]
        container, volumes = spec["containers"][0], spec.get("volumes") or []
        mounts = mount_map(container, volumes, pod_dir)
        env = base_env(pod_dir / "home")
        pairs = container_env(container, self.secrets) + torch_env(self.trainjob, index, self.master_port)
        materialise_volumes(volumes, pod_dir, self.config_maps)
        (pod_dir / "home").mkdir(parents=True, exist_ok=True)
        for key, value in pairs:
            env[key] = translate(value, mounts)
        argv = [translate(part, mounts) for part in [*container.get("command", []), *container.get("args", [])]]
        return argv, env

    def poll(self) -> str:
        """One pass: reap exited pods, restart a failed one until the Job's backoff limit, then fail."""
        if self.finished:
            return self.phase
        for index, pod in list(self.pods.items()):
            code = pod.poll()
            if code in (None, 0):
                continue
            if self.restarts >= self.backoff_limit:
                self.set_condition("Failed", FAILED_REASON, FAILED_MESSAGE)
                self.stop_pods()
                return self.phase
            self.restarts += 1
            self._create_pod(index)
        if self.pods and all(p.exit_code == 0 for p in self.pods.values()):
            self.set_condition("Complete", COMPLETE_REASON, COMPLETE_MESSAGE)
        return self.phase

    def set_condition(self, kind: str, reason: str, message: str) -> None:
        now = now_rfc3339()
        self.conditions = [c for c in self.conditions if c["type"] != kind] + [
            {"type": kind, "status": "True", "reason": reason, "message": message, "lastTransitionTime": now}]

    @property
    def phase(self) -> str:
        for kind in ("Failed", "Complete"):
            if any(c["type"] == kind and c["status"] == "True" for c in self.conditions):
                return kind
        return "Running" if any(p.running() for p in self.pods.values()) else "Created"

    @property
    def finished(self) -> bool:
        return self.phase in ("Complete", "Failed")

    def waiting_pods(self) -> list[Pod]:
        return [p for p in self.pods.values() if p.waiting]

    def retry_waiting(self) -> None:
        for pod in self.waiting_pods():
            self._create_pod(pod.index)

    def status(self) -> dict:
        """conditions and jobsStatus: one Job for the `node` replicated job (its pods are the nodes)."""
        pods = list(self.pods.values())
        running = any(p.running() for p in pods)
        node = {"name": NODE, "ready": int(running), "active": int(running and not self.finished),
                "succeeded": int(self.phase == "Complete"), "failed": int(self.phase == "Failed" and bool(pods)),
                "suspended": 0}
        return {"conditions": list(self.conditions), "jobsStatus": [node] if pods else []}

    def stop_pods(self, grace: float = 10.0) -> None:
        for pod in self.pods.values():
            pod.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(p.poll() is None and p.running() for p in self.pods.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pod in self.pods.values():
            pod.signal(signal.SIGKILL)
            if pod.process is not None:
                pod.process.wait()
                pod.poll()

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {p.directory.name} (exit {p.exit_code}) ---\n{p.output(tail)}" for p in self.history)


def _suspended_condition(suspended: bool) -> dict:
    """trainjob_controller.go setSuspendedCondition."""
    reason, message = ("Suspended", "TrainJob is suspended") if suspended else ("Resumed", "TrainJob is resumed")
    return {"type": "Suspended", "status": str(suspended), "reason": reason, "message": message,
            "lastTransitionTime": now_rfc3339()}


class TrainerController(TrainingOperator):
    """The Trainer v2 controller over the API: runs the TrainJobs of one namespace, Suspended as it reports it."""

    resource = kube.Resource(GROUP, "v1alpha1", "trainjobs")

    def referenced(self, job: dict) -> tuple[set[str], set[str]]:
        spec = node_pod(job)["spec"]
        config_maps = {v["configMap"]["name"] for v in spec.get("volumes") or [] if "configMap" in v}
        secrets = {item["valueFrom"]["secretKeyRef"]["name"] for item in spec["containers"][0].get("env") or []
                   if (item.get("valueFrom") or {}).get("secretKeyRef")}
        return config_maps, secrets

    def suspended(self, job: dict) -> bool:
        return bool(job["spec"].get("suspend"))

    def finished_before(self, job: dict) -> bool:
        return any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
                   for c in (job.get("status") or {}).get("conditions") or [])

    def new_run(self, job: dict, config_maps: dict, secrets: dict) -> TrainJobRun:
        run = TrainJobRun(job, self.root / job["metadata"]["uid"], config_maps=config_maps, secrets=secrets)
        was = (job.get("status") or {}).get("conditions") or []
        if any(c.get("type") == "Suspended" and c.get("status") == "True" for c in was):
            run.conditions.append(_suspended_condition(False))
        return run

    def idle_status(self, job: dict) -> dict | None:
        conditions = (job.get("status") or {}).get("conditions") or []
        if any(c.get("type") == "Suspended" and c.get("status") == "True" for c in conditions):
            return None  # reported already
        kept = [c for c in conditions if c.get("type") != "Suspended"]
        return {"conditions": [*kept, _suspended_condition(True)], "jobsStatus": []}

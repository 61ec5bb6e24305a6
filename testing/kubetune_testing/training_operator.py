"""Kubeflow's training operator and the kubelet, for a rendered PyTorchJob, as local process groups.

Env as kubeflow's v1 controller injects it: pkg/controller.v1/pytorch/envvar.go `setPodEnv` and
master.go `MasterEnvVarGenerator.Generate`; restarts as pkg/controller.v1/common/pod.go
`ReconcilePods` with `train_util.IsRetryableExitCode` (>= 128). Liberties: docs/testing.md
("The training-operator stand-in").
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

MASTER, WORKER = "Master", "Worker"
RESTART_EXIT_CODE = "ExitCode"
CREATE_CONTAINER_CONFIG_ERROR = "CreateContainerConfigError"
LOOPBACK = "127.0.0.1"  # what the master's headless Service name resolves to here


class PodConfigError(Exception):
    """The kubelet cannot build the container (a missing Secret, key or ConfigMap): it never starts."""


def is_retryable_exit_code(code: int) -> bool:
    """kubeflow pkg/util/train/train_util.go IsRetryableExitCode: signals and 128+ codes are retried."""
    return code >= 128


def pod_name(job_name: str, replica_type: str, index: int) -> str:
    """envvar.go replicaName: `<job>-<replica type, lower case>-<index>`."""
    return f"{job_name}-{replica_type.lower()}-{index}".replace("/", "-")


def operator_env(pytorchjob: dict, replica_type: str, index: int, master_port: int) -> list[tuple[str, str]]:
    """What setPodEnv appends after the container's own env, in its order (no elasticPolicy)."""
    spec = pytorchjob["spec"]
    replicas = spec["pytorchReplicaSpecs"]
    total = sum(int(r.get("replicas", 1)) for r in replicas.values())
    nproc = spec.get("nprocPerNode")
    nproc_int = int(nproc) if nproc is not None and str(nproc).isdigit() else 1  # getNprocPerNodeInt
    env = [("PYTHONUNBUFFERED", "1")]
    if MASTER in replicas:
        # MASTER_ADDR is the master's Service name; here it resolves to the loopback address.
        env += [("MASTER_PORT", str(master_port)), ("PET_MASTER_PORT", str(master_port)),
                ("MASTER_ADDR", LOOPBACK), ("PET_MASTER_ADDR", LOOPBACK)]
        rank = index + 1 if replica_type == WORKER else index
        env += [("WORLD_SIZE", str(total * nproc_int)), ("RANK", str(rank)), ("PET_NODE_RANK", str(rank))]
    if nproc is not None:
        env.append(("PET_NPROC_PER_NODE", str(nproc)))
    env.append(("PET_NNODES", str(total)))
    return env


def mount_map(container: dict, volumes: list[dict], pod_dir: Path) -> dict[str, Path]:
    """mountPath -> the directory standing in for its volume (a bind mount, in effect)."""
    known = {v["name"]: v for v in volumes}
    mounts = {}
    for mount in container.get("volumeMounts") or []:
        volume = known.get(mount["name"])
        if volume is None:
            raise PodConfigError(f"volumeMount {mount['name']}: no such volume in the pod")
        if not ({"emptyDir", "configMap"} & volume.keys()):
            raise PodConfigError(f"volume {mount['name']}: only emptyDir and configMap volumes are played here")
        mounts[mount["mountPath"].rstrip("/") or "/"] = pod_dir / "volumes" / mount["name"]
    return mounts


def translate(value: str, mounts: dict[str, Path]) -> str:
    """A path under a mountPath, rewritten to the directory standing in for that volume."""
    for mount_path in sorted(mounts, key=len, reverse=True):
        if value == mount_path or value.startswith(mount_path + "/"):
            return str(mounts[mount_path]) + value[len(mount_path):]
    return value


def container_env(container: dict, secrets: dict[str, dict[str, str]]) -> list[tuple[str, str]]:
    """The container's env, secretKeyRefs resolved, as the kubelet builds it."""
    env = []
    for item in container.get("env") or []:
        if "value" in item or "valueFrom" not in item:
            env.append((item["name"], str(item.get("value", ""))))
            continue
        ref = item["valueFrom"].get("secretKeyRef")
        if ref is None:
            raise PodConfigError(f"env {item['name']}: only secretKeyRef is resolved here")
        secret = secrets.get(ref["name"])
        if secret is None:
            raise PodConfigError(f'secret "{ref["name"]}" not found')
        if ref["key"] not in secret:
            raise PodConfigError(f"couldn't find key {ref['key']} in Secret {ref['name']}")
        env.append((item["name"], secret[ref["key"]]))
    return env


def materialise_volumes(volumes: list[dict], pod_dir: Path, config_maps: dict[str, dict[str, str]]) -> None:
    for volume in volumes:
        target = pod_dir / "volumes" / volume["name"]
        target.mkdir(parents=True, exist_ok=True)
        if "configMap" in volume:
            name = volume["configMap"]["name"]
            if name not in config_maps:
                raise PodConfigError(f'configmap "{name}" not found')
            for key, text in config_maps[name].items():
                (target / key).write_text(text)


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) of every process (Linux /proc)."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # gone meanwhile
            continue
        table[int(stat.parent.name)] = (int(fields[1]), fields[19])
    return table


def descendants(pid: int, table: dict[int, tuple[int, str]]) -> dict[int, str]:
    children: dict[int, list[int]] = {}
    for child, (parent, _) in table.items():
        children.setdefault(parent, []).append(child)
    found, todo = {}, list(children.get(pid, []))
    while todo:
        current = todo.pop()
        found[current] = table[current][1]
        todo += children.get(current, [])
    return found


@dataclass
class Pod:
    """One attempt of one replica: its directory, processes and fate.

    A container's processes all end with it (its PID namespace), but torchrun starts each worker in a
    session of its own, so a process group is not enough: the pod's process tree is recorded while it
    runs, and whatever of it outlives the main process is killed, as the container runtime would."""

    name: str
    replica_type: str
    index: int
    directory: Path
    process: subprocess.Popen | None = None
    waiting: str = ""  # CreateContainerConfigError: the reason it never started
    message: str = ""
    exit_code: int | None = None
    members: dict[int, str] = field(default_factory=dict)  # pid -> start time of the pod's other processes
    scanned: float = 0.0  # when `members` was last refreshed

    @property
    def log(self) -> Path:
        return self.directory / "container.log"

    def running(self) -> bool:
        return self.process is not None and self.exit_code is None

    def poll(self) -> int | None:
        if self.process is not None and self.exit_code is None:
            if time.monotonic() - self.scanned > 1.0:  # /proc is read once a second, not on every poll
                self.members.update(descendants(self.process.pid, _process_table()))
                self.scanned = time.monotonic()
            code = self.process.poll()
            if code is not None:
                self.exit_code = 128 - code if code < 0 else code  # the kubelet reports SIGKILL as 137
                self._signal_members(signal.SIGKILL)  # the container ends: nothing in it survives
        return self.exit_code

    def signal(self, sig: int) -> None:
        """SIGKILL to every process of the pod (an OOM kill, a lost node); any other signal to its main
        process only, as the kubelet sends SIGTERM."""
        if self.running():
            self.members.update(descendants(self.process.pid, _process_table()))
            if sig == signal.SIGKILL:
                self._signal_members(sig)
            with contextlib.suppress(ProcessLookupError):  # already gone
                os.kill(self.process.pid, sig)

    def _signal_members(self, sig: int) -> None:
        table = _process_table()
        for pid, started in self.members.items():
            if table.get(pid, (0, None))[1] == started:  # the same process, not a reused pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)

    def start(self, process_of: Callable[[Path], tuple[list[str], dict]]) -> None:
        """Runs the container `process_of(directory)` describes (argv, env), or leaves the pod waiting
        with CreateContainerConfigError when its config cannot be resolved, as the kubelet does."""
        try:
            argv, env = process_of(self.directory)
        except PodConfigError as exc:
            self.waiting, self.message = CREATE_CONTAINER_CONFIG_ERROR, str(exc)
            return
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            # its own session: a kill reaches torchrun's workers as a pod's end does
            self.process = subprocess.Popen(argv, env=env, cwd=self.directory, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def output(self, tail: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-tail:] if self.log.exists() else self.message


def base_env(home: Path) -> dict[str, str]:
    """What the image would provide: this interpreter's bin first on PATH, one thread per process."""
    path = os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"])
    env = {"PATH": path, "HOME": str(home), "OMP_NUM_THREADS": "1", "LANG": "C.UTF-8"}
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class PyTorchJobRun:
    """A PyTorchJob's pods, run and restarted as the training operator and kubelet would.

    `config_maps` and `secrets` hold the data of the objects the pods reference (Secrets decoded).
    Call `start()`, then `poll()` (or `wait()`); `kill()` signals a pod's whole process group."""

    pytorchjob: dict
    root: Path
    config_maps: dict[str, dict[str, str]] = field(default_factory=dict)
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)
    pods: dict[tuple[str, int], Pod] = field(default_factory=dict)
    history: list[Pod] = field(default_factory=list)  # every attempt, the current ones included
    conditions: list[dict] = field(default_factory=list)
    restarts: int = 0
    master_port: int = 0
    start_time: str | None = None
    completion_time: str | None = None

    @property
    def name(self) -> str:
        return self.pytorchjob["metadata"]["name"]

    @property
    def replica_specs(self) -> dict:
        return self.pytorchjob["spec"]["pytorchReplicaSpecs"]

    @property
    def backoff_limit(self) -> int | None:
        return (self.pytorchjob["spec"].get("runPolicy") or {}).get("backoffLimit")

    def start(self) -> None:
        # The port the master's container exposes; a free one instead of kubeflow's default 23456 so that
        # several jobs (and tests) run at once on one machine.
        self.master_port = self.master_port or free_port()
        self.start_time = now_rfc3339()
        self.set_condition("Created", f"PyTorchJob {self.name} is created.")
        for replica_type, spec in self.replica_specs.items():
            for index in range(int(spec.get("replicas", 1))):
                self._create_pod(replica_type, index)
        self._update_running()

    def _create_pod(self, replica_type: str, index: int) -> Pod:
        name = pod_name(self.name, replica_type, index)
        attempt = sum(1 for p in self.history if p.name == name)
        pod = Pod(name, replica_type, index, self.root / f"{name}.{attempt}")  # a new pod: fresh emptyDirs
        self.pods[(replica_type, index)] = pod
        self.history.append(pod)
        template = self.replica_specs[replica_type]["template"]["spec"]
        pod.start(lambda directory: self.pod_process(template, replica_type, index, directory))
        return pod

    def pod_process(self, template: dict, replica_type: str, index: int, pod_dir: Path) -> tuple[list[str], dict]:
        """argv and environment of the pod's `pytorch` container, mount paths bound to its directories."""
        container = next(c for c in template["containers"] if c["name"] == "pytorch")
        volumes = template.get("volumes") or []
        mounts = mount_map(container, volumes, pod_dir)
        env = base_env(pod_dir / "home")
        pairs = container_env(container, self.secrets)
        pairs += operator_env(self.pytorchjob, replica_type, index, self.master_port)
        materialise_volumes(volumes, pod_dir, self.config_maps)
        (pod_dir / "home").mkdir(parents=True, exist_ok=True)
        for key, value in pairs:  # a later entry of the same name wins, as in a container
            env[key] = translate(value, mounts)
        argv = [translate(part, mounts) for part in [*container.get("command", []), *container.get("args", [])]]
        return argv, env

    # --- the controller's pass -------------------------------------------------------------------

    def poll(self) -> str:
        """One reconcile pass: reap exited pods, restart or fail as restartPolicy ExitCode says.
        Returns the job's phase (Created, Running, Restarting, Succeeded, Failed)."""
        if self.finished:
            return self.phase
        restarted = False
        for pod in list(self.pods.values()):
            code = pod.poll()
            if code is None or code == 0:
                continue
            policy = self.replica_specs[pod.replica_type].get("restartPolicy", "Never")
            retry = policy in ("OnFailure", "Always") or (policy == RESTART_EXIT_CODE and is_retryable_exit_code(code))
            if not retry:
                self.fail(f"job {self.name} is failing because {pod.replica_type} replica(s) failed "
                          f"({pod.name} exited with {code}).")
                return self.phase
            if self.backoff_limit is not None and int(self.backoff_limit) == 0:
                # kubeflow v1 (common/job.go ReconcileJobs, core/job.go PastBackoffLimit): requeues are never
                # counted (its work queue is a fake) and a recreated pod's restartCount is 0, so for
                # ExitCode only backoffLimit 0 stops a retry; any other limit never does.
                self.fail(f"Job {self.name} has failed because it has reached the specified backoff limit")
                return self.phase
            self.restarts += 1
            self.set_condition("Restarting", f"job {self.name} is restarting because {pod.replica_type} "
                                             f"replica(s) failed.")
            self._create_pod(pod.replica_type, pod.index)
            restarted = True
        master = self.pods.get((MASTER, 0))
        if master is not None and master.exit_code == 0:
            self.set_condition("Succeeded", f"PyTorchJob {self.name} is successfully completed.")
            self.stop_pods(patience=30.0)  # the workers finish on their own moments later
        elif not restarted:  # as in kubeflow, Running comes back on the pass after the restart
            self._update_running()
        return self.phase

    def _update_running(self) -> None:
        if any(p.running() for p in self.pods.values()) and not self.waiting_pods():
            self.set_condition("Running", f"PyTorchJob {self.name} is running.")

    def waiting_pods(self) -> list[Pod]:
        return [p for p in self.pods.values() if p.waiting]

    def retry_waiting(self) -> None:
        """The kubelet retries a container it could not build (a Secret created since, for instance)."""
        for pod in self.waiting_pods():
            self._create_pod(pod.replica_type, pod.index)

    def fail(self, message: str) -> None:
        self.set_condition("Failed", message)
        self.stop_pods()

    def stop_pods(self, grace: float = 10.0, patience: float = 0.0) -> None:
        """Pods left running when the job ends (cleanPodPolicy None keeps them in a cluster) are stopped
        here after `patience`, SIGTERM then SIGKILL `grace` later, so that nothing outlives the test."""
        self._wait_pods(time.monotonic() + patience)
        for pod in self.pods.values():
            pod.signal(signal.SIGTERM)
        self._wait_pods(time.monotonic() + grace)
        for pod in self.pods.values():
            pod.signal(signal.SIGKILL)
            if pod.process is not None:
                pod.process.wait()
                pod.poll()

    def _wait_pods(self, deadline: float) -> None:
        while any(p.poll() is None and p.running() for p in self.pods.values()) and time.monotonic() < deadline:
            time.sleep(0.05)

    def set_condition(self, kind: str, message: str) -> None:
        """pkg/util/status.go setCondition: Running and Restarting replace each other; Succeeded and
        Failed set Running False; nothing changes once Failed."""
        if any(c["type"] == "Failed" and c["status"] == "True" for c in self.conditions):
            return
        now = now_rfc3339()
        kept = []
        for c in self.conditions:
            if c["type"] == kind or {c["type"], kind} == {"Running", "Restarting"}:
                continue
            if kind in ("Succeeded", "Failed") and c["type"] == "Running":
                c = {**c, "status": "False"}
            kept.append(c)
        if kind in ("Succeeded", "Failed"):
            self.completion_time = now
        reason = f"PyTorchJob{kind}"
        kept.append({"type": kind, "status": "True", "reason": reason, "message": message,
                     "lastUpdateTime": now, "lastTransitionTime": now})
        self.conditions = kept

    @property
    def phase(self) -> str:
        for kind in ("Failed", "Succeeded", "Restarting", "Running", "Created"):
            if any(c["type"] == kind and c["status"] == "True" for c in self.conditions):
                return kind
        return ""

    @property
    def finished(self) -> bool:
        return self.phase in ("Succeeded", "Failed")

    def status(self) -> dict:
        """The PyTorchJob's status subresource as the training operator writes it."""
        replica_statuses = {}
        for replica_type in self.replica_specs:
            pods = [p for p in self.pods.values() if p.replica_type == replica_type]
            replica_statuses[replica_type] = {
                "active": sum(1 for p in pods if p.running()),
                "succeeded": sum(1 for p in pods if p.exit_code == 0),
                "failed": sum(1 for p in pods if p.exit_code not in (None, 0)),
            }
        status = {"conditions": list(self.conditions), "replicaStatuses": replica_statuses}
        status.update({k: v for k, v in (("startTime", self.start_time), ("completionTime", self.completion_time))
                       if v})
        return status

    # --- what a test does to it ------------------------------------------------------------------

    def pod(self, replica_type: str = MASTER, index: int = 0) -> Pod:
        return self.pods[(replica_type, index)]

    def kill(self, replica_type: str = MASTER, index: int = 0, sig: int = signal.SIGKILL) -> Pod:
        """Signal the pod's whole process group (SIGKILL: an OOM kill or a lost node) and wait for it."""
        pod = self.pod(replica_type, index)
        pod.signal(sig)
        if pod.process is not None:
            pod.process.wait(60)
        return pod

    def wait(self, timeout: float, interval: float = 0.1) -> str:
        """Poll until the job finishes, or its pods cannot start; TimeoutError (pods stopped) past `timeout`."""
        deadline = time.monotonic() + timeout
        while not self.finished:
            self.poll()
            if self.waiting_pods() and not any(p.running() for p in self.pods.values()):
                return self.phase
            if time.monotonic() > deadline:
                self.stop_pods()
                raise TimeoutError(f"PyTorchJob {self.name} not finished in {timeout}s:\n{self.logs()}")
            time.sleep(interval)
        return self.phase

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {p.directory.name} (exit {p.exit_code}) ---\n{p.output(tail)}" for p in self.history)

"""The processes `kubetune local` serves with: one CPU engine and an agent per replica (in local mode:
the desired state is a file, each report a file), started, watched and stopped in order."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from kubetune import runtimes
from kubetune.clients import storage
from kubetune_operator.reconcile import adapterdeployment as adp

from .inputs import local_path, replicas

log = logging.getLogger("kubetune_operator.local.adapterdeployment")

ENGINE_STARTUP_SECONDS = 180.0  # loading a base model on a busy laptop
AGENT_STARTUP_SECONDS = 30.0
# Agents write their samples within a second (the cluster default is 30 s): the drift loop should see
# local traffic at once, and `--until traffic-done` waits this long for the last batch.
SAMPLE_FLUSH_SECONDS = 1.0
SAMPLE_FLUSH_RECORDS = 50
AGENT_SYNC_SECONDS = 0.5
AGENT_REPORT_SECONDS = 0.5
REQUEST_TIMEOUT = 60.0
STOP_SECONDS = 15.0  # SIGTERM, then SIGKILL after this long
# the CPU engine's --fidelity for each serving runtime it stands in for
ENGINE_FIDELITY = {runtimes.vllm.RUNTIME.name: "vllm", runtimes.cpu.RUNTIME.name: "kubetune"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_atomic(path: Path, text: str) -> None:
    """Readers (the agents, a user's `watch cat`) never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        handle.write(text)
    os.replace(handle.name, path)


def http_json(method: str, url: str, body: object = None, timeout: float = REQUEST_TIMEOUT) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Aborted(Exception):
    """Ctrl-C (or SIGTERM) while the processes start."""


class Child:
    """A subprocess with its output in a log file, stopped with SIGTERM then SIGKILL."""

    def __init__(self, name: str, command: list[str], log_path: Path, env: dict):
        self.name, self.command, self.log_path, self.env = name, command, log_path, env
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as handle:
            # Its own session: a Ctrl-C in the terminal reaches this process only, which stops the
            # children in order (agents flush their samples first) instead of all at once.
            self.process = subprocess.Popen(self.command, stdout=handle, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        log.info("process started", extra={"child": self.name, "pid": self.process.pid, "log": str(self.log_path)})

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_healthy(self, url: str, timeout: float, abort: threading.Event) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if abort.is_set():
                raise Aborted(f"stopped while waiting for {self.name}")
            if not self.alive:
                raise RuntimeError(f"{self.name} exited with code {self.process.returncode}:\n{self.tail()}")
            with contextlib.suppress(OSError):
                if http_json("GET", url, timeout=2)[0] == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not answer {url} within {timeout:.0f} s:\n{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if not self.alive:
            return
        self.process.terminate()
        try:
            self.process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            log.warning("process did not stop: killing it", extra={"child": self.name, "pid": self.process.pid})
            self.process.kill()
            self.process.wait(5)


@dataclass
class Agent:
    pod: str
    port: int
    report_file: Path
    child: Child

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pod_view(self) -> adp.Pod:
        """What the controller reads from a Pod: its readiness and the agent's report annotation."""
        report = None
        with contextlib.suppress(FileNotFoundError, ValueError):
            report = json.loads(self.report_file.read_text())
        return adp.Pod(self.pod, self.child.alive, report)




@dataclass
class Serving:
    """The engine and the agents of one AdapterDeployment on this machine."""
    engine: Child
    engine_url: str
    agents: list[Agent]

    def wait_healthy(self, abort: threading.Event) -> None:
        for agent in self.agents:
            agent.child.wait_healthy(agent.url + "/healthz", AGENT_STARTUP_SECONDS, abort)
        self.engine.wait_healthy(self.engine_url + runtimes.cpu.RUNTIME.api.health, ENGINE_STARTUP_SECONDS, abort)


def _engine(adep: dict, run_dir: Path, env: dict) -> tuple[Child, str]:
    spec = adep["spec"]
    runtime = spec["runtime"].get("managed") or spec["runtime"].get("selector") or {}
    # The CPU engine reserves nothing per rank: without an explicit maxLoraRank it accepts what the
    # rollout's preflight accepts (vLLM's largest), so no engine restart is ever needed for a rank.
    max_rank = int(runtime.get("maxLoraRank") or runtimes.runtime_of(spec).lora_ranks[-1])
    managed = spec["runtime"].get("managed") or {}
    max_loras = int(managed.get("maxLoras", 4))
    model_dir = local_path(spec["baseModel"]["uri"])
    port = free_port()
    command = [sys.executable, "-m", "kubetune_engine", str(model_dir), "--fidelity", engine_fidelity(spec),
               "--host", "127.0.0.1", "--port", str(port), "--max-lora-rank", str(max_rank),
               "--max-loras", str(max_loras)]
    if managed.get("maxCpuLoras"):
        command += ["--max-cpu-loras", str(managed["maxCpuLoras"])]
    return Child("engine", command, run_dir / "engine.log", env), f"http://127.0.0.1:{port}"


def engine_fidelity(spec: dict) -> str:
    """The CPU engine refuses what the AdapterDeployment's runtime refuses: vLLM's rules for `vllm`;
    classification adapters accepted too for `kubetune-cpu`."""
    return ENGINE_FIDELITY[runtimes.runtime_of(spec).name]


def _agent(pod: str, namespace: str, engine_url: str, desired_file: Path, run_dir: Path, s3: storage.S3Settings,
           env: dict) -> Agent:
    agent_dir = run_dir / "agents" / pod
    agent_port = free_port()
    command = [sys.executable, "-m", "kubetune_agent", "--engine-url", engine_url,
               "--runtime", runtimes.cpu.RUNTIME.name, "--host", "127.0.0.1", "--port", str(agent_port),
               "--namespace", namespace, "--pod-name", pod,
               "--desired-file", str(desired_file), "--report-file", str(agent_dir / "report.json"),
               "--cache-dir", str(agent_dir / "cache"), "--sync-seconds", str(AGENT_SYNC_SECONDS),
               "--report-seconds", str(AGENT_REPORT_SECONDS),
               "--sample-flush-records", str(SAMPLE_FLUSH_RECORDS),
               "--sample-flush-seconds", str(SAMPLE_FLUSH_SECONDS), "--max-backoff", "5"]
    if s3.endpoint:
        command += ["--s3-endpoint", s3.endpoint]  # credentials stay in the environment
    if s3.region:
        command += ["--s3-region", s3.region]
    return Agent(pod, agent_port, agent_dir / "report.json", Child(f"agent {pod}", command, agent_dir / "agent.log",
                                                                 env))


def start_serving(adep: dict, run_dir: Path, desired_file: Path, s3: storage.S3Settings) -> Serving:
    """Start the engine, then an agent per replica; wait for them with `Serving.wait_healthy`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("HF_HUB_OFFLINE", "1")  # a local directory never needs the hub; no network waits
    engine, engine_url = _engine(adep, run_dir, env)
    engine.start()
    name, namespace = adep["metadata"]["name"], adep["metadata"]["namespace"]
    agents = []
    for index in range(replicas(adep)):
        agent = _agent(f"{name}-{index}", namespace, engine_url, desired_file, run_dir, s3, env)
        agent.report_file.unlink(missing_ok=True)  # an earlier run's report is not this agent's
        agent.child.start()
        agents.append(agent)
    return Serving(engine, engine_url, agents)

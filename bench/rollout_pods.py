"""The bench's serving pods and clients: engine and agent processes, the operator's decision in this
process, and the client threads that time every answer (bench/adapter_rollout.py runs them)."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from common import free_port, minilm_dir, stop_process
from kubetune.api import serving
from kubetune.api.validation import validate
from kubetune.clients.storage import ObjectStore, S3Settings
from kubetune.runtimes import cpu
from kubetune_operator.clients import sources
from kubetune_operator.reconcile import adapterdeployment as adp

REPO_ROOT = Path(__file__).resolve().parents[1]
NS = "team-a"
ADAPTER = "intents"
ALIAS = serving.alias_name(NS, ADAPTER)
FIXED_NAME = ALIAS  # the restart baseline's adapter name: the same name, other weights, each release
PROBE = "what is my account balance"
STARTUP_TIMEOUT = 180
ROLLOUT_TIMEOUT = 180


def http(method: str, url: str, body: object = None, timeout: float = 30) -> tuple[int, dict, str]:
    """(status, lower-cased headers, text); status 0 when nothing answered."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read().decode()
    except OSError as exc:
        return 0, {}, f"{type(exc).__name__}: {exc}"


_ports_taken: set[int] = set()


def unique_port() -> int:
    """A free port never handed out before in this run: a process that has not bound its port yet (a
    starting engine) must not see it given to the next one."""
    while (port := free_port()) in _ports_taken:
        pass
    _ports_taken.add(port)
    return port


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@dataclass(frozen=True)
class AdapterVersion:
    label: str  # "a" | "b"
    manifest_uri: str
    digest: str
    path: Path  # the published adapter directory (file:// store): what the restart baseline loads

    @property
    def name(self) -> str:
        return serving.version_name(NS, ADAPTER, self.digest)


# --- processes ---------------------------------------------------------------------------------------------


class Engine:
    """`python -m kubetune_engine` on the MiniLM base, or its light stand-in (`standin`: the costs in
    seconds it charges, measured from the real engine: `python -m kubetune_testing.lora_standin`)."""

    threads = 1  # OMP_NUM_THREADS of every engine (--engine-threads)
    standin: dict[str, float] | None = None  # {"start": s, "first_load": s, "load": s}
    spawned: list[Engine] = []  # every engine this run started (all are stopped at the end, whatever happened)

    def __init__(self, log_dir: Path, tag: str):
        self.port = unique_port()
        self.log_path = log_dir / f"engine-{tag}-{self.port}.log"
        self.process: subprocess.Popen | None = None
        self.version: str | None = None  # restart baseline: the one adapter version this process serves

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self) -> Engine:
        command = [sys.executable, "-m", "kubetune_engine", str(minilm_dir()), "--fidelity", "kubetune",
                   "--port", str(self.port), "--served-model-name", "minilm"]
        if self.standin is not None:
            command = [sys.executable, "-m", "kubetune_testing.lora_standin", "--port", str(self.port),
                       "--start-seconds", str(self.standin["start"]),
                       "--first-load-seconds", str(self.standin["first_load"]),
                       "--load-seconds", str(self.standin["load"])]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(self.threads)}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
        Engine.spawned.append(self)
        return self

    def wait_ready(self) -> Engine:
        def healthy() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"engine exited {self.process.returncode}: {self.log_path.read_text()[-2000:]}")
            return http("GET", self.url + "/health", timeout=2)[0] == 200

        wait_until(healthy, STARTUP_TIMEOUT, f"engine {self.port} /health", interval=0.05)
        return self

    def load(self, name: str, path: Path) -> None:
        status, _, text = http("POST", self.url + cpu.RUNTIME.api.load, {"lora_name": name, "lora_path": str(path)})
        if status != 200:
            raise RuntimeError(f"engine {self.port} refused {name}: {status} {text}")

    def adapters(self) -> list[str]:
        status, _, text = http("GET", self.url + cpu.RUNTIME.api.models, timeout=5)
        return [m["id"] for m in json.loads(text)["data"] if m.get("parent")] if status == 200 else []

    def unload_all(self) -> None:
        for name in self.adapters():
            http("POST", self.url + cpu.RUNTIME.api.unload, {"lora_name": name})

    def stop(self) -> None:
        stop_process(self.process)


class Agent:
    """`python -m kubetune_agent` in local mode in front of one engine."""

    def __init__(self, engine: Engine, root: Path, pod: str, sync_seconds: float):
        self.engine, self.pod = engine, pod
        root.mkdir(parents=True, exist_ok=True)
        self.desired_path, self.report_path = root / "desired.json", root / "report.json"
        self.log_path = root / "agent.log"
        self.port = unique_port()
        command = [sys.executable, "-m", "kubetune_agent", "--engine-url", engine.url, "--host", "127.0.0.1",
                   "--port", str(self.port), "--namespace", NS, "--pod-name", pod,
                   "--desired-file", str(self.desired_path), "--report-file", str(self.report_path),
                   "--cache-dir", str(root / "cache"), "--sync-seconds", str(sync_seconds), "--report-seconds", "1"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> Agent:
        def up() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"agent exited {self.process.returncode}: {self.log_path.read_text()[-2000:]}")
            return http("GET", self.url + "/healthz", timeout=2)[0] == 200

        wait_until(up, 60, f"agent {self.pod}")
        return self

    def set_desired(self, desired: serving.DesiredState) -> None:
        tmp = self.desired_path.with_suffix(".tmp")
        tmp.write_text(desired.to_json())
        tmp.replace(self.desired_path)

    def report(self) -> dict | None:
        try:
            return json.loads(self.report_path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def log_times(self) -> list[tuple[float, dict]]:
        """(epoch seconds, line) of the agent's JSON log lines."""
        lines = []
        for raw in self.log_path.read_text(errors="replace").splitlines():
            try:
                line = json.loads(raw)
                moment = dt.datetime.strptime(line["time"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            except (ValueError, KeyError):
                continue
            lines.append((moment, line))
        return lines

    def stop(self) -> None:
        stop_process(self.process, grace=15)


# --- the operator's decision, in this process ------------------------------------------------------------


class LocalOperator:
    """The AdapterDeployment controller's loop without a cluster: resolve the source (manifest verified),
    read the agents' reports as the pods' annotations, `decide`, write `plan.desired` to every agent."""

    def __init__(self, agents: list[Agent], source: AdapterVersion, base_model: dict):
        self.agents = agents
        self.doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "AdapterDeployment",
                    "metadata": {"name": ADAPTER, "namespace": NS, "generation": 1},
                    # a MiniLM classifier: the CPU engine serves it, not vLLM; the base as trained on
                    "spec": {"baseModel": {k: base_model[k] for k in ("uri", "revision")},
                             "runtime": {"engine": "kubetune-cpu", "managed": {"replicas": len(agents)}},
                             "adapters": [{"name": ADAPTER, "source": {"uri": source.manifest_uri,
                                                                       "digest": source.digest}}],
                             "strategy": {"type": "Immediate", "unloadGraceSeconds": 0}}}
        self.status: dict = {}
        self.desired: serving.DesiredState | None = None
        self.store = ObjectStore(S3Settings())

    def set_source(self, source: AdapterVersion) -> None:
        self.doc["spec"]["adapters"][0]["source"] = {"uri": source.manifest_uri, "digest": source.digest}
        self.doc["metadata"]["generation"] += 1

    def _resolve(self, uri: str) -> adp.Source:
        """As the operator's shell resolves a `uri` source: manifest, files and adapter config verified."""
        return asyncio.run(sources.verified_source(self.store, uri, None, ADAPTER, {}))

    def reconcile(self) -> adp.Plan:
        result = validate(copy.deepcopy(self.doc), local=True)  # the pods run on this machine (file:// store)
        assert result.ok, result.errors
        adep = {**self.doc, "spec": result.defaulted["spec"], "status": self.status}
        sources = {a["name"]: self._resolve(a["source"]["uri"]) for a in adep["spec"]["adapters"]}
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        plan = adp.decide(adp.Observed(adep=adep, now=now, sources=sources, pods=self.pods(), desired=self.desired),
                          adp.Settings())
        self.status = plan.status
        if plan.desired is not None:
            self.desired = plan.desired
            self.write(plan.desired)
        return plan

    def write(self, desired: serving.DesiredState) -> None:
        for agent in self.agents:
            agent.set_desired(desired)

    def pods(self) -> list[adp.Pod]:
        """The serving pods with their agents' reports."""
        return [adp.Pod(a.pod, True, a.report()) for a in self.agents]

    def stable_digest(self) -> str | None:
        record = self.status["adapters"][0]
        return None if record.get("canary") else (record.get("stable") or {}).get("digest")


# --- clients -----------------------------------------------------------------------------------------------


@dataclass
class Answer:
    sent: float
    done: float
    ok: bool
    version: str | None


_clients: asyncio.AbstractEventLoop | None = None
_clients_lock = threading.Lock()


def _client_loop() -> asyncio.AbstractEventLoop:
    """One thread and event loop for every pod's client, on kept-alive connections: 30 client threads
    opening a connection per request took the GIL (and the cores) from the emulator and the operator's
    decision in this process, and made the agents accept a connection per request."""
    global _clients
    with _clients_lock:
        if _clients is None:
            _clients = asyncio.new_event_loop()
            threading.Thread(target=_clients.run_forever, name="clients", daemon=True).start()
        return _clients


@dataclass
class Trickle:
    """One client per pod: a /classify request at a time, then a short sleep. `target()` says where the
    pod's requests go now: (url, model, version served there or None to read the response header); None
    when the pod has no endpoint (recreate: between stop and ready)."""

    target: object
    interval: float
    answers: list = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    future: object = None

    def start(self) -> Trickle:
        self.future = asyncio.run_coroutine_threadsafe(self._run(), _client_loop())
        return self

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not self.stop.is_set():
                where = self.target()
                sent = time.monotonic()
                if where is None:
                    self.answers.append(Answer(sent, sent, False, None))
                else:
                    url, model, version = where
                    try:
                        async with session.post(url + serving.ENGINE_CLASSIFY,
                                                json={"model": model, "input": PROBE}) as response:
                            await response.read()
                            status, header = response.status, response.headers.get("x-kubetune-version")
                    except (aiohttp.ClientError, TimeoutError):
                        status, header = 0, None
                    self.answers.append(Answer(sent, time.monotonic(), status == 200,
                                               (version or header) if status == 200 else None))
                await asyncio.sleep(self.interval)

    def halt(self) -> None:
        self.stop.set()
        if self.future is not None:
            self.future.result(60)

    def first(self, version: str, after: float) -> float | None:
        return next((a.done for a in list(self.answers) if a.sent >= after and a.ok and a.version == version), None)

    def failed(self, start: float, end: float) -> tuple[int, int]:
        window = [a for a in list(self.answers) if start <= a.sent <= end]
        return sum(1 for a in window if not a.ok), len(window)


def wait_serving(trickles: list[Trickle], version: str, t0: float) -> list[float]:
    """Seconds from t0 until each pod's client got an answer from `version`."""
    times = wait_until(lambda: (found := [t.first(version, t0) for t in trickles]) and all(found) and found,
                       ROLLOUT_TIMEOUT, f"every pod serving {version}")
    return [round(moment - t0, 3) for moment in times]

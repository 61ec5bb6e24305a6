"""`kubetune local -f adapterdeployment.yaml`: an AdapterDeployment served on this machine, drift loop included.

The operator's own decisions run here, unchanged: `reconcile.adapterdeployment.decide` for the rollout
and `clients.drift_storage.drift_pass` (the drift windows, guards, retrain and promotion gate of
`reconcile.driftloop`) for every adapter with `drift`. This module only carries out their plans on
this machine, as `controllers.adapterdeployment.reconcile` does in a cluster:

- the managed runtime's pods become one CPU engine (`python -m kubetune_engine`) and, per replica, an
  agent (`python -m kubetune.agent`) in local mode: the desired state is a file every agent reads
  (the cluster's `<adep>-desired` ConfigMap) and each agent writes its report to its own file (the
  cluster's Pod annotation);
- the sources are verified as the controller verifies them (every file's size and sha256, once per
  (manifest, digest));
- a retrain FineTuneJob the drift loop asks for runs through `kubetune.local` (the FineTuneJob state
  machine driving a local torchrun) in a background thread; its status is what the next pass observes;
- status lives in memory and is written after every pass to the status file; Events are printed.

Storage credentials come from this shell's environment (AWS_ACCESS_KEY_ID...; KUBETUNE_S3_ENDPOINT or
spec.storage.endpoint), never from Secrets, and never appear on a command line or in a log.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from kubetune import runtimes
from kubetune.api import jobconfig, serving, storage_layout
from kubetune.api.validation import validate
from kubetune.clients import drift_storage, storage
from kubetune.clients.sources import manifest_location, verified_source
from kubetune.local import finetunejob as local
from kubetune.reconcile import adapterdeployment as adp
from kubetune.reconcile import driftloop

log = logging.getLogger("kubetune.local_serving")

UNTIL = ("promoted", "rejected", "drifted", "traffic-done", "never")
VERSION_HEADER = "x-kubetune-version"  # kubetune.agent.proxy.VERSION_HEADER (the agent is not imported here)
ANSWERS_FILE = "answers.jsonl"
MAX_REPLICAS = 4  # agents on one machine; each replica is a real process in front of the one engine
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
# The API allows only s3:// sampling (a cluster's agents and operator share no file system) and
# drift_pass validates retrain FineTuneJobs for a cluster (no file:// outputs). Locally file:// is the
# natural choice for both: these stand in for file:// URIs while a cluster-only check looks at them.


class LocalServingError(Exception):
    """A problem with the input that stops `kubetune local` before anything starts (exit 2)."""

    def __init__(self, messages: list[str]):
        super().__init__("; ".join(messages))
        self.messages = messages


@dataclass(frozen=True)
class Options:
    run_dir: Path
    namespace: str = "default"
    poll: float = 1.0
    status_file: Path | None = None
    traffic: Path | None = None
    traffic_rate: float | None = None  # requests per second; None: as fast as the agents answer
    until: str = "promoted"
    max_seconds: float | None = None
    drift_seconds: float = 2.0
    embedding_url: str | None = None
    embedding_model: str = "all-MiniLM-L6-v2"


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_atomic(path: Path, text: str) -> None:
    """Readers (the agents, a user's `watch cat`) never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        handle.write(text)
    os.replace(handle.name, path)


def emit(line: str) -> None:
    print(line, flush=True)


# --- the input ---------------------------------------------------------------------------------------


def _local_path(uri: str) -> Path | None:
    return Path(storage_layout.split_uri(uri)[2]) if uri.startswith("file://") else None


FINETUNEJOB_FILE = "finetunejob.json"  # written by `kubetune local -f finetunejob.yaml` in RUN_DIR/<job>/


def finetunejob_source(job_name: str, namespace: str, run_dir: Path | None) -> tuple[dict | None, str]:
    """A fineTuneJobRef as the uri source it stands for locally: the published adapter of the job's last
    `kubetune local` run in this run directory (RUN_DIR/<job>/finetunejob.json), as the controller reads
    status.adapter of the FineTuneJob in the cluster. (None, why) when there is none to serve."""
    rerun = f"run it first: kubetune local -f <its FineTuneJob YAML> --run-dir {run_dir or 'RUN_DIR'}"
    if run_dir is None:
        return None, f"local mode resolves a fineTuneJobRef from a run directory (--run-dir); {rerun}"
    path = run_dir / job_name / FINETUNEJOB_FILE
    try:
        job = json.loads(path.read_text())
    except FileNotFoundError:
        return None, f"FineTuneJob {job_name} has not run with `kubetune local` in {run_dir} (no {path}); {rerun}"
    except (OSError, ValueError) as exc:
        return None, f"{path} is not readable: {exc}; {rerun}"
    job_namespace = (job.get("metadata") or {}).get("namespace")
    if job_namespace and job_namespace != namespace:
        return None, (f"FineTuneJob {job_name} in {path} ran in namespace {job_namespace}, not {namespace} (a "
                      f"fineTuneJobRef names a job of the AdapterDeployment's namespace); run it with -n {namespace}")
    status = job.get("status") or {}
    adapter = status.get("adapter") or {}
    if status.get("phase") != "Succeeded" or not adapter.get("manifestUri") or not adapter.get("digest"):
        failure = (status.get("failure") or {}).get("message") or status.get("message") or ""
        return None, (f"FineTuneJob {job_name} ended in phase {status.get('phase', 'Pending')} without a published "
                      f"adapter ({path}{': ' + failure[:300] if failure else ''}); {rerun.replace('first', 'again')}")
    return {"uri": adapter["manifestUri"], "digest": adapter["digest"]}, ""


def prepare(document: dict, namespace: str, run_dir: Path | None = None) -> dict:
    """The AdapterDeployment as the API server would hand it over (namespace, uid, defaults), checked
    for what local mode can serve. Raises LocalServingError with every problem (field paths first).
    A `fineTuneJobRef` source becomes the {uri, digest} of the job's adapter published by `kubetune local`
    in `run_dir` (finetunejob_source); it is then verified and served as any uri source."""
    adep = copy.deepcopy(document)
    meta = adep.setdefault("metadata", {})
    meta.setdefault("namespace", namespace)
    meta.setdefault("generation", 1)
    meta.setdefault("uid", str(uuid.uuid4()))
    meta.setdefault("creationTimestamp", now_rfc3339())
    result = validate(adep, local=True)
    name = f"AdapterDeployment/{meta.get('name', '?')}"
    if not result.ok:
        raise LocalServingError([f"{name}: error: {e}" for e in result.errors])
    adep = {**adep, "spec": result.defaulted["spec"]}
    spec = adep["spec"]
    problems = []
    base = spec["baseModel"]["uri"]
    base_dir = _local_path(base)
    if base_dir is None:
        problems.append(f"{name}: error: spec.baseModel.uri: local mode serves a base model from a local "
                        f"directory (file:///path/to/model), not {base}")
    elif not (base_dir / "config.json").is_file():
        problems.append(f"{name}: error: spec.baseModel.uri: {base_dir} is not a model directory (no config.json)")
    for index, adapter in enumerate(spec["adapters"]):
        ref = adapter["source"].get("fineTuneJobRef")
        if ref:
            source, why = finetunejob_source(ref["name"], meta["namespace"], run_dir)
            if source is None:
                problems.append(f"{name}: error: spec.adapters[{index}].source.fineTuneJobRef: {why}")
            else:
                adapter["source"] = source
                emit(f"adapter {adapter['name']}: FineTuneJob {ref['name']} (kubetune local in {run_dir}) published "
                     f"{source['digest']} at {source['uri']}")
    managed = spec["runtime"].get("managed")
    if managed is not None and not 1 <= int(managed.get("replicas", 1)) <= MAX_REPLICAS:
        problems.append(f"{name}: error: spec.runtime.managed.replicas: local mode runs 1 to {MAX_REPLICAS} agents, "
                        f"not {managed.get('replicas')}")
    if problems:
        raise LocalServingError(problems)
    return adep


def replicas(adep: dict) -> int:
    """runtime.managed.replicas; a `selector` runtime (pods someone else runs) is played by one agent."""
    managed = adep["spec"]["runtime"].get("managed")
    return int(managed.get("replicas", 1)) if managed is not None else 1


@dataclass(frozen=True)
class Request:
    path: str
    body: dict


def read_traffic(path: Path, default_model: str) -> list[Request]:
    """One request per JSON line: {"path": "/classify", "body": {...}}, or just the body (path
    /classify). A body without "model" asks for `default_model` (the first adapter's alias)."""
    requests, problems = [], []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise LocalServingError([f"--traffic {path}: {exc.strerror or exc}"]) from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            problems.append(f"--traffic {path} line {number}: not JSON ({exc})")
            continue
        if not isinstance(row, dict):
            problems.append(f"--traffic {path} line {number}: a JSON object is expected")
            continue
        envelope = "body" in row
        body = row["body"] if envelope else row
        request_path = row.get("path", serving.ENGINE_CLASSIFY) if envelope else serving.ENGINE_CLASSIFY
        if not isinstance(body, dict) or not isinstance(request_path, str) or not request_path.startswith("/"):
            problems.append(f"--traffic {path} line {number}: body must be an object and path start with /")
            continue
        requests.append(Request(request_path, {"model": default_model, **body}))
        if len(problems) >= 10:
            break
    if problems:
        raise LocalServingError(problems)
    if not requests:
        raise LocalServingError([f"--traffic {path}: no requests"])
    return requests


# --- processes -----------------------------------------------------------------------------------------


def http_json(method: str, url: str, body: object = None, timeout: float = REQUEST_TIMEOUT) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def post_answer(url: str, body: dict, timeout: float = REQUEST_TIMEOUT) -> tuple[int, bytes, str | None]:
    """POST through an agent: (status, body, the version that answered: the agent's x-kubetune-version)."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(), response.headers.get(VERSION_HEADER)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get(VERSION_HEADER)


def answer_record(request: Request, agent: str, status: int, payload: bytes, version: str | None) -> dict:
    """One line of RUN_DIR/NAME/answers.jsonl: what was asked, who answered, what the model said."""
    body = request.body
    when = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    record = {"time": when, "agent": agent, "path": request.path, "model": body.get("model"),
              "input": body.get("input", body.get("prompt")), "status": status, "version": version}
    try:
        parsed = json.loads(payload) if status == 200 else None
    except ValueError:
        parsed = None
    first = ((parsed or {}).get("data") or (parsed or {}).get("choices") or [None])[0] \
        if isinstance(parsed, dict) else None
    if isinstance(first, dict) and "label" in first:  # /classify
        probs = [p for p in first.get("probs") or [] if isinstance(p, int | float)]
        record["label"] = first["label"]
        record["confidence"] = round(max(probs), 4) if probs else None
    elif isinstance(first, dict) and "text" in first:  # completions
        record["text"] = str(first["text"])[:200]
    elif status != 200:
        record["error"] = payload[:300].decode(errors="replace")
    return record


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


# --- retrains ------------------------------------------------------------------------------------------


class Cancelled(Exception):
    """Raised from a retrain's on_change to stop `local.run` (its finally stops the trainer)."""


@dataclass
class Retrain:
    """A retrain FineTuneJob run by `kubetune.local` in a thread; `job` is its latest object."""
    job: dict
    adapter: str
    run_dir: Path
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self) -> dict:
        with self.lock:
            return copy.deepcopy(self.job)

    def view(self) -> driftloop.RetrainJob:
        """As controllers.adapterdeployment._retrain_view reads a FineTuneJob from the cluster."""
        job = self.snapshot()
        status = job.get("status") or {}
        message = next((c.get("message", "") for c in status.get("conditions") or []
                        if c.get("type") in ("Failed", "Succeeded", "BaselineSufficient")
                        and c.get("status") == "True"), status.get("message", ""))
        return driftloop.RetrainJob(job["metadata"]["name"], status.get("phase", "Pending"), status.get("adapter"),
                                    message or "")

    @property
    def finished(self) -> bool:
        return ((self.snapshot().get("status") or {}).get("phase")) in driftloop.FINISHED


# --- the deployment ------------------------------------------------------------------------------------


class LocalDeployment:
    """One AdapterDeployment on this machine: its processes, its status and its passes."""

    def __init__(self, adep: dict, options: Options):
        self.adep, self.options = adep, options
        self.name, self.namespace = adep["metadata"]["name"], adep["metadata"]["namespace"]
        self.dir = options.run_dir / self.name
        self.status_file = options.status_file or self.dir / "adapterdeployment.json"
        self.desired_file = self.dir / "desired.json"
        self.status: dict = {}
        self.desired: serving.DesiredState | None = None
        self.engine: Child | None = None
        self.agents: list[Agent] = []
        self.retrains: dict[str, Retrain] = {}
        self.verified: dict = {}  # (manifest uri, digest) -> adp.Source, as the controller caches them
        self.reasons_seen: set[str] = set()
        self.print_lock = threading.Lock()
        self.last_progress = ""
        spec = adep["spec"]
        endpoint = (spec.get("storage") or {}).get("endpoint") or os.environ.get("KUBETUNE_S3_ENDPOINT") or None
        region = (spec.get("storage") or {}).get("region") or os.environ.get("AWS_REGION") or None
        self.s3 = storage.S3Settings(endpoint=endpoint, region=region,
                                     access_key=os.environ.get(jobconfig.ENV_S3_ACCESS_KEY) or None,
                                     secret_key=os.environ.get(jobconfig.ENV_S3_SECRET_KEY) or None)
        self.store = storage.ObjectStore(self.s3)
        embedder = None
        if options.embedding_url:
            from kubetune.clients.embeddings import EmbeddingClient  # only with an embedding service

            embedder = EmbeddingClient(options.embedding_url, options.embedding_model)
        # one retrain at a time on one machine: two trainers would halve each other's cores
        self.analyzer = drift_storage.Analyzer(embedder=embedder, drift_seconds=options.drift_seconds, max_retrains=1,
                                                  local=True)
        self.traffic: TrafficSender | None = None
        self.events: list[dict] = []  # every Event with its time, for the report
        self.timeline: list[dict] = []  # per alias: stable, canary and its weight, whenever they change
        self.abort = threading.Event()  # set by Ctrl-C / SIGTERM: stops a start that is still waiting

    # --- output ---

    def event(self, type_: str, reason: str, message: str) -> None:
        self.reasons_seen.add(reason)
        self.events.append({"time": now_rfc3339(), "type": type_, "reason": reason, "message": message[:1000]})
        with self.print_lock:
            emit(f"EVENT {type_} {reason}: {message}")

    def document(self) -> dict:
        return {**self.adep, "status": self.status}

    # --- processes ---

    def start(self) -> None:
        spec = self.adep["spec"]
        runtime = spec["runtime"].get("managed") or spec["runtime"].get("selector") or {}
        # The CPU engine reserves nothing per rank: without an explicit maxLoraRank it accepts what the
        # rollout's preflight accepts (its runtime's largest), so no engine restart is ever needed for a rank.
        max_rank = int(runtime.get("maxLoraRank") or runtimes.runtime_of(spec).lora_ranks[-1])
        max_loras = int((spec["runtime"].get("managed") or {}).get("maxLoras", 4))
        model_dir = _local_path(spec["baseModel"]["uri"])
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.setdefault("HF_HUB_OFFLINE", "1")  # a local directory never needs the hub; no network waits
        port = _free_port()
        self.engine = Child("engine", [sys.executable, "-m", "kubetune_engine", "--model", str(model_dir),
                                       "--host", "127.0.0.1", "--port", str(port), "--max-lora-rank", str(max_rank),
                                       "--max-loras", str(max_loras)], self.dir / "engine.log", env)
        self.engine.start()
        engine_url = f"http://127.0.0.1:{port}"
        for index in range(replicas(self.adep)):
            pod = f"{self.name}-{index}"
            agent_dir = self.dir / "agents" / pod
            agent_port = _free_port()
            command = [sys.executable, "-m", "kubetune.agent", "--engine-url", engine_url, "--host", "127.0.0.1",
                       "--port", str(agent_port), "--namespace", self.namespace, "--pod-name", pod,
                       "--desired-file", str(self.desired_file), "--report-file", str(agent_dir / "report.json"),
                       "--cache-dir", str(agent_dir / "cache"), "--sync-seconds", str(AGENT_SYNC_SECONDS),
                       "--report-seconds", str(AGENT_REPORT_SECONDS),
                       "--sample-flush-records", str(SAMPLE_FLUSH_RECORDS),
                       "--sample-flush-seconds", str(SAMPLE_FLUSH_SECONDS), "--max-backoff", "5"]
            if self.s3.endpoint:
                command += ["--s3-endpoint", self.s3.endpoint]  # credentials stay in the environment
            if self.s3.region:
                command += ["--s3-region", self.s3.region]
            agent = Agent(pod, agent_port, agent_dir / "report.json", Child(f"agent {pod}", command,
                                                                          agent_dir / "agent.log", env))
            agent.report_file.unlink(missing_ok=True)  # an earlier run's report is not this agent's
            agent.child.start()
            self.agents.append(agent)
        for agent in self.agents:
            agent.child.wait_healthy(agent.url + "/healthz", AGENT_STARTUP_SECONDS, self.abort)
        self.engine.wait_healthy(engine_url + runtimes.cpu.RUNTIME.api.health, ENGINE_STARTUP_SECONDS, self.abort)

    def stop(self) -> None:
        """Everything this run started, whatever state it is in: threads are told first (a request or a
        trainer stops as soon as its process does), then the agents (they flush their samples), the engine."""
        if self.traffic is not None:
            self.traffic.cancel()
        for retrain in self.retrains.values():
            retrain.cancel.set()
        for agent in self.agents:
            agent.child.stop()
        if self.engine is not None:
            self.engine.stop()
        if self.traffic is not None:
            self.traffic.join()
        for retrain in self.retrains.values():
            if retrain.thread is not None:
                retrain.thread.join(60)  # local.run stops its trainer (SIGTERM, SIGKILL after 30 s)

    def check_processes(self) -> None:
        """A pod's container that exits is restarted by kubelet; here it ends the run with its log."""
        for child in [self.engine, *(a.child for a in self.agents)]:
            if child is not None and not child.alive:
                raise RuntimeError(f"{child.name} exited with code {child.process.returncode} "
                                   f"(log {child.log_path}):\n{child.tail()}")

    # --- one pass, as controllers.adapterdeployment.reconcile ---

    async def resolve(self, adapter: dict) -> adp.Source:
        """A uri source as a verified manifest: every file's size and sha256, once per (uri, digest)."""
        name, src = adapter["name"], adapter["source"]
        return await verified_source(self.store, manifest_location(src["uri"]), src.get("digest"), name,
                                     self.verified)

    async def reconcile(self) -> None:
        adep = self.document()
        records = {r["name"]: r for r in self.status.get("adapters") or []}
        # a promoted retrain is served instead of the spec's source (while that source is unchanged)
        view = driftloop.rollout_view(adep, records)
        sources = {a["name"]: await self.resolve(a) for a in view["spec"]["adapters"]}
        now = now_rfc3339()
        plan = adp.decide(adp.Observed(adep=view, now=now, sources=sources, pods=[a.pod_view() for a in self.agents],
                                       desired=self.desired), adp.Settings(resync_seconds=self.options.poll))
        if plan.desired is not None:
            write_atomic(self.desired_file, plan.desired.to_json())
            self.desired = plan.desired
            log.info("desired state written", extra={"adapterdeployment": self.name,
                                                     "generation": plan.desired.generation})
        events = list(plan.events)
        for adapter in adep["spec"]["adapters"]:
            if adapter.get("drift"):
                rec = next(r for r in plan.status["adapters"] if r["name"] == adapter["name"])
                rec["drift"], drift_events = await self._drift_pass(adep, adapter, rec, now)
                events += drift_events
        self.status = plan.status
        self.record_timeline(now)
        write_atomic(self.status_file, json.dumps(self.document(), indent=2))
        for event in events:
            self.event(event.type, event.reason, event.message)
        self.progress()

    async def _drift_pass(self, adep: dict, adapter: dict, rec: dict, now: str) -> tuple[dict, list]:
        jobs = [r.view() for r in self.retrains.values() if r.adapter == adapter["name"]]

        async def in_flight() -> int:
            return sum(1 for r in self.retrains.values() if not r.finished)

        async def create(job: dict) -> None:
            self._create_retrain(job)

        return await drift_storage.drift_pass(self.analyzer, self.store, adep, adapter, rec, now, jobs=jobs,
                                              in_flight=in_flight, create_job=create)

    def _create_retrain(self, job: dict) -> None:
        """Run the retrain FineTuneJob with `kubetune.local` in a thread (the cluster's FineTuneJob controller)."""
        name = job["metadata"]["name"]
        adapter_name = job["metadata"]["labels"][driftloop.LABEL_RETRAIN_ADAPTER]
        spec_adapter = next(a for a in self.adep["spec"]["adapters"] if a["name"] == adapter_name)
        template_output = spec_adapter["drift"]["retrain"]["template"]["spec"].get("output") or {}
        job = local.prepare_job(job, namespace=self.namespace, output=template_output.get("uri"))
        job["status"] = {"phase": "Pending"}
        retrain = Retrain(job, adapter_name, self.dir / "retrains" / name)
        self.retrains[name] = retrain

        def on_change(current: dict, events: list) -> None:
            with retrain.lock:
                retrain.job = copy.deepcopy(current)
            for event in events:
                self.event(event.type, event.reason, f"FineTuneJob/{name}: {event.message}")
            if retrain.cancel.is_set():
                raise Cancelled(name)

        def run() -> None:
            try:
                result = local.run(job, run_dir=retrain.run_dir, on_change=on_change, poll_seconds=1.0)
                log.info("retrain finished", extra={"job": name, "phase": result.phase})
            except Cancelled:
                log.info("retrain stopped", extra={"job": name})
            except Exception as exc:  # the FineTuneJob fails, as a cluster's would, with the reason
                log.exception("retrain crashed", extra={"job": name})
                with retrain.lock:
                    retrain.job["status"] = {**(retrain.job.get("status") or {}), "phase": "Failed",
                                             "message": f"kubetune local: {type(exc).__name__}: {exc}"}

        retrain.thread = threading.Thread(target=run, name=f"retrain-{name}", daemon=True)
        retrain.thread.start()
        log.info("retrain running locally", extra={"job": name, "runDir": str(retrain.run_dir)})

    # --- what the user sees ---

    def record_timeline(self, now: str) -> None:
        adapters = {}
        for rec in self.status.get("adapters") or []:
            adapters[rec.get("alias", rec["name"])] = {
                "stable": (rec.get("stable") or {}).get("version"), "canary": (rec.get("canary") or {}).get("version"),
                "canaryWeight": rec.get("canaryWeight", 0) if rec.get("canary") else 0}
        if not self.timeline or self.timeline[-1]["adapters"] != adapters:
            self.timeline.append({"time": now, "adapters": adapters})

    def drift_windows(self) -> dict[str, list[dict]]:
        """Every closed window's verdict, as the drift loop persisted it under the sampling URI."""
        sampling = (self.adep["spec"].get("trafficSampling") or {}).get("uri")
        out: dict[str, list[dict]] = {}
        for adapter in self.adep["spec"]["adapters"]:
            if not adapter.get("drift") or not sampling:
                continue
            prefix = drift_storage.drift_prefix(sampling, self.namespace, self.name, adapter["name"]) + "windows/"
            windows = []
            try:
                for uri in sorted(self.store.list(prefix)):
                    raw = self.store.read(uri)
                    with contextlib.suppress(ValueError, TypeError):
                        windows.append(json.loads(raw))
            except Exception as exc:  # the report is best effort
                log.warning("could not read the drift windows", extra={"prefix": prefix, "error": str(exc)})
            out[adapter["name"]] = windows
        return out

    def report(self):
        """RUN_DIR/NAME/report/: drift.png, rollout.png, summary.txt (kubetune.report)."""
        from kubetune import report

        if self.timeline:  # the weights held until the end
            self.timeline.append({**self.timeline[-1], "time": now_rfc3339()})
        answers = list(self.traffic.answers) if self.traffic is not None else []
        traffic = ""
        if self.traffic is not None:
            traffic = f"{self.traffic.sent} sent, {self.traffic.failed} failed; answers in {self.traffic.answers_path}"
        extra = [f"  status {self.status_file}",
                 f"  logs   {self.dir} (kubetune-local.log, engine.log, agents/*/agent.log, retrains/*/trainer.log)"]
        return report.adapterdeployment_report(
            self.document(), self.dir / report.REPORT_DIR, windows=self.drift_windows(), timeline=self.timeline,
            answers=answers, events=self.events, traffic=traffic, extra_lines=extra)

    def progress(self) -> None:
        parts = []
        for rec in self.status.get("adapters") or []:
            stable, canary = rec.get("stable"), rec.get("canary")
            text = f"{rec.get('alias', rec['name'])}:"
            if stable:
                loaded = f"{stable.get('podsLoaded', 0)}/{len(self.agents)}"
                text += f" stable {stable['version'].rsplit('@', 1)[-1]} ({loaded} agents)"
            if canary:
                text += f" canary {canary['version'].rsplit('@', 1)[-1]} {rec.get('canaryWeight', 0)}%"
            drift = rec.get("drift") or {}
            if drift:
                window = drift.get("window") or {}
                windows = drift.get("windows") or []
                text += f" | drift {drift.get('state', '?')}, {len(windows)} window(s)"
                text += f" ({sum(1 for w in windows if w.get('drifted'))} drifted)"
                if window:
                    text += f", open window {window.get('index')}: {window.get('requests', 0)} requests"
                retrain = drift.get("retrain") or {}
                if retrain.get("job") in self.retrains:
                    job_status = self.retrains[retrain["job"]].snapshot().get("status") or {}
                    percent = (job_status.get("progress") or {}).get("percent")
                    text += f" | retrain {retrain['job']} {job_status.get('phase', 'Pending')}"
                    text += f" {percent}%" if percent is not None else ""
            parts.append(text)
        if self.traffic is not None:
            parts.append(f"traffic {self.traffic.sent}/{len(self.traffic.requests)} sent"
                         + (f", {self.traffic.failed} failed" if self.traffic.failed else ""))
        line = "  ".join(parts)
        if line and line != self.last_progress:
            self.last_progress = line
            with self.print_lock:
                emit(line)

    def ready(self) -> bool:
        """Every alias has a stable version loaded by every agent (traffic would get 503 before)."""
        records = self.status.get("adapters") or []
        return bool(records) and all((r.get("stable") or {}).get("podsLoaded", 0) == len(self.agents)
                                     for r in records)

    def reached(self, until: str) -> bool:
        records = self.status.get("adapters") or []
        history = [(r, h) for r in records for h in (r.get("drift") or {}).get("history") or []]
        if until == "promoted":
            for rec, entry in history:
                stable = rec.get("stable") or {}
                if (entry.get("outcome") == "Promoted" and stable.get("digest") == entry.get("digest")
                        and not rec.get("canary") and stable.get("podsLoaded") == len(self.agents)):
                    return True
            return False
        if until == "rejected":
            return any(entry.get("outcome") == "Rejected" for _, entry in history)
        if until == "drifted":
            return "DriftDetected" in self.reasons_seen or any((r.get("drift") or {}).get("drifted") for r in records)
        if until == "traffic-done":
            if self.traffic is None or not self.traffic.done:
                return False
            # the agents' last samples are written within SAMPLE_FLUSH_SECONDS; one analysis after that
            after = self.traffic.finished_at + SAMPLE_FLUSH_SECONDS + 0.5
            keys = [(self.namespace, self.name, a["name"]) for a in self.adep["spec"]["adapters"] if a.get("drift")]
            return all(self.analyzer.last_analysis.get(k, 0.0) >= after for k in keys)
        return False

    def summary(self) -> str:
        lines = ["", f"AdapterDeployment {self.namespace}/{self.name}: {self.status.get('phase', 'Pending')}"]
        for rec in self.status.get("adapters") or []:
            stable = rec.get("stable") or {}
            lines.append(f"  {rec.get('alias')}: stable {stable.get('version', '-')} ({stable.get('digest', '-')})")
            drift = rec.get("drift") or {}
            if drift:
                lines.append(f"    drift: {drift.get('state')}; {len(drift.get('windows') or [])} window(s) in status")
            for entry in drift.get("history") or []:
                lines.append(f"    retrain {entry.get('job')}: {entry.get('outcome')} ({entry.get('reason')}) "
                             f"{entry.get('message', '')}")
        if self.traffic is not None:
            lines.append(f"  traffic: {self.traffic.sent} sent, {self.traffic.failed} failed")
        lines.append(f"  status {self.status_file}")
        lines.append(f"  logs   {self.dir} (kubetune-local.log, engine.log, agents/*/agent.log, "
                     "retrains/*/trainer.log)")
        return "\n".join(lines)


# --- traffic -------------------------------------------------------------------------------------------


class TrafficSender:
    """Sends each request once, round robin over the agents, at `rate` per second (None: back to back)."""

    def __init__(self, requests: list[Request], agents: list[Agent], rate: float | None,
                 answers_path: Path | None = None):
        self.requests, self.agents, self.rate = requests, agents, rate
        self.answers_path = answers_path
        self.answers: list[dict] = []  # answer_record per request, also appended to answers_path
        self.sent = self.failed = 0
        self.done = False
        self.finished_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def cancel(self) -> None:
        self._stop.set()

    def join(self) -> None:
        if self._thread.is_alive():
            self._thread.join(REQUEST_TIMEOUT + 5)

    def _run(self) -> None:
        started = time.monotonic()
        handle = None
        if self.answers_path is not None:
            self.answers_path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.answers_path, "w")  # noqa: SIM115 - closed below, whichever way the loop ends
        try:
            self._send(started, handle)
        finally:
            if handle is not None:
                handle.close()

    def _send(self, started: float, handle) -> None:
        for index, request in enumerate(self.requests):
            if self._stop.is_set():
                return
            if self.rate:
                delay = started + index / self.rate - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    return
            agent = self.agents[index % len(self.agents)]
            try:
                status, body, version = post_answer(agent.url + request.path, request.body)
            except OSError as exc:
                status, body, version = 0, str(exc).encode(), None
            answer = answer_record(request, agent.pod, status, body, version)
            self.answers.append(answer)
            if handle is not None:
                handle.write(json.dumps(answer) + "\n")
                handle.flush()
            self.sent += 1
            if status != 200:
                self.failed += 1
                if self.failed <= 3:  # the first few say why; the count says how many
                    log.warning("traffic request failed", extra={"agent": agent.pod, "status": status,
                                                                 "answer": body[:300].decode(errors="replace")})
        self.finished_at = time.monotonic()
        self.done = True
        log.info("traffic sent", extra={"requests": self.sent, "failed": self.failed,
                                        "seconds": round(self.finished_at - started, 1)})


# --- the command ---------------------------------------------------------------------------------------


def _usage(adep: dict, agents: list[Agent]) -> list[str]:
    namespace = adep["metadata"]["namespace"]
    aliases = [serving.alias_name(namespace, a["name"]) for a in adep["spec"]["adapters"]]
    lines = [f"serving {', '.join(aliases)} on {len(agents)} agent(s):"]
    lines += [f"  {a.url}  (pod {a.pod})" for a in agents]
    body = json.dumps({"model": aliases[0], "input": "..."})
    lines.append(f"  curl -s {agents[0].url}{serving.ENGINE_CLASSIFY} -d '{body}'")
    lines.append(f"  (a generator: {serving.ENGINE_COMPLETIONS} with \"prompt\"; logs under the run directory)")
    return lines


def _configure_logging(path: Path) -> None:
    """Structured logs (JSON lines) of this process to a file at INFO; warnings also on stderr. The
    console stays for Events and progress."""
    from kubetune.logs import JsonFormatter

    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(path)
    to_file.setFormatter(JsonFormatter())
    to_console = logging.StreamHandler()
    to_console.setFormatter(JsonFormatter())
    to_console.setLevel(logging.WARNING)
    logging.basicConfig(level=logging.INFO, handlers=[to_file, to_console], force=True)


async def _loop(deployment: LocalDeployment, options: Options, requests: list[Request] | None,
                stop: asyncio.Event) -> int:
    started = time.monotonic()
    while True:
        pass_started = time.monotonic()
        deployment.check_processes()
        try:
            await deployment.reconcile()
        except Exception as exc:  # the controller retries a failed pass; so does this loop
            log.warning("pass failed: retrying", extra={"adapterdeployment": deployment.name,
                                                       "error": f"{type(exc).__name__}: {exc}"})
        if requests and deployment.traffic is None and deployment.ready():
            deployment.traffic = TrafficSender(requests, deployment.agents, options.traffic_rate,
                                               deployment.dir / ANSWERS_FILE)
            deployment.traffic.start()
            emit(f"sending {len(requests)} request(s) from {options.traffic}")
        if deployment.reached(options.until):
            emit(f"reached --until {options.until} after {time.monotonic() - started:.0f} s")
            return 0
        if options.max_seconds is not None and time.monotonic() - started >= options.max_seconds:
            print(f"error: --until {options.until} not reached within --max-seconds {options.max_seconds:g}",
                  file=sys.stderr, flush=True)
            return 1
        wait = max(0.0, options.poll - (time.monotonic() - pass_started))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), wait)
        if stop.is_set():
            emit("stopped")
            return 0 if options.until == "never" else 130


async def _serve(deployment: LocalDeployment, options: Options, requests: list[Request] | None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def interrupted() -> None:
        stop.set()
        deployment.abort.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, interrupted)
    try:
        try:
            await asyncio.to_thread(deployment.start)
        except Aborted:
            emit("stopped")
            return 0 if options.until == "never" else 130
        for line in _usage(deployment.adep, deployment.agents):
            emit(line)
        return await _loop(deployment, options, requests, stop)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def run(document: dict, options: Options) -> int:
    """`kubetune local` for an AdapterDeployment: 0 when --until is reached, 1 on --max-seconds or a process
    that died, 2 for input that cannot be served (nothing is started then)."""
    try:
        adep = prepare(document, options.namespace, options.run_dir)
        requests = None
        if options.traffic is not None:
            alias = serving.alias_name(adep["metadata"]["namespace"], adep["spec"]["adapters"][0]["name"])
            requests = read_traffic(options.traffic, alias)
        if options.until == "traffic-done" and requests is None:
            raise LocalServingError(["--until traffic-done needs --traffic"])
        if options.until in ("promoted", "rejected", "drifted") and not any(
                a.get("drift") for a in adep["spec"]["adapters"]):
            raise LocalServingError([f"--until {options.until}: no adapter has drift (use --until never or "
                                     "traffic-done)"])
    except LocalServingError as exc:
        for message in exc.messages:
            print(message, file=sys.stderr)
        return 2
    deployment = LocalDeployment(adep, options)
    _configure_logging(deployment.dir / "kubetune-local.log")
    log.info("serving locally", extra={"adapterdeployment": deployment.name, "runDir": str(deployment.dir),
                                       "replicas": replicas(adep)})
    try:
        code = asyncio.run(_serve(deployment, options, requests))
    except RuntimeError as exc:  # a process that did not start or died
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:  # before the loop's own handler was in place
        code = 130
    finally:
        # The children run in their own session: a second Ctrl-C interrupting this would orphan them.
        with _sigint_ignored():
            deployment.stop()
    try:
        print(deployment.report().summary)
    except Exception as exc:  # never lose the exit code to the report
        log.exception("report failed")
        print(deployment.summary())
        print(f"  (report failed: {type(exc).__name__}: {exc})")
    return code


@contextlib.contextmanager
def _sigint_ignored():
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing to change
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)

"""Adapter rollout on N local serving pods: kubetune's hot load (operator decision -> agents -> engines)
against a restart-the-engine rollout of the same adapter change, in one run.

    .venv/bin/python bench/adapter_rollout.py --json /tmp/rollout.json           # N=3, 5 runs of each, ~3.5 min
    .venv/bin/python bench/adapter_rollout.py --smoke --json /tmp/rollout.json   # N=2, 1 run of each, < 60 s

A "pod" is one CPU engine process (`python -m kubetune_engine`, vLLM's API, MiniLM base) and, for the hot
path, one agent process (`python -m kubetune.agent`, local mode: desired file, report file) in front of it.
The two adapter versions are MiniLM LoRA intent classifiers trained at start by the real trainer on
examples/data/intents (a few steps each, a few seconds; `--adapters DIR` keeps and reuses them) and
published by it into a file:// store.

Hot path (kubetune). Every pod serves version A. t0 = the AdapterDeployment's spec changes: the source
becomes version B (uri + digest, strategy Immediate, unloadGraceSeconds 0); from t0 the timed path runs the
operator's pure decision `reconcile.adapterdeployment.decide` (the source resolved as the controller does:
manifest read, every file's sha256 checked), writes `plan.desired` into every agent's desired file (the
ConfigMap in a cluster), and each agent, on its next sync tick (`--sync-seconds`, default 2 as shipped),
downloads B into its cache, verifies every file's sha256 against the manifest and the manifest against the
digest, and loads it into its engine (`/v1/load_lora_adapter`); the alias then routes to B (weight 100; A
has weight 0 and serves only where B is not loaded yet). A pod's time = from t0 to the first client answer
it gives with `x-kubetune-version: <B>`; the rollout's time = the slowest pod's. Also reported: when the
decision promoted B (status stable = B, decided from the agents' report files), and, from the agents'
logs, when each read the new desired state and when its load finished.

Restart baseline. The same change done the way restart-based serving does it: no agent; clients call the
engine with a fixed adapter name (`team-a/intents`), and a new version means a new engine process. The CPU
engine has no start-up flag for adapters (vLLM's `--lora-modules`), so a restarted pod is: start
`python -m kubetune_engine` (import torch, load the base), wait for `/health` 200, then
`POST /v1/load_lora_adapter` with B's directory on local disk (no download, no verification: generous to
the baseline). Two strategies:

- rolling (a Deployment with maxSurge 1, maxUnavailable 0): one pod at a time, the new engine starts next
  to the old one (a new port), and once it is ready with B loaded the pod's endpoint switches to it and
  the old engine gets SIGTERM (it finishes in-flight requests); no capacity is ever lost;
- recreate (a Deployment with strategy Recreate): every engine is stopped, then all start at once;
  the service has no endpoint in between.

A pod's time = from t0 to the first client answer from its engine running B. While either rollout runs,
a client thread per pod sends one /classify request at a time (then sleeps `--trickle-interval`, 0.1 s);
the requests that failed (connection refused, no endpoint, non-200) are counted. Also measured once
before the pods start (not in --smoke): one engine restarted alone (start, first load, first answer); a
rolling restart of N pods cannot beat N times that.

Fairness details. All N (+1 during a surge) engines share this machine's cores, so each gets
`OMP_NUM_THREADS=1` (`--engine-threads`): without it torch's spinning worker threads slow every process
in proportion to the number of processes, which inflates the restarts far more than the hot loads. The
agents are started at random offsets within one sync period (pods of a Deployment do not tick in phase),
and each run's t0 falls at a random phase of their ticks.

Runs alternate A->B, B->A, ...; the median over runs is reported, and the ratio restart / hot of the
medians. CPU timings on a shared 2-core machine are noisy: the 1-minute load average is recorded before
and after. Engine start-up here is a small model on CPU (seconds); a vLLM restart on a GPU (weights,
CUDA graphs) takes far longer, so this is the small end of the gap. The hot path's time is mostly the
wait for the agents' next sync tick (uniform within `--sync-seconds`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import datetime as dt
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for _src in (REPO_ROOT / "operator", REPO_ROOT / "trainer_image"):
    if str(_src) not in sys.path:
        sys.path.insert(0, str(_src))

from common import free_port, load_average, minilm_dir  # noqa: E402  (bench/, on sys.path)
from kubetune.api import jobconfig, serving, storage_layout  # noqa: E402
from kubetune.api.validation import validate  # noqa: E402
from kubetune.clients.storage import ObjectStore, S3Settings, check_published  # noqa: E402
from kubetune.reconcile import adapterdeployment as adp  # noqa: E402
from kubetune.runtimes import cpu  # noqa: E402

NS = "team-a"
ADAPTER = "intents"
ALIAS = serving.alias_name(NS, ADAPTER)
FIXED_NAME = ALIAS  # the restart baseline's adapter name: the same name, other weights, each release
EXAMPLE_JOB = REPO_ROOT / "examples" / "finetunejob-local-intents.yaml"
INTENTS = REPO_ROOT / "examples" / "data" / "intents"
PROBE = "what is my account balance"
STARTUP_TIMEOUT = 180
ROLLOUT_TIMEOUT = 180

DEFAULTS = {"pods": 3, "repeats": 5}
SMOKE = {"pods": 2, "repeats": 1}
TRAIN_STEPS = {"a": 8, "b": 4}  # two real versions over the same 12 intents (one head size), seconds each


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


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# --- adapters ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterVersion:
    label: str  # "a" | "b"
    manifest_uri: str
    digest: str
    path: Path  # the published adapter directory (file:// store): what the restart baseline loads

    @property
    def name(self) -> str:
        return serving.version_name(NS, ADAPTER, self.digest)


def _train(root: Path, label: str, steps: int) -> str:
    """Train one adapter with the real trainer (`python -m kubetune_trainer`, its log in a file); its
    manifest URI."""
    import yaml

    doc = yaml.safe_load(EXAMPLE_JOB.read_text())
    spec = doc["spec"]
    spec["baseModel"]["uri"] = f"file://{minilm_dir()}"
    spec["dataset"].update(uri=f"file://{INTENTS / 'train.jsonl'}",
                           validationUri=f"file://{INTENTS / 'validation.jsonl'}")
    spec["output"]["uri"] = f"file://{root / 'store'}"
    training = {k: v for k, v in spec["training"].items() if k not in ("epochs", "earlyStopping")}
    spec["training"] = {**training, "maxSteps": steps, "evalSteps": steps}
    name = f"bench-rollout-{label}"
    doc["metadata"] = {"name": name, "namespace": NS, "uid": f"uid-{name}", "generation": 1}
    result = validate(doc, local=True)
    if not result.ok:
        raise SystemExit(f"the bench's job does not validate: {result.errors}")
    config = jobconfig.job_config(NS, name, f"uid-{name}", result.defaulted["spec"])
    config_path = root / f"config-{label}.json"
    config_path.write_text(config.to_json())
    with open(root / f"train-{label}.log", "wb") as log:
        code = subprocess.call([sys.executable, "-m", "kubetune_trainer", "--config", str(config_path),
                                "--work-dir", str(root / f"work-{label}")], stdout=log, stderr=subprocess.STDOUT,
                               cwd=REPO_ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if code != 0:
        raise SystemExit(f"training {label} failed ({code}): see {root / f'train-{label}.log'}")
    return config.storage.manifest_uri


def adapters(root: Path) -> tuple[list[AdapterVersion], float]:
    """The two versions, trained now or reused from `root/adapters.json`; and the seconds spent training."""
    index = root / "adapters.json"
    started = time.monotonic()
    uris = json.loads(index.read_text()) if index.is_file() else {}
    versions = []
    for label, steps in TRAIN_STEPS.items():
        uri = uris.get(label)
        check = check_published(ObjectStore(S3Settings()), uri.rsplit("/", 1)[0] + "/") if uri else None
        if check is None or not check.found or check.problems:
            uri = uris[label] = _train(root, label, steps)
            check = check_published(ObjectStore(S3Settings()), uri.rsplit("/", 1)[0] + "/")
            assert check.found and not check.problems, check
        prefix = storage_layout.adapter_prefix(uri.rsplit("/", 1)[0] + "/", check.document["digest"])
        versions.append(AdapterVersion(label, uri, check.document["digest"], Path(storage_layout.split_uri(prefix)[2])))
    index.write_text(json.dumps(uris, indent=2))
    assert versions[0].digest != versions[1].digest
    return versions, time.monotonic() - started


# --- processes ---------------------------------------------------------------------------------------------


class Engine:
    """`python -m kubetune_engine` on the MiniLM base."""

    threads = 1  # OMP_NUM_THREADS of every engine (--engine-threads)
    spawned: list[Engine] = []  # every engine this run started (all are stopped at the end, whatever happened)

    def __init__(self, log_dir: Path, tag: str):
        self.port = free_port()
        self.log_path = log_dir / f"engine-{tag}-{self.port}.log"
        self.process: subprocess.Popen | None = None
        self.version: str | None = None  # restart baseline: the one adapter version this process serves

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self) -> Engine:
        command = [sys.executable, "-m", "kubetune_engine", "--model", str(minilm_dir()), "--port", str(self.port),
                   "--served-model-name", "minilm"]
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
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


class Agent:
    """`python -m kubetune.agent` in local mode in front of one engine."""

    def __init__(self, engine: Engine, root: Path, pod: str, sync_seconds: float):
        self.engine, self.pod = engine, pod
        root.mkdir(parents=True, exist_ok=True)
        self.desired_path, self.report_path = root / "desired.json", root / "report.json"
        self.log_path = root / "agent.log"
        self.port = free_port()
        command = [sys.executable, "-m", "kubetune.agent", "--engine-url", engine.url, "--host", "127.0.0.1",
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
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


# --- the operator's decision, in this process ------------------------------------------------------------


class LocalOperator:
    """The AdapterDeployment controller's loop without a cluster: resolve the source (manifest verified),
    read the agents' reports as the pods' annotations, `decide`, write `plan.desired` to every agent."""

    def __init__(self, agents: list[Agent], source: AdapterVersion, base_model: dict):
        self.agents = agents
        self.doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "AdapterDeployment",
                    "metadata": {"name": ADAPTER, "namespace": NS, "generation": 1},
                    "spec": {"baseModel": base_model, "runtime": {"managed": {"replicas": len(agents)}},
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
        check = check_published(self.store, uri.rsplit("/", 1)[0] + "/", True)
        if not check.found or check.problems:
            return adp.Source(manifest_uri=uri, problems=(("ManifestInvalid", f"{uri}: {check.problems}"),))
        document = check.document
        return adp.Source(manifest_uri=uri, digest=document["digest"], rank=document.get("rank"),
                          base_model=document.get("baseModel"))

    def reconcile(self) -> adp.Plan:
        result = validate(copy.deepcopy(self.doc))
        assert result.ok, result.errors
        adep = {**self.doc, "spec": result.defaulted["spec"], "status": self.status}
        sources = {a["name"]: self._resolve(a["source"]["uri"]) for a in adep["spec"]["adapters"]}
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        pods = [adp.Pod(a.pod, True, a.report()) for a in self.agents]
        plan = adp.decide(adp.Observed(adep=adep, now=now, sources=sources, pods=pods, desired=self.desired),
                          adp.Settings())
        self.status = plan.status
        if plan.desired is not None:
            self.desired = plan.desired
            for agent in self.agents:
                agent.set_desired(plan.desired)
        return plan

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


@dataclass
class Trickle:
    """One client per pod: a /classify request at a time, then a short sleep. `target()` says where the
    pod's requests go now: (url, model, version served there or None to read the response header); None
    when the pod has no endpoint (recreate: between stop and ready)."""

    target: object
    interval: float
    answers: list = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> Trickle:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.is_set():
            where = self.target()
            sent = time.monotonic()
            if where is None:
                self.answers.append(Answer(sent, sent, False, None))
            else:
                url, model, version = where
                status, headers, _ = http("POST", url + serving.ENGINE_CLASSIFY, {"model": model, "input": PROBE},
                                          timeout=30)
                self.answers.append(Answer(sent, time.monotonic(), status == 200,
                                           (version or headers.get("x-kubetune-version")) if status == 200 else None))
            time.sleep(self.interval)

    def halt(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(60)

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


# --- the two rollouts ---------------------------------------------------------------------------------------


def reference_restart(version: AdapterVersion, log_dir: Path) -> dict:
    """One engine restarted alone (nothing else running): cold start to /health, the first adapter load,
    the first answer. A rolling restart of N pods cannot beat N times this."""
    t0 = time.monotonic()
    engine = Engine(log_dir, "reference").spawn().wait_ready()
    ready = time.monotonic()
    engine.load(FIXED_NAME, version.path)
    loaded = time.monotonic()
    status, _, text = http("POST", engine.url + serving.ENGINE_CLASSIFY, {"model": FIXED_NAME, "input": PROBE})
    done = time.monotonic()
    engine.stop()
    if status != 200:
        raise RuntimeError(f"reference engine: {status} {text}")
    return {"start_s": round(ready - t0, 3), "load_s": round(loaded - ready, 3),
            "first_answer_s": round(done - loaded, 3), "total_s": round(done - t0, 3)}


def hot_runs(engines: list[Engine], versions: list[AdapterVersion], runs: int, args, work: Path) -> list[dict]:
    # Agents started together would tick in phase (all read the new desired state at one moment); pods of a
    # Deployment start at unrelated moments. Each agent starts at a random offset within one sync period.
    rng = random.Random(5)
    offsets = sorted(rng.uniform(0, args.sync_seconds) for _ in engines)
    agents, began = [], time.monotonic()
    try:
        for i, (engine, offset) in enumerate(zip(engines, offsets, strict=True)):
            time.sleep(max(0.0, began + offset - time.monotonic()))
            agents.append(Agent(engine, work / f"agent-{i}", f"pod-{i}", args.sync_seconds))
        for agent in agents:
            agent.wait_ready()
        base_model = check_published(ObjectStore(S3Settings()),
                                     versions[0].manifest_uri.rsplit("/", 1)[0] + "/").document["baseModel"]
        operator = LocalOperator(agents, versions[0], base_model)
        operator.reconcile()
        wait_until(lambda: all((a.report() or {}).get("loaded") == {versions[0].name: versions[0].digest}
                               for a in agents), ROLLOUT_TIMEOUT, "every pod loading the first version")
        wait_until(lambda: operator.reconcile() and operator.status.get("phase") == "Ready", 30, "Ready")
        trickles = [Trickle(lambda a=a: (a.url, ALIAS, None), args.trickle_interval).start() for a in agents]
        results = []
        try:
            time.sleep(1.0)
            for run in range(runs):
                old, new = versions[run % 2], versions[(run + 1) % 2]
                time.sleep(rng.uniform(0.5, 0.5 + args.sync_seconds))  # t0 at a random phase of the ticks
                wall0, t0 = time.time(), time.monotonic()
                operator.set_source(new)
                plan = operator.reconcile()
                decided = time.monotonic() - t0
                assert plan.desired is not None and operator.status["adapters"][0]["canary"]["digest"] == new.digest
                generation = plan.desired.generation
                per_pod = wait_serving(trickles, new.name, t0)
                wait_until(lambda n=new: operator.reconcile() and operator.stable_digest() == n.digest,
                           ROLLOUT_TIMEOUT, "promotion")
                promoted = time.monotonic() - t0
                # settled: the old version unloaded everywhere (grace 0) before the next run
                wait_until(lambda n=new: all((a.report() or {}).get("loaded") == {n.name: n.digest} for a in agents),
                           ROLLOUT_TIMEOUT, "the old version unloaded")
                end = time.monotonic()
                failed = [t.failed(t0, end) for t in trickles]
                results.append({
                    "run": run + 1, "from": old.label, "to": new.label, "all_serving_s": max(per_pod),
                    "per_pod_s": per_pod, "decide_and_write_s": round(decided, 4), "promoted_s": round(promoted, 3),
                    "agents": [_agent_phases(a, wall0, generation, new.name) for a in agents],
                    "requests": sum(n for _, n in failed), "failed_requests": sum(f for f, _ in failed)})
                print(f"  hot run {run + 1}: {old.label}->{new.label} all pods serving in {max(per_pod):.2f} s "
                      f"(per pod {per_pod}), promoted at {promoted:.2f} s, failed requests "
                      f"{results[-1]['failed_requests']}/{results[-1]['requests']}", flush=True)
        finally:
            for trickle in trickles:
                trickle.halt()
        return results
    finally:
        for agent in agents:
            agent.stop()


def _agent_phases(agent: Agent, wall0: float, generation: int, version: str) -> dict:
    """From the agent's log: when it read the new desired state and when the engine had the version loaded."""
    read = loaded = None
    for moment, line in agent.log_times():
        if moment < wall0 - 0.01:
            continue
        if read is None and line.get("message") == "desired state" and line.get("generation") == generation:
            read = round(moment - wall0, 3)
        if loaded is None and line.get("message") == "adapter loaded" and line.get("version") == version:
            loaded = round(moment - wall0, 3)
    return {"pod": agent.pod, "read_desired_s": read, "loaded_s": loaded}


@dataclass(eq=False)
class Pod:
    engine: Engine | None  # where the pod's endpoint points (None: no endpoint)


def _rolling(pods: list[Pod], new: AdapterVersion, log_dir: Path, tag: str, t0: float,
             stopping: list) -> list[dict]:
    """maxSurge 1, maxUnavailable 0: per pod, a new engine next to the old one; once it is ready with the
    new version loaded, the endpoint switches to it and the old one gets SIGTERM. The next pod does not
    wait for the old process to exit (terminating pods do not count against a Deployment's surge)."""
    phases = []
    for i, pod in enumerate(pods):
        began = time.monotonic()
        fresh = Engine(log_dir, f"pod{i}-{tag}").spawn().wait_ready()
        ready = time.monotonic()
        fresh.load(FIXED_NAME, new.path)
        fresh.version = new.name
        previous, pod.engine = pod.engine, fresh
        switched = time.monotonic()
        phases.append({"pod": i, "start_s": round(ready - began, 3), "load_s": round(switched - ready, 3),
                       "switched_s": round(switched - t0, 3)})
        stopping.append(threading.Thread(target=previous.stop, daemon=True))
        stopping[-1].start()
    return phases


def _recreate(pods: list[Pod], new: AdapterVersion, log_dir: Path, tag: str, t0: float) -> list[dict]:
    """Strategy Recreate: every engine stopped (SIGTERM, waited for), then every new one started at once."""
    previous = [pod.engine for pod in pods]
    for pod in pods:
        pod.engine = None
    with concurrent.futures.ThreadPoolExecutor(len(pods)) as pool:
        list(pool.map(Engine.stop, previous))
    stopped = time.monotonic()
    fresh = [Engine(log_dir, f"pod{i}-{tag}").spawn() for i in range(len(pods))]

    def bring_up(index: int) -> dict:
        engine = fresh[index].wait_ready()
        ready = time.monotonic()
        engine.load(FIXED_NAME, new.path)
        engine.version = new.name
        pods[index].engine = engine
        return {"pod": index, "stop_s": round(stopped - t0, 3), "start_s": round(ready - stopped, 3),
                "load_s": round(time.monotonic() - ready, 3)}

    with concurrent.futures.ThreadPoolExecutor(len(pods)) as pool:
        return list(pool.map(bring_up, range(len(pods))))


def restart_runs(engines: list[Engine], versions: list[AdapterVersion], runs: int, strategy: str, args,
                 log_dir: Path) -> tuple[list[dict], list[Engine]]:
    """The restart baseline; returns its results and the engines left running."""
    pods = [Pod(e) for e in engines]
    current = versions[0]
    for pod in pods:  # every pod serves version A under the fixed name, loaded at its (earlier) start
        pod.engine.unload_all()
        pod.engine.load(FIXED_NAME, current.path)
        pod.engine.version = current.name

    def target(pod: Pod):
        engine = pod.engine
        return None if engine is None else (engine.url, FIXED_NAME, engine.version)

    trickles = [Trickle(lambda p=pod: target(p), args.trickle_interval).start() for pod in pods]
    results, stopping = [], []
    try:
        time.sleep(1.0)
        for run in range(runs):
            old, new = versions[run % 2], versions[(run + 1) % 2]
            time.sleep(0.5)
            t0 = time.monotonic()
            tag = f"run{run + 1}"
            if strategy == "rolling":
                phases = _rolling(pods, new, log_dir, tag, t0, stopping)
            else:
                phases = _recreate(pods, new, log_dir, tag, t0)
            per_pod = wait_serving(trickles, new.name, t0)
            end = time.monotonic()
            failed = [t.failed(t0, end) for t in trickles]
            results.append({"run": run + 1, "from": old.label, "to": new.label, "all_serving_s": max(per_pod),
                            "per_pod_s": per_pod, "phases": sorted(phases, key=lambda p: p["pod"]),
                            "requests": sum(n for _, n in failed),
                            "failed_requests": sum(f for f, _ in failed)})
            print(f"  restart ({strategy}) run {run + 1}: {old.label}->{new.label} all pods serving in "
                  f"{max(per_pod):.2f} s (per pod {per_pod}), failed requests "
                  f"{results[-1]['failed_requests']}/{results[-1]['requests']}", flush=True)
    finally:
        for trickle in trickles:
            trickle.halt()
        for thread in stopping:
            thread.join(60)
    return results, [pod.engine for pod in pods if pod.engine is not None]


# --- main ---------------------------------------------------------------------------------------------------


def summary(runs: list[dict]) -> dict:
    values = [r["all_serving_s"] for r in runs]
    return {"median_all_serving_s": round(statistics.median(values), 3), "min_s": min(values), "max_s": max(values),
            "failed_requests": sum(r["failed_requests"] for r in runs), "requests": sum(r["requests"] for r in runs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=None, help=f"engine(+agent) pairs (default {DEFAULTS['pods']})")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"rollouts of each kind (default {DEFAULTS['repeats']})")
    parser.add_argument("--smoke", action="store_true", help=f"CI-sized: {SMOKE}, rolling restarts only")
    parser.add_argument("--restart", choices=("rolling", "recreate", "both", "none"), default=None,
                        help="restart baseline strategies (default both; --smoke: rolling; none: the hot path only)")
    parser.add_argument("--sync-seconds", type=float, default=2.0, help="the agents' sync period (shipped default 2)")
    parser.add_argument("--engine-threads", type=int, default=1,
                        help="OMP_NUM_THREADS of each engine process (N+1 engines share this machine's cores)")
    parser.add_argument("--trickle-interval", type=float, default=0.1,
                        help="each pod's client sleeps this long between requests")
    parser.add_argument("--adapters", type=Path, default=None,
                        help="keep the two trained adapters here and reuse them on the next run")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the processes' logs, desired and report files here (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else DEFAULTS
    Engine.threads = args.engine_threads
    pods = args.pods or sizes["pods"]
    repeats = args.repeats or sizes["repeats"]
    strategies = {"rolling": ["rolling"], "recreate": ["recreate"], "both": ["rolling", "recreate"], "none": []}[
        args.restart or ("rolling" if args.smoke else "both")]
    load_before = load_average()
    print(f"adapter rollout bench: {pods} pods, {repeats} run(s) each, sync {args.sync_seconds} s, "
          f"{os.cpu_count()} CPUs, load average {load_before}", flush=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kubetune-rollout-") as tmp:
        work = Path(tmp)
        if args.keep:
            work = args.keep
            work.mkdir(parents=True, exist_ok=True)
        adapter_root = args.adapters or work / "adapters"
        adapter_root.mkdir(parents=True, exist_ok=True)
        versions, train_seconds = adapters(adapter_root)
        print(f"adapters ready in {train_seconds:.1f} s: {versions[0].name} (a), {versions[1].name} (b)", flush=True)
        logs = work / "logs"
        logs.mkdir(exist_ok=True)
        reference = None if args.smoke or not strategies else reference_restart(versions[1], logs)
        if reference:
            print(f"one engine alone: start {reference['start_s']} s, first load {reference['load_s']} s, "
                  f"first answer {reference['first_answer_s']} s", flush=True)
        t = time.monotonic()
        engines = [Engine(logs, f"pod{i}").spawn() for i in range(pods)]
        try:
            for engine in engines:
                engine.wait_ready()
            engine_start = time.monotonic() - t
            print(f"{pods} engines started at once in {engine_start:.1f} s", flush=True)
            hot = hot_runs(engines, versions, repeats, args, work)
            restart = {}
            for strategy in strategies:
                restart[strategy], engines = restart_runs(engines, versions, repeats, strategy, args, logs)
        finally:
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                list(pool.map(Engine.stop, Engine.spawned))
    load_after = load_average()
    results = {"hot": {"runs": hot, **summary(hot)}}
    for strategy, runs in restart.items():
        results[f"restart_{strategy}"] = {"runs": runs, **summary(runs)}
    hot_median = results["hot"]["median_all_serving_s"]
    ratios = {strategy: round(results[f"restart_{strategy}"]["median_all_serving_s"] / hot_median, 2)
              for strategy in restart}
    report = {"settings": {"pods": pods, "repeats": repeats, "sync_seconds": args.sync_seconds,
                           "trickle_interval": args.trickle_interval,
                           "engine_threads": args.engine_threads, "smoke": args.smoke, "strategies": strategies,
                           "train_steps": TRAIN_STEPS},
              "machine": {"cpus": os.cpu_count(), "load_average_before": load_before, "load_average_after": load_after},
              "adapters": {v.label: {"version": v.name, "digest": v.digest} for v in versions},
              "train_seconds": round(train_seconds, 1), "engine_start_seconds": round(engine_start, 2),
              "reference_restart_one_engine": reference,
              "results": results, "ratio": ratios, "wall_seconds": round(time.monotonic() - started, 1)}

    print()
    print(f"| rollout | runs | all {pods} pods serving the new version, median s (min-max) | failed requests |")
    print("|---|---|---|---|")
    rows = [("kubetune hot load (agent)", "hot")] + [(f"engine restart, {s}", f"restart_{s}") for s in restart]
    for title, key in rows:
        r = results[key]
        print(f"| {title} | {len(r['runs'])} | {r['median_all_serving_s']:.2f} ({r['min_s']:.2f}-{r['max_s']:.2f}) "
              f"| {r['failed_requests']} of {r['requests']} |")
    for strategy, ratio in ratios.items():
        print(f"ratio restart ({strategy}) / hot: {ratio}x")
    print(f"load average before {load_before}, after {load_after}; wall {report['wall_seconds']} s")
    if max(load_before, load_after) > 1.5 * (os.cpu_count() or 1):
        print("warning: the machine was busy (load average above 1.5 x CPUs): timings are inflated", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

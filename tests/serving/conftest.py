"""The serving agent in front of the real CPU engine: both as real processes on free ports, adapters
trained by the real trainer and published into a file:// store, desired state and report as files.

Session-scoped (trained and started once): two MiniLM intent classifiers over the same 5 CLINC150 intents
(8 and 4 steps: two versions of one alias with different digests, one head size) and two MiniLM engines. Each test
gets fresh agents (fresh cache, report and counters); an agent owns its engine's LoRA set, and every
agent fixture empties the engine first, so tests do not see each other's adapters.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kubetune.api import serving, storage_layout
from kubetune.api.validation import validate
from kubetune.clients.storage import ObjectStore, S3Settings, publish_adapter
from kubetune_operator.clients import sources
from kubetune_operator.reconcile import adapterdeployment as adp
from tests.agent.conftest import read_report, write_desired
from tests.conftest import REPO_ROOT
from tests.engine.conftest import Classifier, EngineProcess, _train_classifier, free_port
from tests.trainer.conftest import adapter_dir, job_spec, lm_corpus, make_config, run_in_process, write_jsonl
from tests.trainer.test_minilm_clinc import minilm_dir

NS = "team-a"
ADAPTER = "intents"
ALIAS = serving.alias_name(NS, ADAPTER)
SYNC_SECONDS = 0.2
REPORT_SECONDS = 0.5
AGENT_STARTUP_TIMEOUT = 30


# --- HTTP ------------------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    text: str
    headers: dict = field(default_factory=dict)

    @property
    def json(self):
        return json.loads(self.text)

    @property
    def version(self) -> str | None:
        return self.headers.get("x-kubetune-version")


def http(method: str, url: str, body: object = None, timeout: float = 30) -> Answer:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Answer(response.status, response.read().decode(), _headers(response.headers))
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, exc.read().decode(), _headers(exc.headers))


def _headers(headers) -> dict:
    return {k.lower(): v for k, v in headers.items()}


def eventually(predicate, timeout: float = 20.0, message: str = "condition", interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


# --- adapters -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    """One adapter version in the store, as the operator resolves it."""

    path: Path  # the trainer's output directory it was published from
    adapter: str
    job_prefix: str
    manifest_uri: str
    digest: str
    document: dict
    classifier: Classifier | None = None

    @property
    def name(self) -> str:
        return serving.version_name(NS, self.adapter, self.digest)

    @property
    def alias(self) -> str:
        return serving.alias_name(NS, self.adapter)

    def version(self, weight: int = 100, role: str = "stable") -> serving.Version:
        return serving.Version(self.name, self.digest, self.manifest_uri, weight, role)

    def stored(self, path: str) -> Path:
        """A published file in the file:// store."""
        prefix = storage_layout.adapter_prefix(self.job_prefix, self.digest)
        return Path(storage_layout.split_uri(prefix + path)[2])


def trainer_manifest(adapter_path: Path) -> dict:
    """The manifest the trainer published next to the adapter (<job prefix>/adapter/sha256-<hex>/)."""
    return json.loads((adapter_path.parents[1] / "manifest.json").read_text())


def publish(store_root: Path, trained: Classifier | Path, tag: str, adapter: str = ADAPTER) -> Published:
    """Publish a trained adapter again with the storage client, under its own job prefix in a file:// store,
    with the trainer's manifest fields (baseModel, rank, labels...)."""
    classifier = trained if isinstance(trained, Classifier) else None
    path = classifier.path if classifier else Path(trained)
    fields = {k: v for k, v in trainer_manifest(path).items()
              if k not in ("api", "digest", "adapterPath", "files", "createdAt")}
    job_prefix = f"file://{store_root}/{NS}/{adapter}/{tag}/"
    document = publish_adapter(ObjectStore(S3Settings()), path, job_prefix, fields)
    return Published(path, adapter, job_prefix, storage_layout.manifest_uri(job_prefix), document["digest"],
                     document, classifier)


@pytest.fixture(scope="session")
def classifiers(tmp_path_factory) -> tuple[Classifier, Classifier]:
    """Two short trainings of MiniLM + LoRA r8 on the same 5 intents (the tests need two real versions, not
    accurate ones)."""
    v1 = _train_classifier(tmp_path_factory.mktemp("serving-v1"), 5, 20, 8, "serving-v1")
    v2 = _train_classifier(tmp_path_factory.mktemp("serving-v2"), 5, 20, 4, "serving-v2")
    return v1, v2


@pytest.fixture(scope="session")
def store_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serving-store")


@pytest.fixture(scope="session")
def versions(classifiers, store_root) -> tuple[Published, Published]:
    v1, v2 = (publish(store_root, c, tag) for c, tag in zip(classifiers, ("v1", "v2"), strict=True))
    assert v1.digest != v2.digest
    return v1, v2


# --- processes ------------------------------------------------------------------------------------------


class AgentProcess:
    """`python -m kubetune_agent` in local mode (desired file, report file) in front of one engine."""

    def __init__(self, engine: EngineProcess, root: Path, pod: str = "serve-0"):
        self.engine, self.root, self.pod = engine, root, pod
        root.mkdir(parents=True, exist_ok=True)
        self.desired_path = root / "desired.json"
        self.report_path = root / "report.json"
        self.cache_dir = root / "cache"
        self.log_path = root / "agent.log"
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> AgentProcess:
        command = [sys.executable, "-m", "kubetune_agent", "--engine-url", self.engine.url, "--host", "127.0.0.1",
                   "--port", str(self.port), "--namespace", NS, "--pod-name", self.pod,
                   "--desired-file", str(self.desired_path), "--report-file", str(self.report_path),
                   "--cache-dir", str(self.cache_dir), "--sync-seconds", str(SYNC_SECONDS),
                   "--report-seconds", str(REPORT_SECONDS), "--max-backoff", "1"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
        deadline = time.monotonic() + AGENT_STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the agent exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                if http("GET", self.url + "/healthz", timeout=2).status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        pytest.fail(f"the agent did not answer within {AGENT_STARTUP_TIMEOUT} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def set_desired(self, desired: serving.DesiredState) -> None:
        write_desired(self.desired_path, desired)

    def report(self) -> serving.AgentReport | None:
        return read_report(self.report_path)

    def raw_report(self) -> dict | None:
        try:
            return json.loads(self.report_path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def post(self, path: str, body: dict, timeout: float = 30) -> Answer:
        return http("POST", self.url + path, body, timeout)

    def get(self, path: str) -> Answer:
        return http("GET", self.url + path, timeout=10)

    def classify(self, text: str, model: str = ALIAS) -> Answer:
        return self.post(serving.ENGINE_CLASSIFY, {"model": model, "input": text})

    def wait_loaded(self, names: set[str], timeout: float = 30) -> serving.AgentReport:
        """Until the engine has exactly `names` and the agent's report says so."""
        eventually(lambda: set(self.engine.model_ids()[1:]) == names, timeout, f"engine loads {sorted(names)}")
        return eventually(lambda: (r := self.report()) and r.engine_ready and set(r.loaded) == names and r,
                          timeout, f"report of {sorted(names)}")


def empty_engine(engine: EngineProcess) -> None:
    for name in engine.model_ids()[1:]:
        assert engine.unload(name).status == 200


@pytest.fixture(scope="session")
def lm_version(tiny_llama, tmp_path_factory, store_root) -> Published:
    """A tiny-Llama causal LoRA adapter (rank 8, 10 steps), published as team-a/writer."""
    root = tmp_path_factory.mktemp("serving-lm")
    data = write_jsonl(root / "train.jsonl", lm_corpus())
    spec = job_spec(tiny_llama, data, root / "out", method__lora__rank=8, method__lora__alpha=16,
                    training__maxSteps=10, training__evalSteps=10)
    config = make_config(spec, name="serving-lm")
    return publish(store_root, adapter_dir(config, run_in_process(config, root / "work")), "v1", "writer")


@pytest.fixture(scope="session")
def llama_engine(tiny_llama, tmp_path_factory):
    engine = EngineProcess(tiny_llama, tmp_path_factory.mktemp("serving-llama-logs"), "--max-loras", "2",
                           "--max-lora-rank", "8", served_name="tiny-llama").start()
    yield engine
    engine.stop()


@pytest.fixture(scope="session")
def engines(tmp_path_factory):
    """Two MiniLM engines (their base serves as `minilm`)."""
    logs = tmp_path_factory.mktemp("serving-engine-logs")
    # the kubetune-cpu runtime's engines: they serve classification adapters (modules_to_save)
    started = [EngineProcess(minilm_dir(), logs, "--fidelity", "kubetune", served_name="minilm") for _ in range(2)]
    try:
        with ThreadPoolExecutor(2) as pool:  # both start at once (start() waits for /health)
            for future in [pool.submit(engine.start) for engine in started]:
                future.result()
        yield started
    finally:
        for engine in started:
            engine.stop()


@pytest.fixture
def engine(engines) -> EngineProcess:
    if engines[0].process.poll() is not None:  # a test killed it and could not restart it
        engines[0].start()
    return engines[0]


@pytest.fixture
def make_agent(tmp_path):
    """Start an agent in front of an (emptied) engine; every agent is stopped after the test."""
    agents: list[AgentProcess] = []

    def start(engine: EngineProcess, desired: serving.DesiredState | None = None,
              pod: str = "serve-0") -> AgentProcess:
        empty_engine(engine)
        agent = AgentProcess(engine, tmp_path / pod, pod)
        if desired is not None:
            agent.set_desired(desired)
        agents.append(agent)
        return agent.start()

    yield start
    for agent in agents:
        agent.stop()


def desired(generation: int, *versions: serving.Version, alias: str = ALIAS) -> serving.DesiredState:
    return serving.DesiredState(generation=generation, adapters=[serving.AliasState(alias, list(versions))])


# --- the operator's decision, without a cluster -----------------------------------------------------------


def resolve(manifest_uri: str) -> adp.Source:
    """An adapter source as the operator's shell resolves a `uri` source (`clients.sources.verified_source`):
    the manifest read, every file's size and sha256 checked, the adapter's config read for pre-flight."""
    return asyncio.run(sources.verified_source(ObjectStore(S3Settings()), manifest_uri, None, ADAPTER, {}))


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class LocalOperator:
    """The AdapterDeployment controller's loop over agents in local mode: resolve the source, read the
    agents' report files as the pods' annotations, `decide`, write `plan.desired` to every desired file."""

    def __init__(self, agents: list[AgentProcess], source: Published, name: str = ADAPTER,
                 strategy: dict | None = None):
        self.agents = agents
        self.doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "AdapterDeployment",
                    "metadata": {"name": name, "namespace": NS, "generation": 1},
                    # the base as trained on (the manifest's identity is not a spec field); the CPU engine
                    # runtime, which serves classifiers (modules_to_save) as well as causal LMs
                    "spec": {"baseModel": {k: source.document["baseModel"][k] for k in ("uri", "revision")},
                             "runtime": {"engine": "kubetune-cpu", "managed": {"replicas": len(agents)}},
                             "adapters": [{"name": ADAPTER, "source": {"uri": source.manifest_uri,
                                                                       "digest": source.digest}}],
                             "strategy": strategy or {"type": "Immediate", "unloadGraceSeconds": 0}}}
        self.status: dict = {}
        self.desired: serving.DesiredState | None = None
        self.events: list[adp.Event] = []

    def set_source(self, source: Published) -> None:
        """`kubectl apply` of a new spec.adapters[0].source: the generation bumps."""
        self.doc["spec"]["adapters"][0]["source"] = {"uri": source.manifest_uri, "digest": source.digest}
        self.doc["metadata"]["generation"] += 1

    def pods(self) -> list[adp.Pod]:
        return [adp.Pod(a.pod, True, a.raw_report()) for a in self.agents]

    def reconcile(self) -> adp.Plan:
        result = validate(self.doc, local=True)  # every pod runs on this machine, on a file:// store
        assert result.ok, result.errors
        adep = {**self.doc, "spec": result.defaulted["spec"], "status": self.status}
        sources = {a["name"]: resolve(a["source"]["uri"]) for a in adep["spec"]["adapters"]}
        plan = adp.decide(adp.Observed(adep=adep, now=now_rfc3339(), sources=sources, pods=self.pods(),
                                       desired=self.desired), adp.Settings())
        self.status = plan.status
        self.events += plan.events
        if plan.desired is not None:
            self.desired = plan.desired
            for agent in self.agents:
                agent.set_desired(plan.desired)
        return plan

    def record(self) -> dict:
        return self.status["adapters"][0]

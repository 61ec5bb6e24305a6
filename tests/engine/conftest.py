"""The CPU engine (`kubetune_engine`) as a real subprocess, serving adapters the real trainer produced.

Adapters are trained once per session (tiny sizes: a few seconds each): two tiny-Llama LoRA adapters
of ranks 4 and 8, and MiniLM intent classifiers on CLINC150 subsets of 5 and 3 intents (labels.json
next to the head, as kubetune publishes them). Engines are started once per session too; tests load
what they need and unload it again, so they do not depend on each other's order.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.trainer.conftest import adapter_dir, job_spec, lm_corpus, make_config, run_in_process, write_jsonl
from tests.trainer.test_minilm_clinc import clinc_subset, minilm_dir, minilm_spec

STARTUP_TIMEOUT = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Reply:
    status: int
    text: str

    @property
    def json(self):
        return json.loads(self.text)


class EngineProcess:
    """`python -m kubetune_engine` on a free port, with its log in a file."""

    def __init__(self, model: Path, log_dir: Path, *args: str, served_name: str | None = None):
        self.model, self.log_dir, self.args = model, log_dir, list(args)
        self.served_name = served_name or str(model)
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"engine-{self.port}-{self.starts}.log"

    def start(self) -> EngineProcess:
        self.starts += 1
        command = [sys.executable, "-m", "kubetune_engine", str(self.model), "--port", str(self.port), *self.args]
        if self.served_name != str(self.model):
            command += ["--served-model-name", self.served_name]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the engine exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                if self.get("/health").status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.kill()
        pytest.fail(f"the engine was not healthy within {STARTUP_TIMEOUT} s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(self, method: str, path: str, body: object = None, *, raw: bytes | None = None,
                timeout: float = 60) -> Reply:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return Reply(response.status, response.read().decode())
        except urllib.error.HTTPError as exc:
            return Reply(exc.code, exc.read().decode())

    def get(self, path: str) -> Reply:
        return self.request("GET", path, timeout=5)

    def post(self, path: str, body: object) -> Reply:
        return self.request("POST", path, body)

    def load(self, name: str, path: Path | str) -> Reply:
        return self.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})

    def unload(self, name: str) -> Reply:
        return self.post("/v1/unload_lora_adapter", {"lora_name": name})

    def model_ids(self) -> list[str]:
        return [m["id"] for m in self.get("/v1/models").json["data"]]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


# --- adapters ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def lm_adapters(tiny_llama, tmp_path_factory) -> dict[int, Path]:
    """Two tiny-Llama LoRA adapters, ranks 4 and 8 (10 steps each)."""
    root = tmp_path_factory.mktemp("engine-lm")
    data = write_jsonl(root / "train.jsonl", lm_corpus())
    adapters = {}
    for rank in (4, 8):
        spec = job_spec(tiny_llama, data, root / "out", method__lora__rank=rank, method__lora__alpha=2 * rank,
                        training__maxSteps=10, training__evalSteps=10)
        config = make_config(spec, name=f"engine-lm-r{rank}")
        adapters[rank] = adapter_dir(config, run_in_process(config, root / f"work-r{rank}"))
    return adapters


@dataclass(frozen=True)
class Classifier:
    path: Path
    labels: list[str]
    examples: list[tuple[str, str]]  # (training utterance, its intent), a few per intent


def _train_classifier(root: Path, intents: int, per_intent: int, steps: int, name: str) -> Classifier:
    train_path, validation_path, _ = clinc_subset(root, intents, per_intent, max_validation=5 * intents)
    train = [json.loads(line) for line in train_path.read_text().splitlines()]
    spec = minilm_spec(train_path, validation_path, f"file://{root / 'out'}")
    training = spec["training"]
    training.pop("epochs")
    training.update(maxSteps=steps, evalSteps=steps)
    config = make_config(spec, name=name)
    manifest = run_in_process(config, root / "work")
    examples = [(row["text"], row["label"]) for row in train[::per_intent // 2]]
    return Classifier(adapter_dir(config, manifest), list(manifest["labels"]), examples)


@pytest.fixture(scope="session")
def intent_classifier(tmp_path_factory) -> Classifier:
    """MiniLM + LoRA r8 on 5 CLINC150 intents (20 utterances each, 20 steps)."""
    return _train_classifier(tmp_path_factory.mktemp("engine-intents-5"), 5, 20, 20, "engine-intents-5")


@pytest.fixture(scope="session")
def small_classifier(tmp_path_factory) -> Classifier:
    """Another label list (3 intents, 6 steps): its head has another size, so it needs its own base."""
    return _train_classifier(tmp_path_factory.mktemp("engine-intents-3"), 3, 10, 6, "engine-intents-3")


# --- engines ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def llama_engine(tiny_llama, tmp_path_factory):
    engine = EngineProcess(tiny_llama, tmp_path_factory.mktemp("engine-llama-logs"),
                           "--max-loras", "2", "--max-lora-rank", "8").start()
    yield engine
    engine.stop()


@pytest.fixture(scope="session")
def minilm_engine(tmp_path_factory):
    """The kubetune-cpu runtime's engine: classification adapters (modules_to_save) are served."""
    engine = EngineProcess(minilm_dir(), tmp_path_factory.mktemp("engine-minilm-logs"), "--fidelity", "kubetune",
                           served_name="minilm").start()
    yield engine
    engine.stop()

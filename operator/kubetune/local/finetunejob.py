"""`kubetune local`: run a FineTuneJob on this machine through the operator's own state machine.

The same `reconcile.finetunejob.decide` that drives the operator decides every phase here; this module
only carries out its plans on the local machine:

- the ConfigMaps it asks for become job config files in the run directory (a baseline or sweep
  trial job runs in its own subdirectory);
- the PyTorchJob it asks for is played by `LocalPyTorchJob`: torchrun as a subprocess with the
  PyTorchJob's own command (CPU processes or local GPUs), reporting the conditions the Kubeflow
  training operator would (Created, Running, Restarting, Succeeded, Failed) and retrying retryable
  exits (143) up to the job's backoffLimit, as `restartPolicy: ExitCode` does;
- progress.json, manifest.json and the stages' result.json are read from the job's storage exactly
  as the operator reads them. Sweep trials run one after another or, with rankSweep.parallelism,
  as parallel processes sharing the cores.

Storage credentials come from this shell's environment (AWS_ACCESS_KEY_ID...), not from Secrets.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from kubetune.api import jobconfig, storage_layout
from kubetune.clients.storage import check_published, output_store_from_env
from kubetune.reconcile import finetunejob as ftj
from kubetune.render import training as render

log = logging.getLogger(__name__)


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalPyTorchJob:
    """Plays the Kubeflow training operator for one PyTorchJob on this machine."""

    def __init__(self, pytorchjob: dict, config_path: Path, run_dir: Path, nproc: int, env: dict):
        self.object = json.loads(json.dumps(pytorchjob))
        self.object["status"] = {"conditions": [], "replicaStatuses": {"Master": {}}}
        self.config_path, self.run_dir, self.nproc, self.env = config_path, run_dir, nproc, env
        self.backoff_limit = int(self.object["spec"].get("runPolicy", {}).get("backoffLimit", 0) or 0)
        self.process: subprocess.Popen | None = None
        self.attempts = 0
        self.log_path = run_dir / "trainer.log"
        self._condition("Created", "PyTorchJobCreated", "created locally")

    def _condition(self, kind: str, reason: str, message: str) -> None:
        conditions = [c for c in self.object["status"]["conditions"] if c["type"] != kind]
        for condition in conditions:
            if condition["type"] in ("Running", "Restarting") and kind in ("Running", "Restarting", "Succeeded",
                                                                           "Failed"):
                condition["status"] = "False"
        conditions.append({"type": kind, "status": "True", "reason": reason, "message": message,
                           "lastTransitionTime": now()})
        self.object["status"]["conditions"] = conditions

    def command(self) -> list[str]:
        container = self.object["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
        command = list(container["command"])
        if command[:2] != ["python", "-m"]:
            raise ValueError(f"unexpected trainer command {command}")
        launcher, args = command[2], command[3:]  # the pod's launcher and its torchrun-style arguments
        args[args.index("--config") + 1] = str(self.config_path)
        return [sys.executable, "-m", launcher, "--nproc_per_node", str(self.nproc), "--nnodes", "1",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args,
                "--work-dir", str(self.run_dir / "scratch")]

    def start(self) -> None:
        self.attempts += 1
        self.object["status"].setdefault("startTime", now())
        handle = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
        self.process = subprocess.Popen(self.command(), stdout=handle, stderr=subprocess.STDOUT,
                                        env={**os.environ, **self.env}, cwd=self.run_dir)
        self.object["status"]["replicaStatuses"]["Master"]["active"] = 1  # failed counts stay: attempts
        if self.attempts == 1:
            self._condition("Running", "PyTorchJobRunning", f"torchrun with {self.nproc} process(es)")
        else:
            self._condition("Restarting", "PyTorchJobRestarting", f"attempt {self.attempts}")

    def poll(self) -> None:
        if self.process is None or self.process.poll() is None:
            return
        code = self.process.returncode
        self.process = None
        master = self.object["status"]["replicaStatuses"]["Master"]
        master.pop("active", None)
        if code == jobconfig.EXIT_OK:
            master["succeeded"] = 1
            self.object["status"]["completionTime"] = now()
            self._condition("Succeeded", "PyTorchJobSucceeded", "the trainer exited 0")
            return
        master["failed"] = master.get("failed", 0) + 1
        if code >= 128 and self.attempts <= self.backoff_limit:
            log.warning("retryable trainer exit: restarting", extra={"code": code, "attempt": self.attempts})
            self.start()
            return
        self.object["status"]["completionTime"] = now()
        self._condition("Failed", "PyTorchJobFailed", f"the trainer exited with code {code} (log: {self.log_path})")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()


@dataclass
class LocalResult:
    job: dict
    run_dir: Path
    events: list[ftj.Event]

    @property
    def phase(self) -> str:
        return (self.job.get("status") or {}).get("phase", "")


def local_processes(pytorchjob: dict) -> int:
    """The PyTorchJob's whole world on this machine: nprocPerNode x its pods (several nodes run as one)."""
    pods = sum(int(r.get("replicas", 1)) for r in pytorchjob["spec"]["pytorchReplicaSpecs"].values())
    return int(pytorchjob["spec"]["nprocPerNode"]) * pods


def parse_override(item: str) -> tuple[list[str], object]:
    """`training.maxSteps=20` -> (["training", "maxSteps"], 20); the value is read as YAML."""
    import yaml

    path, sep, value = item.partition("=")
    if not sep or not path:
        raise ValueError(f"--set {item!r}: expected PATH=VALUE (a spec field path like training.maxSteps)")
    return path.removeprefix("spec.").split("."), yaml.safe_load(value)


def prepare_job(document: dict, *, namespace: str, output: str | None,
                overrides: list[tuple[list[str], object]] = ()) -> dict:
    """The object as the API server would hand it over, with local overrides applied."""
    job = json.loads(json.dumps(document))
    meta = job.setdefault("metadata", {})
    meta.setdefault("namespace", namespace)
    meta["uid"] = str(uuid.uuid4())  # every local run is a new job: it never sees an earlier run's files
    meta.setdefault("generation", 1)
    meta.setdefault("creationTimestamp", now())
    if output:
        job["spec"]["output"] = {**job["spec"].get("output", {}), "uri": output}
    return apply_overrides(job, overrides)


def apply_overrides(document: dict, overrides: list[tuple[list[str], object]]) -> dict:
    """`--set` values (parse_override) written into the document's spec, in place; the document."""
    for path, value in overrides:
        target = document.setdefault("spec", {})
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = value
    return document


def _threads_per_process(job: dict, pytorchjob: dict) -> dict:
    """Trials running side by side share the cores instead of each taking all of them."""
    labels = pytorchjob["metadata"].get("labels") or {}
    parallel = int((job["spec"].get("rankSweep") or {}).get("parallelism", 1) or 1)
    if labels.get(render.LABEL_STAGE) != jobconfig.STAGE_TRIAL or parallel <= 1:
        return {}
    per = max(1, (os.cpu_count() or 1) // (parallel * local_processes(pytorchjob)))
    return {"OMP_NUM_THREADS": str(per)}


def run(job: dict, *, run_dir: Path, on_change=None, poll_seconds: float = 1.0,
        settings: ftj.Settings | None = None) -> LocalResult:
    """Drive `job` to a terminal phase. `on_change(job, events)` is called after every decision.

    The training job runs in `run_dir`; a baseline or sweep-trial job in `run_dir/<its name>/`."""
    settings = settings or ftj.Settings(local=True, publish_timeout_seconds=60)
    run_dir.mkdir(parents=True, exist_ok=True)
    main_name = job["metadata"]["name"]
    config_maps: dict[str, dict] = {}
    trainers: dict[str, LocalPyTorchJob] = {}
    all_events: list[ftj.Event] = []
    store = output_store_from_env(job["spec"])  # connects lazily, on the first read

    def read_json(uri: str) -> dict | None:
        raw = store.read(uri)
        return json.loads(raw) if raw else None

    try:
        while True:
            trainer = trainers.get(main_name)
            pytorchjob = trainer.object if trainer else None
            stage_jobs = {name: t.object for name, t in trainers.items() if name != main_name}
            manifest = progress = None
            if ftj.needs_manifest(job, pytorchjob):
                manifest = check_published(store, ftj.job_prefix(job))
            if ftj.needs_progress(job, pytorchjob):
                progress = read_json(storage_layout.progress_uri(ftj.job_prefix(job)))
            reports = {
                name: ftj.StageReport(result=read_json(storage_layout.result_uri(prefix)),
                                      progress=read_json(storage_layout.progress_uri(prefix)))
                for name, prefix in ftj.needs_stage_reports(job, stage_jobs).items()
            }
            main_config = render.config_map_name(main_name)
            plan = ftj.decide(ftj.Observed(
                job=job, now=now(), config_map=config_maps.get(main_config), pytorchjob=pytorchjob,
                manifest=manifest, progress=progress, stage_jobs=stage_jobs,
                stage_config_maps=frozenset(n for n in config_maps if n != main_config),
                stage_reports=reports), settings)
            for child in plan.create:
                name = child["metadata"]["name"]
                if child["kind"] == "ConfigMap":
                    config_maps[name] = child
                elif child["kind"] == "PyTorchJob" and name not in trainers:
                    work = run_dir if name == main_name else run_dir / name
                    work.mkdir(parents=True, exist_ok=True)
                    volumes = child["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["volumes"]
                    config_map = config_maps[next(v["configMap"]["name"] for v in volumes if "configMap" in v)]
                    (work / jobconfig.CONFIG_FILE).write_text(config_map["data"][jobconfig.CONFIG_FILE])
                    trainers[name] = LocalPyTorchJob(child, work / jobconfig.CONFIG_FILE, work, local_processes(child),
                                                     env={"KUBETUNE_LOCAL": "1", **_threads_per_process(job, child)})
                    trainers[name].start()
            job = {**job, "status": plan.status}
            all_events.extend(plan.events)
            if on_change:
                on_change(job, plan.events)
            if job["status"].get("phase") in ftj.TERMINAL:
                return LocalResult(job, run_dir, all_events)
            time.sleep(poll_seconds)
            for each in trainers.values():
                each.poll()
    finally:
        for each in trainers.values():
            each.stop()

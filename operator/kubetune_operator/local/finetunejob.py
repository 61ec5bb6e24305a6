"""`kubetune local`: a FineTuneJob on this machine, driven by the operator's own `shell.run_pass`.

ConfigMaps become job config files in the run directory; each workload is played by `LocalWorkload`
(its backend's launch command as processes); storage is read as the operator reads it. Credentials
come from this shell's environment, not from Secrets. See docs/concepts.md for the local runner.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from kubetune.api import documents, jobconfig, storage_layout
from kubetune.api import manifest as manifest_api
from kubetune.clients.storage import check_published, output_store_from_env
from kubetune_operator.backends import backend_for_kind
from kubetune_operator.backends.workload import (
    CREATED,
    FAILED,
    RESTARTING,
    RUNNING,
    SUCCEEDED,
    LocalLaunch,
    WorkloadStatus,
)
from kubetune_operator.reconcile import finetunejob as ftj
from kubetune_operator.reconcile.finetunejob_plan import Event, StageReport
from kubetune_operator.shell import finetunejob as shell
from kubetune_operator.shell import now_rfc3339

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalWorkload:
    """Plays any backend's workload on this machine: its launch command as processes, retrying retryable
    exits (>= 128) up to its backoff limit, reported as the backend-neutral status."""

    def __init__(self, workload: dict, launch: LocalLaunch, config_path: Path, run_dir: Path, env: dict):
        self.metadata, self.kind, self.launch = workload["metadata"], workload["kind"], launch
        self.config_path, self.run_dir, self.env = config_path, run_dir, env
        self.process: subprocess.Popen | None = None
        self.attempts = 0
        self.counts = {"active": 0, "succeeded": 0, "failed": 0}
        self._phase(CREATED, "created locally")
        self.start_time: str | None = None
        self.completion_time: str | None = None
        self.log_path = run_dir / "trainer.log"

    def _phase(self, phase: str, message: str) -> None:
        self.phase, self.reason, self.message, self.since = phase, f"{self.kind}{phase}", message, now_rfc3339()

    def status(self) -> WorkloadStatus:
        return WorkloadStatus(
            name=self.metadata["name"], kind=self.kind, labels=dict(self.metadata.get("labels") or {}),
            phase=self.phase, started=self.attempts > 0, reason=self.reason, message=self.message, since=self.since,
            start_time=self.start_time, completion_time=self.completion_time,
            replicas={self.launch.replica: dict(self.counts)}, attempts=sum(self.counts.values()))

    def command(self) -> list[str]:
        command = list(self.launch.command)
        if command[:2] != ["python", "-m"]:
            raise ValueError(f"unexpected trainer command {command}")
        launcher, args = command[2], command[3:]  # the pod's launcher and its torchrun-style arguments
        args[args.index("--config") + 1] = str(self.config_path)
        return [sys.executable, "-m", launcher, "--nproc_per_node", str(self.launch.processes), "--nnodes", "1",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args,
                "--work-dir", str(self.run_dir / "scratch")]

    def start(self) -> None:
        self.attempts += 1
        self.start_time = self.start_time or now_rfc3339()
        handle = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
        self.process = subprocess.Popen(self.command(), stdout=handle, stderr=subprocess.STDOUT,
                                        env={**os.environ, **self.env}, cwd=self.run_dir)
        self.counts["active"] = 1  # failed counts stay: attempts
        if self.attempts == 1:
            self._phase(RUNNING, f"torchrun with {self.launch.processes} process(es)")
        else:
            self._phase(RESTARTING, f"attempt {self.attempts}")

    def poll(self) -> None:
        if self.process is None or self.process.poll() is None:
            return
        code = self.process.returncode
        self.process = None
        self.counts["active"] = 0
        if code == jobconfig.EXIT_OK:
            self.counts["succeeded"] = 1
            self.completion_time = now_rfc3339()
            self._phase(SUCCEEDED, "the trainer exited 0")
            return
        self.counts["failed"] += 1
        if code >= 128 and self.attempts <= self.launch.backoff_limit:
            log.warning("retryable trainer exit: restarting", extra={"code": code, "attempt": self.attempts})
            self.start()
            return
        self.completion_time = now_rfc3339()
        self._phase(FAILED, f"the trainer exited with code {code} (log: {self.log_path})")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()


class LocalPass:
    """The port of `shell.run_pass` on this machine: the job and its children in memory, workloads as
    processes, storage from the environment. One object serves every pass of one run."""

    def __init__(self, job: dict, run_dir: Path):
        self.job, self.run_dir = job, run_dir
        self.main_name = job["metadata"]["name"]
        self.config_maps: dict[str, dict] = {}
        self.workloads: dict[str, LocalWorkload] = {}
        self.events: list[Event] = []  # of the last pass
        self.store = output_store_from_env(job["spec"])  # connects lazily, on the first read

    def _read_json(self, uri: str) -> dict | None:
        raw = self.store.read(uri)
        return json.loads(raw) if raw else None

    async def read_job(self) -> dict | None:
        self.events = []
        return self.job

    async def list_config_maps(self, job: dict) -> list[dict]:
        return list(self.config_maps.values())

    async def list_workloads(self, job: dict) -> list[shell.Workload]:
        return [shell.Workload(w.metadata, w.status()) for w in self.workloads.values()]

    async def check_manifest(self, job_prefix: str) -> manifest_api.ManifestCheck:
        return check_published(self.store, job_prefix, verify_merged=True)

    async def read_progress(self, prefix: str) -> dict | None:
        return self._read_json(storage_layout.progress_uri(prefix))

    async def read_stage_report(self, prefix: str) -> StageReport:
        return StageReport(result=self._read_json(storage_layout.result_uri(prefix)),
                               progress=self._read_json(storage_layout.progress_uri(prefix)))

    async def secret_keys(self, names: list[str], output: dict | None) -> dict | None:
        return None  # no Secrets here: credentials come from the environment

    async def create_child(self, child: dict) -> None:
        name = child["metadata"]["name"]
        if child["kind"] == "ConfigMap":
            self.config_maps[name] = child
            return
        if name in self.workloads:
            return
        launch = backend_for_kind(child["kind"]).local_launch(child)
        work = self.run_dir if name == self.main_name else self.run_dir / name
        work.mkdir(parents=True, exist_ok=True)
        (work / jobconfig.CONFIG_FILE).write_text(self.config_maps[launch.config_map]["data"][jobconfig.CONFIG_FILE])
        self.workloads[name] = LocalWorkload(child, launch, work / jobconfig.CONFIG_FILE, work,
                                             env={"KUBETUNE_LOCAL": "1"})
        self.workloads[name].start()

    async def patch_child(self, kind: str, name: str, patch: dict) -> None:
        """Local workloads are not suspended: they run to the end."""

    async def read_kueue_workload(self, job: dict, workload_uid: str) -> dict | None:
        """No Kueue on this machine (`prepare_job` drops the queue): never asked."""
        return None

    async def activate_kueue_workload(self, job: dict, name: str, active: bool) -> None:
        """No Kueue on this machine: never asked."""

    async def write_status(self, job: dict, status: dict) -> None:
        self.job = {**job, "status": status}

    async def post_event(self, job: dict, event: Event) -> None:
        self.events.append(event)

    def poll(self) -> None:
        for each in self.workloads.values():
            each.poll()

    def stop(self) -> None:
        for each in self.workloads.values():
            each.stop()


@dataclass
class LocalResult:
    job: dict
    run_dir: Path
    events: list[Event]

    @property
    def phase(self) -> str:
        return (self.job.get("status") or {}).get("phase", "")


_INDEX = re.compile(r"\[(\d+)\]")


@dataclass(frozen=True)
class Override:
    """One `--set PATH=VALUE`: the spec path (keys, and list indexes as ints) and the parsed value."""

    item: str
    path: list[str | int]
    value: object


def parse_override(item: str) -> Override:
    """`training.maxSteps=20` -> (["training", "maxSteps"], 20); `adapters[0].name=x` indexes a list.
    The value is read as `kubetune validate` reads a file (documents.parse_value). ValueError names
    the item and the problem in one line."""
    path, sep, text = item.partition("=")
    if not sep or not path.strip():
        raise ValueError(f"--set {item!r}: expected PATH=VALUE (a spec field path like training.maxSteps)")
    parts: list[str | int] = []
    for segment in path.removeprefix("spec.").split("."):
        name, _, rest = segment.partition("[")
        indexes = _INDEX.findall("[" + rest) if rest else []
        if not name or (rest and "".join(f"[{i}]" for i in indexes) != "[" + rest):
            raise ValueError(f"--set {item!r}: empty or malformed path segment {segment!r} in {path!r} (write "
                             "a.b.c, or a[0].b for a list item)")
        parts.extend([name, *map(int, indexes)])
    try:
        value = documents.parse_value(text, f"--set {item!r}")
    except documents.InputError as exc:
        raise ValueError(f"--set {item!r}: {exc.message}") from None
    return Override(item, parts, value)


def prepare_job(document: dict, *, namespace: str, output: str | None, overrides: list[Override] = ()) -> dict:
    """The object as the API server would hand it over, with local overrides applied."""
    job = json.loads(json.dumps(document))
    meta = job.setdefault("metadata", {})
    meta.setdefault("namespace", namespace)
    meta["uid"] = str(uuid.uuid4())  # every local run is a new job: it never sees an earlier run's files
    meta.setdefault("generation", 1)
    meta.setdefault("creationTimestamp", now_rfc3339())
    if output:
        job["spec"]["output"] = {**(job["spec"].get("output") or {}), "uri": output}
    # no Kueue on this machine: its workloads run at once (created suspended, nothing would admit them)
    (job["spec"].get("scheduling") or {}).pop("queueName", None)
    return apply_overrides(job, overrides)


def apply_overrides(document: dict, overrides: list[Override]) -> dict:
    """`--set` values (parse_override) written into the document's spec, in place; the document.
    ValueError when a path goes through a scalar or past a list's end."""
    for override in overrides:
        target, walked = document.setdefault("spec", {}), "spec"
        for part, following in zip(override.path, override.path[1:], strict=False):  # every step but the last
            _check_step(override, walked, target, part, appending=False)
            if isinstance(part, str) and target.get(part) is None:
                target[part] = [] if isinstance(following, int) else {}
            target = target[part]
            walked += f"[{part}]" if isinstance(part, int) else f".{part}"
        last = override.path[-1]
        _check_step(override, walked, target, last, appending=True)
        if isinstance(last, int) and last == len(target):
            target.append(override.value)  # a[N]=x with N the list's length appends, as Helm's --set does
        else:
            target[last] = override.value
    return document


def _check_step(override: Override, walked: str, target: object, part: str | int, *, appending: bool) -> None:
    prefix = f"--set {override.item!r}: {walked}"
    if isinstance(part, int):
        if not isinstance(target, list):
            raise ValueError(f"{prefix} is {_shown(target)}, not a list to take item [{part}] of")
        if part > len(target) or (part == len(target) and not appending):
            raise ValueError(f"{prefix} has {len(target)} item(s); [{part}] is past its end")
    elif not isinstance(target, dict):
        what = "a list (index it: [0])" if isinstance(target, list) else _shown(target)
        raise ValueError(f"{prefix} is {what}, not a mapping to set {part!r} in")


def _shown(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else f"a {type(value).__name__.replace('dict', 'mapping')}"


def run(job: dict, *, run_dir: Path, on_change=None, poll_seconds: float = 1.0,
        settings: ftj.Settings | None = None) -> LocalResult:
    """Drive `job` to a terminal phase, one `shell.run_pass` at a time. `on_change(job, events)` is called
    after every pass. The training job runs in `run_dir`; a baseline, data or sweep job in `run_dir/<its name>/`."""
    settings = settings or ftj.Settings(local=True, publish_timeout_seconds=60)
    run_dir.mkdir(parents=True, exist_ok=True)
    port = LocalPass(job, run_dir)
    all_events: list[Event] = []
    try:
        while True:
            asyncio.run(shell.run_pass(port, settings, now_rfc3339()))
            all_events.extend(port.events)
            if on_change:
                on_change(port.job, port.events)
            if port.job["status"].get("phase") in ftj.TERMINAL:
                return LocalResult(port.job, run_dir, all_events)
            time.sleep(poll_seconds)
            port.poll()
    finally:
        port.stop()

"""The AdapterDeployment's local adapter: `kubetune local -f adapterdeployment.yaml` serves it on this
machine (`processes`), runs `shell.adapterdeployment.run_pass` through `LocalDeployment` (the port: status in
memory and in a file, the desired state in a file the agents read, retrains run by `retrains`) until --until,
and reports. Storage credentials come from this shell's environment, never from Secrets or a command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from kubetune.api import jobconfig, serving, storage_location
from kubetune.clients import storage
from kubetune_operator.clients import drift_storage
from kubetune_operator.clients.sources import manifest_location
from kubetune_operator.reconcile import adapterdeployment as adp
from kubetune_operator.reconcile import clusterwide, driftloop
from kubetune_operator.shell import adapterdeployment as shell
from kubetune_operator.shell import now_rfc3339

from .inputs import LocalServingError, Options, Request, emit, prepare, read_traffic, replicas
from .processes import SAMPLE_FLUSH_SECONDS, Aborted, Agent, Child, start_serving, write_atomic
from .retrains import Retrain, start_retrain
from .traffic import ANSWERS_FILE, TrafficSender

log = logging.getLogger("kubetune_operator.local.adapterdeployment")


class LocalDeployment:
    """One AdapterDeployment on this machine: its processes, its status, and the port its passes use
    (shell.adapterdeployment.AdapterDeploymentPort)."""

    def __init__(self, adep: dict, options: Options):
        self.adep, self.options = adep, options
        self.name, self.namespace = adep["metadata"]["name"], adep["metadata"]["namespace"]
        self.dir = options.run_dir / self.name
        self.status_file = options.status_file or self.dir / "adapterdeployment.json"
        self.desired_file = self.dir / "desired.json"
        self.settings = adp.Settings(resync_seconds=options.poll)  # no storage limits configured locally
        self.status: dict = {}
        self.desired: serving.DesiredState | None = None
        self.engine: Child | None = None
        self.agents: list[Agent] = []
        self.retrains: dict[str, Retrain] = {}
        self.verified: dict = {}  # (manifest uri, digest) -> adp.Source, as the controller caches them
        self.base_identities: dict = {}  # (uri, revision) -> the served base's identity, as the controller's
        self.reasons_seen: set[str] = set()
        self.print_lock = threading.Lock()
        self.last_progress = ""
        spec = adep["spec"]
        # the operator's precedence, the shell's environment standing in for the operator's setting
        location = storage_location.resolve(spec.get("storage"), fallback=storage_location.operator_setting(os.environ))
        self.s3 = storage.S3Settings(endpoint=location.endpoint, region=location.region,
                                     access_key=os.environ.get(jobconfig.ENV_S3_ACCESS_KEY) or None,
                                     secret_key=os.environ.get(jobconfig.ENV_S3_SECRET_KEY) or None)
        self.store = storage.ObjectStore(self.s3)
        embedder = None
        if options.embedding_url:
            from kubetune_operator.clients.embeddings import EmbeddingClient  # only with an embedding service

            embedder = EmbeddingClient(options.embedding_url, options.embedding_model)
        # one retrain at a time on one machine: two trainers would halve each other's cores
        self.analyzer = drift_storage.Analyzer(embedder=embedder, drift_seconds=options.drift_seconds, max_retrains=1,
                                               local=True)
        self.traffic: TrafficSender | None = None
        self.events: list[dict] = []  # every Event with its time, for the report
        self.timeline: list[dict] = []  # per alias: stable, canary and its weight, whenever they change
        self.abort = threading.Event()  # set by Ctrl-C / SIGTERM: stops a start that is still waiting

    def event(self, type_: str, reason: str, message: str) -> None:
        self.reasons_seen.add(reason)
        self.events.append({"time": now_rfc3339(), "type": type_, "reason": reason, "message": message[:1000]})
        with self.print_lock:
            emit(f"EVENT {type_} {reason}: {message}")

    def document(self) -> dict:
        return {**self.adep, "status": self.status}

    # --- processes ---

    def start(self) -> None:
        started = start_serving(self.adep, self.dir, self.desired_file, self.s3)
        self.engine, self.agents = started.engine, started.agents
        started.wait_healthy(self.abort)

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
                retrain.thread.join(60)  # the FineTuneJob run stops its trainer (SIGTERM, SIGKILL after 30 s)

    def check_processes(self) -> None:
        """A pod's container that exits is restarted by kubelet; here it ends the run with its log."""
        for child in [self.engine, *(a.child for a in self.agents)]:
            if child is not None and not child.alive:
                raise RuntimeError(f"{child.name} exited with code {child.process.returncode} "
                                   f"(log {child.log_path}):\n{child.tail()}")

    # --- the port ---

    async def reconcile(self) -> None:
        await shell.run_pass(self, self.settings)
        self.progress()

    async def read(self) -> dict | None:
        return self.document()

    async def object_store(self, adep: dict) -> storage.ObjectStore:
        return self.store

    async def locate_source(self, adep: dict, adapter: dict) -> tuple[str, str | None]:
        """Every source is a uri here (`prepare` turned a fineTuneJobRef into its published adapter)."""
        src = adapter["source"]
        return manifest_location(src["uri"]), src.get("digest")

    async def namespaces(self, adep: dict) -> list[clusterwide.Namespace] | None:
        """One machine is one namespace: a namespaceSelector reaches no other here."""
        return None

    async def pods(self, adep: dict, namespace: str) -> list[adp.Pod]:
        return [a.pod_view() for a in self.agents]

    async def desired_state(self, adep: dict) -> serving.DesiredState | None:
        return self.desired

    async def secrets_found(self, adep: dict) -> dict | None:
        return None  # credentials come from this shell's environment: no Secrets to look at

    async def apply_serving(self, adep: dict, changed: serving.DesiredState | None,
                            desired: serving.DesiredState, max_rank: int | None) -> None:
        """The agents read the desired state from a file; the engine was started accepting every rank."""
        if changed is not None:
            write_atomic(self.desired_file, changed.to_json())
            self.desired = changed
            log.info("desired state written", extra={"adapterdeployment": self.name,
                                                     "generation": changed.generation})

    async def write_status(self, adep: dict, status: dict) -> None:
        self.status = status
        self.record_timeline(now_rfc3339())
        write_atomic(self.status_file, json.dumps(self.document(), indent=2))

    async def post_events(self, adep: dict, events: list) -> None:
        for event in events:
            self.event(event.type, event.reason, event.message)

    async def retrain_jobs(self, adep: dict, adapter: dict) -> list[driftloop.RetrainJob]:
        return [r.view() for r in self.retrains.values() if r.adapter == adapter["name"]]

    async def retrains_in_flight(self) -> int:
        return sum(1 for r in self.retrains.values() if not r.finished)

    async def create_retrain(self, job: dict) -> None:
        retrain = start_retrain(job, self.adep, self.dir, self.event)
        self.retrains[job["metadata"]["name"]] = retrain

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
        """RUN_DIR/NAME/report/: drift.png, rollout.png, summary.txt (kubetune_operator.report)."""
        from kubetune_operator import report

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

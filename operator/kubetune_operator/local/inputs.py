"""`kubetune local -f adapterdeployment.yaml`: its options and input (the AdapterDeployment, a fineTuneJobRef
resolved from a run directory, the traffic file), checked before anything starts."""

from __future__ import annotations

import copy
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

from kubetune.api import serving, storage_layout
from kubetune.api.validation import validate
from kubetune_operator.shell import now_rfc3339

UNTIL = ("promoted", "rejected", "drifted", "traffic-done", "never")
MAX_REPLICAS = 4  # agents on one machine; each replica is a real process in front of the one engine


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


def emit(line: str) -> None:
    """A line for the user (Events, progress); structured logs go to the run directory's log file."""
    print(line, flush=True)


def local_path(uri: str) -> Path | None:
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
    base_dir = local_path(base)
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
    except UnicodeDecodeError as exc:
        raise LocalServingError([f"--traffic {path}: not UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset "
                                 f"{exc.start}); write it as UTF-8"]) from None
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


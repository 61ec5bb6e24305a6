"""The agent's decisions, without I/O: what to download, load and unload; which version serves a request;
what a downloaded adapter must look like; what is measured and reported.

The shell (`sync`, `proxy`) reads the world (desired state, the engine's loaded set, the cache), asks
these functions what to do, and does it.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from kubetune.api import answer_scores, serving, storage_layout
from kubetune.api import manifest as manifest_api

# Error reasons of `AgentReport.errors[version]["reason"]`
MANIFEST_MISSING = "ManifestMissing"
MANIFEST_INVALID = "ManifestInvalid"
DIGEST_MISMATCH = "DigestMismatch"
DOWNLOAD_FAILED = "DownloadFailed"
LOAD_FAILED = "LoadFailed"

MESSAGE_LIMIT = 500  # error messages in the report (it lives in an annotation: 256 KiB for all of them)


# --- sync -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyncPlan:
    unload: list[str] = field(default_factory=list)  # served names loaded in the engine, not desired
    load: list[serving.Version] = field(default_factory=list)  # verified copy in the cache: load it
    download: list[serving.Version] = field(default_factory=list)  # fetch and verify first, then load
    waiting: list[str] = field(default_factory=list)  # failed before; retried after their backoff

    @property
    def empty(self) -> bool:
        return not (self.unload or self.load or self.download)


def plan_sync(desired: serving.DesiredState | None, engine_loaded: Collection[str], verified: Collection[str],
              retry_at: Mapping[str, float], now: float) -> SyncPlan:
    """Compare the desired versions with what the engine has loaded right now.

    `verified`: digests with a verified copy in the local cache. `retry_at`: version name -> monotonic
    time before which a version that failed is not tried again. Without a desired state (none read
    yet) nothing changes: the agent does not unload what it cannot know to be unwanted.
    Unloads come first in the shell (they free the engine's LoRA slots for the loads).
    """
    if desired is None:
        return SyncPlan()
    versions = desired.versions()
    unload = sorted(name for name in engine_loaded if name not in versions)
    load, download, waiting = [], [], []
    for name in sorted(versions):
        if name in engine_loaded:
            continue
        if retry_at.get(name, 0.0) > now:
            waiting.append(name)
            continue
        (load if versions[name].digest in verified else download).append(versions[name])
    return SyncPlan(unload, load, download, waiting)


def retry_delay(attempts: int, base: float, cap: float = 300.0) -> float:
    """Exponential backoff after `attempts` consecutive failures of one version (1 -> base)."""
    return min(cap, base * 2 ** max(0, attempts - 1))


def job_prefix_of(manifest_uri: str) -> str:
    """The job prefix a manifest URI lives under (`<prefix>/manifest.json`)."""
    return manifest_uri.rsplit("/", 1)[0] + "/"


def check_manifest(document: object, version: serving.Version) -> tuple[str, str] | None:
    """(reason, message) when the manifest read at `version.manifest_uri` must not be used for
    `version`; None when its file list may be downloaded. The files themselves are checked after the
    download (`check_files`)."""
    problems = manifest_api.check_document(document)
    if problems:
        reason = DIGEST_MISMATCH if any(p.reason == DIGEST_MISMATCH for p in problems) else MANIFEST_INVALID
        return reason, "; ".join(p.message for p in problems)
    assert isinstance(document, dict)
    if document["digest"] != version.digest:
        return DIGEST_MISMATCH, f"manifest digest {document['digest']} is not the desired {version.digest}"
    prefix = job_prefix_of(version.manifest_uri)
    if adapter_prefix_of(document, version.manifest_uri) != storage_layout.adapter_prefix(prefix, version.digest):
        return DIGEST_MISMATCH, f"adapterPath {document['adapterPath']!r} is not the digest's path"
    return None


def adapter_prefix_of(document: dict, manifest_uri: str) -> str:
    """Where the manifest's files live: `adapterPath` under the manifest's job prefix."""
    return job_prefix_of(manifest_uri) + document["adapterPath"].strip("/") + "/"


def check_files(expected: list[dict], actual: Mapping[str, tuple[int, str] | None]) -> tuple[str, str] | None:
    """Compare the manifest's files with the local copy (`path -> (size, sha256)`, None when missing)."""
    for entry in expected:
        found = actual.get(entry["path"])
        if found is None:
            return DOWNLOAD_FAILED, f"{entry['path']} is missing from the download"
        size, sha = found
        if size != entry["size"]:
            return DIGEST_MISMATCH, f"{entry['path']} has {size} bytes, the manifest says {entry['size']}"
        if sha != entry["sha256"]:
            return DIGEST_MISMATCH, f"{entry['path']} does not match its sha256 in the manifest"
    return None


def error_entry(reason: str, message: str) -> dict:
    return {"reason": reason, "message": message[:MESSAGE_LIMIT]}


def lora_names(models: object) -> set[str]:
    """The LoRA adapters in an engine's `/v1/models` answer: vLLM lists the base model with
    `parent: null` and every adapter with `parent` set to its base model."""
    data = models.get("data") if isinstance(models, dict) else None
    names = set()
    for entry in data if isinstance(data, list) else []:
        if isinstance(entry, dict) and entry.get("parent") and isinstance(entry.get("id"), str):
            names.add(entry["id"])
    return names


# --- routing --------------------------------------------------------------------------------------


def choose_version(versions: list[serving.Version], draw: float,
                   loaded: Collection[str] | None = None) -> serving.Version | None:
    """The version of one alias that serves a request, for a uniform `draw` in [0, 1).

    Weighted among the versions that are loaded (all of them when `loaded` is None): when one is not
    loaded, its share goes to the loaded ones in proportion to their weights. When only versions of
    weight 0 are loaded, the stable one (else the first) serves rather than nothing. None: nothing of
    the alias is loaded.
    """
    candidates = [v for v in versions if loaded is None or v.name in loaded]
    if not candidates:
        return None
    weighted = [v for v in candidates if v.weight > 0]
    if not weighted:
        return next((v for v in candidates if v.role == "stable"), candidates[0])
    point = min(max(draw, 0.0), math.nextafter(1.0, 0.0)) * sum(v.weight for v in weighted)
    cumulative = 0.0
    for version in weighted:
        cumulative += version.weight
        if point < cumulative:
            return version
    return weighted[-1]


@dataclass(frozen=True)
class Route:
    status: int  # 200: serve `version`; 404: not this agent's name; 503: nothing loaded to serve it
    alias: str | None = None
    version: str | None = None
    message: str = ""


def route(model: object, namespace: str, desired: serving.DesiredState | None, loaded: Collection[str],
          draw: float) -> Route:
    """Where a request for `model` goes.

    An alias (`<ns>/<name>`, or a bare `<name>` in the agent's namespace) goes to one of its loaded
    versions by weight; a version name (`<ns>/<name>@<digest12>`) of this agent's desired state goes
    to that version. Anything of another namespace, or not in the desired state, is 404: a tenant can
    neither reach nor probe another tenant's adapters through this agent.
    """
    if not isinstance(model, str) or not model:
        return Route(400, message='the request needs a "model" (an adapter alias or version)')
    name = serving.qualify(model, namespace)
    if name.split("/", 1)[0] != namespace:
        return Route(404, message=f"model {model!r} is not served here")
    if desired is None:
        return Route(503, message="no desired state read yet")
    if "@" in name:
        version = desired.versions().get(name)
        if version is None:
            return Route(404, message=f"model {model!r} is not served here")
        alias = name.split("@", 1)[0]
        if name not in loaded:
            return Route(503, alias, name, f"version {name} is not loaded yet")
        return Route(200, alias, name)
    state = next((a for a in desired.adapters if a.alias == name), None)
    if state is None:
        return Route(404, message=f"model {model!r} is not served here")
    chosen = choose_version(state.versions, draw, loaded)
    if chosen is None:
        return Route(503, name, None, f"no version of {name} is loaded yet")
    return Route(200, name, chosen.name)


# --- measuring ------------------------------------------------------------------------------------


def latency_bucket(seconds: float) -> int:
    """Index of the bucket of `VersionMetrics.latency_buckets` one request falls in: the first bound
    >= seconds; the last bucket (+Inf) for longer ones. The buckets are per-bucket counts (not
    cumulative like Prometheus' `le`): their sum is the number of requests measured."""
    for index, bound in enumerate(serving.LATENCY_BUCKETS):
        if seconds <= bound:
            return index
    return len(serving.LATENCY_BUCKETS)


def record(metrics: serving.VersionMetrics, seconds: float, error: bool, confidences: list[float]) -> None:
    """One request into the version's counters (the report's `confidence_*`: the first of each score)."""
    metrics.requests += 1
    metrics.errors += int(error)
    metrics.latency_sum += seconds
    metrics.latency_buckets[latency_bucket(seconds)] += 1
    metrics.confidence_sum += sum(confidences)
    metrics.confidence_count += len(confidences)


def is_error(status: int) -> bool:
    """Engine answers that count as errors of the version: 5xx (and the agent's own 502/504 when the
    engine cannot be reached). 4xx are the client's mistakes (bad prompt, too many tokens): counted as
    requests, not errors, so a canary is not rolled back for its callers' bad input."""
    return status >= 500


def scores(path: str, response: object) -> list[tuple[float, float]]:
    """(confidence, entropy in nats) of each scored unit of one engine answer: per input of `/classify`,
    the highest class probability and the entropy of its probabilities; per choice of a completion or
    chat completion that carries logprobs, `answer_scores.answer_score` (mean top-1 probability, mean
    top-K entropy). Answers without logprobs give none: the agent asks for them on sampled requests
    only (`answers.with_top_logprobs`)."""
    if not isinstance(response, dict):
        return []
    if path == serving.ENGINE_CLASSIFY:
        found = []
        for item in _list(response.get("data")):
            probs = [float(p) for p in _list(item.get("probs") if isinstance(item, dict) else None) if _number(p)]
            if probs:
                found.append((max(probs), -sum(p * math.log(p) for p in probs if p > 0)))
        return found
    chat = path == serving.ENGINE_CHAT
    scored = (answer_scores.answer_score(answer_scores.choice_positions(c, chat=chat))
              for c in _list(response.get("choices")))
    return [s for s in scored if s is not None]


def _list(value: object) -> list:
    return value if isinstance(value, list) else []


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --- sampling -------------------------------------------------------------------------------------


def should_sample(rate: float, uri: str | None, draw: float) -> bool:
    return bool(uri) and rate > 0 and draw < rate


def sample_object_uri(sampling_uri: str, namespace: str, pod: str, when: dt.datetime, sequence: int) -> str:
    """`<sampling_uri>/<namespace>/<pod>/<UTC date>/<UTC timestamp>-<n>.jsonl` (n: this agent's count of
    sample objects, so two flushes within one second never share a name)."""
    when = when.astimezone(dt.UTC)
    return (f"{sampling_uri.rstrip('/')}/{namespace}/{pod}/{when:%Y-%m-%d}/"
            f"{when:%Y%m%dT%H%M%SZ}-{sequence:06d}.jsonl")


# --- reporting ------------------------------------------------------------------------------------


def build_report(*, generation: int, engine_ready: bool, engine_loaded: Collection[str],
                 digests: Mapping[str, str], errors: Mapping[str, dict],
                 metrics: Mapping[str, serving.VersionMetrics], started: str, now: str) -> serving.AgentReport:
    """The report: `loaded` is what the engine has right now (name -> digest; a name the agent cannot
    map to a digest, loaded before it started and not desired, reports an empty digest)."""
    return serving.AgentReport(
        generation=generation,
        engine_ready=engine_ready,
        loaded={name: digests.get(name, "") for name in sorted(engine_loaded)},
        errors={name: dict(entry) for name, entry in sorted(errors.items())},
        metrics={name: serving.VersionMetrics(m.requests, m.errors, m.latency_sum, list(m.latency_buckets),
                                              m.confidence_sum, m.confidence_count)
                 for name, m in sorted(metrics.items())},
        started=started,
        updated=now,
    )


def report_fingerprint(report: serving.AgentReport) -> tuple:
    """What makes a report worth writing at once (not waiting for the next period): the state, not the
    counters or the time."""
    return (report.generation, report.engine_ready, tuple(sorted(report.loaded.items())),
            tuple(sorted((k, v.get("reason"), v.get("message")) for k, v in report.errors.items())))


def rfc3339(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")

"""The drift loop's storage: sampled traffic -> windows in storage -> verdicts; labelled data; retrain data.

Blocking (boto3) functions, run in a thread by `kubetune_operator.shell.drift`; the statistics and decisions
are pure (`kubetune_operator.stats`, `reconcile.driftloop`). The layout under the sampling URI, per adapter
(`drift_prefix`), is in docs/concepts.md ("Storage layout").
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field

from kubetune.bounded import BoundedDict
from kubetune.clients import storage
from kubetune_operator import stats
from kubetune_operator.reconcile import driftloop

log = logging.getLogger("kubetune.drift")

STATE_API = "kubetune.io/drift-state/v1"
MAX_OBJECTS_PER_PASS = 2000  # sample objects read per adapter per pass; the rest waits for the next one
HOLDOUT_TEXTS = 2000  # holdout inputs read to build a reference


class DataError(ValueError):
    """Labelled or training data that cannot be used (the message names the object and line)."""


@dataclass
class Analysis:
    """What one pass over the samples produced."""
    verdicts: list = field(default_factory=list)
    open_window: dict | None = None
    problem: tuple[str, str] | None = None
    objects_read: int = 0


@dataclass
class Analyzer:
    """Settings of the drift loop, and caches of things that are costly to recompute and never change
    for a digest (nothing here is state: that lives in status and storage)."""
    embedder: object | None = None  # .embed(texts) -> vectors (clients.embeddings.EmbeddingClient)
    drift_seconds: float = 30.0  # how often each adapter's new samples are read and windows analysed
    max_retrains: int = 2  # retrains in flight at once (the cluster's cap)
    last_analysis: dict = field(default_factory=BoundedDict)  # (namespace, name, adapter) -> monotonic time
    manifests: dict = field(default_factory=BoundedDict)  # manifest uri -> manifest (published manifests never change)
    local: bool = False  # `kubetune local`: retrain FineTuneJobs are validated for this machine (file:// allowed)
    references: dict = field(default_factory=BoundedDict)  # digest -> reference
    calibrations: dict = field(default_factory=BoundedDict)  # (digest, window size, thresholds) -> calibration
    labelled_counts: dict = field(default_factory=BoundedDict)  # labelled object uri -> (examples, problem)


def drift_prefix(sampling_uri: str, namespace: str, adep: str, adapter: str) -> str:
    return "/".join([sampling_uri.rstrip("/"), "_kubetune", "drift", namespace, adep, adapter]) + "/"


def _read_json(store: storage.ObjectStore, uri: str) -> dict | None:
    raw = store.read(uri)
    return json.loads(raw) if raw else None


def _write_json(store: storage.ObjectStore, uri: str, document: dict) -> None:
    store.write(uri, json.dumps(document, separators=(",", ":")).encode())


def _jsonl(raw: bytes, uri: str) -> list[dict]:
    """Every line of a JSON Lines object as a dict; a bad line names the object and its line number."""
    rows = []
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{uri} line {number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{uri} line {number}: a JSON object is expected")
        rows.append(row)
    return rows


# --- the reference ------------------------------------------------------------------------------------

def reference_for(analyzer: Analyzer, store: storage.ObjectStore, prefix: str, manifest: dict,
                  embeddings: bool) -> dict:
    """The serving adapter's reference: built once per digest from its drift profile and its holdout
    inputs (the dataset's validation set; without one, training inputs measured leave-one-out)."""
    digest = manifest["digest"]
    cached = analyzer.references.get((digest, embeddings))
    if cached is not None:
        return cached
    uri = f"{prefix}references/{digest.split(':')[-1]}{'-emb' if embeddings else ''}.json"
    reference = _read_json(store, uri)
    if reference is None:
        profile = manifest.get("driftProfile")
        if not profile:
            raise DataError(f"the manifest of {digest} has no driftProfile (trained by an older trainer?)")
        dataset = manifest.get("dataset") or {}
        source = dataset.get("validationUri") or dataset.get("uri")
        raw = store.read(source) if source else None
        if raw is None:
            raise DataError(f"cannot read the adapter's holdout inputs at {source}")
        texts = [stats.example_input(r) for r in _jsonl(raw, source)[:HOLDOUT_TEXTS]]
        vectors = None
        if embeddings and analyzer.embedder is not None:
            log.info("embedding the reference holdout", extra={"digest": digest, "texts": len(texts)})
            vectors = analyzer.embedder.embed(texts)
        reference = stats.build_reference(profile, texts, vectors, leave_one_out=not dataset.get("validationUri"))
        _write_json(store, uri, reference)
        log.info("drift reference built", extra={"digest": digest, "holdout": reference["holdoutSize"],
                                                  "texts": len(texts), "embeddings": vectors is not None})
    analyzer.references[(digest, embeddings)] = reference
    return reference


def _calibration(analyzer: Analyzer, reference: dict, digest: str, size: int,
                 thresholds: stats.Thresholds) -> dict:
    key = (digest, size, thresholds, reference.get("embeddings") is not None)
    if key not in analyzer.calibrations:
        started = time.monotonic()
        analyzer.calibrations[key] = stats.calibrate(reference, size, thresholds)
        log.info("drift thresholds calibrated", extra={"digest": digest, "window": size,
                                                        "seconds": round(time.monotonic() - started, 2)})
    return analyzer.calibrations[key]


# --- windows -----------------------------------------------------------------------------------------

def _new_state(version: str | None, previous: dict | None) -> dict:
    """Fresh windows for a new serving version; the cursor stays (older samples are other versions')."""
    previous = previous or {}
    return {"apiVersion": STATE_API, "version": version, "cursor": dict(previous.get("cursor") or {}),
            "window": {"index": int((previous.get("window") or {}).get("index", 0)) + 1, "startTime": None,
                       "observations": []},
            "consumedLabelled": previous.get("consumedLabelled") or []}


def analyse_samples(analyzer: Analyzer, store: storage.ObjectStore, *, adep: dict, adapter: dict,
                    stable: dict, manifest: dict, now: str) -> Analysis:
    """Read the sample objects written since the last pass, add the stable version's scored requests
    to the open window, and analyse every window that closes. State goes back to storage last."""
    spec = adep["spec"]
    namespace, name = adep["metadata"]["namespace"], adep["metadata"]["name"]
    drift_spec = adapter["drift"]
    sampling = spec["trafficSampling"]["uri"]
    prefix = drift_prefix(sampling, namespace, name, adapter["name"])
    alias = f"{namespace}/{adapter['name']}"
    thresholds = stats.Thresholds.from_spec(drift_spec.get("thresholds"))
    use_embeddings = bool(drift_spec.get("embeddings", True)) and analyzer.embedder is not None
    result = Analysis()
    reference = reference_for(analyzer, store, prefix, manifest, use_embeddings)

    state = _read_json(store, prefix + "state.json")
    if state is None or state.get("version") != stable["version"]:
        state = _new_state(stable["version"], state)  # a new serving version: fresh windows
    window = state["window"]
    pods_prefix = f"{sampling.rstrip('/')}/{namespace}/"
    keys = []
    for uri in store.list(pods_prefix):
        pod = uri[len(pods_prefix):].split("/", 1)[0]
        if uri.endswith(".jsonl") and uri > state["cursor"].get(pod, ""):
            keys.append((pod, uri))
    keys.sort(key=lambda item: item[1].rsplit("/", 1)[-1])  # by time across pods (the name starts with it)
    size = drift_spec["window"]["requests"]

    def close(observations: list[dict], end_time: str) -> None:
        window_obs = [stats.Observation(**o) for o in observations]
        vectors = analyzer.embedder.embed([o.text for o in window_obs]) if use_embeddings else None
        calibration = _calibration(analyzer, reference, manifest["digest"], len(window_obs), thresholds)
        verdict = stats.analyse(reference, calibration, window_obs, vectors, thresholds)
        verdict = {**verdict, "index": window["index"], "startTime": window["startTime"], "endTime": end_time,
                   "version": stable["version"]}
        _write_json(store, f"{prefix}windows/{window['index']:08d}.json", verdict)
        result.verdicts.append(verdict)
        log.info("drift window analysed", extra={"alias": alias, "index": window["index"],
                                                 "requests": verdict["requests"], "drifted": verdict["drifted"]})

    # Replicas flush their samples independently: the requests read in one pass are put back in request
    # order before they fill windows, so a window holds a time slice of the traffic, not one pod's batch.
    arrivals: list[tuple[str, int, dict]] = []
    for pod, uri in keys[:MAX_OBJECTS_PER_PASS]:
        raw = store.read(uri)
        result.objects_read += 1
        for line in (raw or b"").decode("utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a torn line of a sample object: samples are best effort
            if not isinstance(record, dict) or record.get("alias") != alias \
                    or record.get("version") != stable["version"]:
                continue
            arrivals.append((str(record.get("time") or now), len(arrivals), record))
        state["cursor"][pod] = uri
    for when, _, record in sorted(arrivals, key=lambda item: item[:2]):
        for observation in stats.observations(record):
            if window["startTime"] is None:
                window["startTime"] = when
            window["observations"].append(asdict(observation))
            if len(window["observations"]) >= size:
                close(window["observations"], when)
                window = state["window"] = {"index": window["index"] + 1, "startTime": None, "observations": []}
    if len(keys) > MAX_OBJECTS_PER_PASS:
        log.info("drift analysis catching up", extra={"alias": alias, "left": len(keys) - MAX_OBJECTS_PER_PASS})
    if window["observations"] and driftloop.window_due(len(window["observations"]), window["startTime"], now,
                                                       drift_spec["window"]):
        close(window["observations"], now)  # the time cap, with enough requests
        window = state["window"] = {"index": window["index"] + 1, "startTime": None, "observations": []}
    _write_json(store, prefix + "state.json", state)
    result.open_window = {"index": window["index"], "requests": len(window["observations"]),
                          "startTime": window["startTime"]}
    return result


# --- labelled data and the retrain's data --------------------------------------------------------------

def _labelled_objects(store: storage.ObjectStore, uri: str) -> list[str]:
    return sorted(u for u in store.list(uri if uri.endswith("/") else uri + "/") if u.endswith(".jsonl"))


def _check_labelled(rows: list[dict], uri: str, fmt: str) -> None:
    for number, row in enumerate(rows, start=1):
        if fmt == "text-label" and not (isinstance(row.get("text"), str) and row["text"].strip()
                                        and isinstance(row.get("label"), str) and row["label"].strip()):
            raise DataError(f"{uri} example {number}: text-label needs non-empty string fields text and label")
        if fmt == "prompt-completion" and not (isinstance(row.get("prompt"), str)
                                               and isinstance(row.get("completion"), str)):
            raise DataError(f"{uri} example {number}: prompt-completion needs string fields prompt and completion")
        if fmt == "chat" and not isinstance(row.get("messages"), list):
            raise DataError(f"{uri} example {number}: chat needs a messages list")
        if fmt == "text" and not isinstance(row.get("text"), str):
            raise DataError(f"{uri} example {number}: text needs a string field text")


def count_new_labelled(analyzer: Analyzer, store: storage.ObjectStore, adep: dict, adapter: dict,
                       fmt: str) -> tuple[int, str | None]:
    """(examples, problem): labelled examples no promoted retrain used yet. Objects are counted once
    (labelled objects are written once and not changed in place)."""
    retrain = adapter["drift"]["retrain"]
    prefix = drift_prefix(adep["spec"]["trafficSampling"]["uri"], adep["metadata"]["namespace"],
                          adep["metadata"]["name"], adapter["name"])
    state = _read_json(store, prefix + "state.json") or {}
    consumed = set(state.get("consumedLabelled") or [])
    total = 0
    for uri in _labelled_objects(store, retrain["labelledData"]["uri"]):
        if uri in consumed:
            continue
        if uri not in analyzer.labelled_counts:
            try:
                rows = _jsonl(store.read(uri) or b"", uri)
                _check_labelled(rows, uri, fmt)
                analyzer.labelled_counts[uri] = (len(rows), None)
            except DataError as exc:
                analyzer.labelled_counts[uri] = (0, str(exc))
        count, problem = analyzer.labelled_counts[uri]
        if problem:
            return total, problem
        total += count
    return total, None


def _dump(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def prepare_retrain(store: storage.ObjectStore, adep: dict, adapter: dict, job: str,
                    manifest: dict, manifest_uri: str) -> driftloop.RetrainData:
    """Write the retrain's data: the serving adapter's data (as configured) plus the new labelled
    examples, split so a holdout of the new ones judges the candidate. Everything is read and checked
    before anything is written; the FineTuneJob is created only after every object is whole."""
    retrain = adapter["drift"]["retrain"]
    dataset = manifest.get("dataset") or {}
    fmt = (retrain["template"]["spec"].get("dataset") or {}).get("format") or dataset.get("format") or "text-label"
    prefix = drift_prefix(adep["spec"]["trafficSampling"]["uri"], adep["metadata"]["namespace"],
                          adep["metadata"]["name"], adapter["name"])
    state = _read_json(store, prefix + "state.json") or {}
    consumed = set(state.get("consumedLabelled") or [])
    objects = [u for u in _labelled_objects(store, retrain["labelledData"]["uri"]) if u not in consumed]
    new_rows: list[tuple[str, str]] = []
    for uri in objects:
        rows = _jsonl(store.read(uri) or b"", uri)
        _check_labelled(rows, uri, fmt)
        new_rows += [(json.dumps(r, sort_keys=True), json.dumps(r, ensure_ascii=False)) for r in rows]
    new_train, new_holdout = driftloop.split_labelled(new_rows, retrain["labelledData"]["holdoutFraction"])
    new_train_rows = [json.loads(line) for line in new_train]
    new_holdout_rows = [json.loads(line) for line in new_holdout]

    def read_rows(uri: str) -> list[dict]:
        raw = store.read(uri)
        if raw is None:
            raise DataError(f"cannot read the serving adapter's data at {uri}")
        return _jsonl(raw, uri)

    original_train = read_rows(dataset["uri"]) if dataset.get("uri") else []
    if dataset.get("validationUri"):
        original_holdout = read_rows(dataset["validationUri"])
    else:  # the serving adapter split its validation off its training data: split the same way every time
        keyed = [(json.dumps(r, sort_keys=True), json.dumps(r, ensure_ascii=False)) for r in original_train]
        kept, held = driftloop.split_labelled(keyed, 0.1)
        original_train, original_holdout = [json.loads(x) for x in kept], [json.loads(x) for x in held]
    if not original_holdout:
        raise DataError("the serving adapter has no holdout to guard against regressions")
    include_original = retrain.get("includeOriginalData", True)
    train = (original_train if include_original else []) + new_train_rows
    # validation measures what the retrain learns, so it holds only labels its training has (the dataset
    # policy refuses any other); regressions on the original data are the gate's `original` set's job
    validation = (original_holdout if include_original else []) + new_holdout_rows
    base = f"{prefix}retrains/{job}/"
    data = driftloop.RetrainData(train_uri=base + "train.jsonl", validation_uri=base + "validation.jsonl",
                                 original_holdout_uri=base + "original.jsonl", new_holdout_uri=base + "new.jsonl",
                                 format=fmt)
    store.write(data.train_uri, _dump(train))
    store.write(data.validation_uri, _dump(validation))
    store.write(data.original_holdout_uri, _dump(original_holdout))
    store.write(data.new_holdout_uri, _dump(new_holdout_rows))
    _write_json(store, base + "inputs.json", {"labelled": objects, "servingManifest": manifest_uri,
                                              "examples": {"train": len(train), "newTrain": len(new_train_rows),
                                                           "newHoldout": len(new_holdout_rows),
                                                           "originalHoldout": len(original_holdout)}})
    log.info("retrain data written", extra={"job": job, "train": len(train), "new": len(new_rows),
                                            "newHoldout": len(new_holdout_rows)})
    return data


def mark_consumed(store: storage.ObjectStore, adep: dict, adapter: dict, job: str) -> None:
    """A promoted retrain's labelled objects are not new any more."""
    prefix = drift_prefix(adep["spec"]["trafficSampling"]["uri"], adep["metadata"]["namespace"],
                          adep["metadata"]["name"], adapter["name"])
    inputs = _read_json(store, f"{prefix}retrains/{job}/inputs.json") or {}
    state = _read_json(store, prefix + "state.json") or _new_state(None, None)
    state["consumedLabelled"] = sorted(set(state.get("consumedLabelled") or []) | set(inputs.get("labelled") or []))
    _write_json(store, prefix + "state.json", state)


def read_manifest(store: storage.ObjectStore, uri: str) -> dict | None:
    return _read_json(store, uri)

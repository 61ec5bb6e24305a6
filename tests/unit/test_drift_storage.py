"""The drift loop's storage side on a file:// store: windows fill in request order across pods, the cursor
skips what was read, and the open window lives in state.json (not in memory)."""

from __future__ import annotations

import datetime as dt
import json
import random

from kubetune.api.validation import validate
from kubetune.clients.storage import ObjectStore, S3Settings
from kubetune_agent import plan as agent_plan
from kubetune_operator.clients import drift_storage
from kubetune_testing.factories import adapterdeployment

VERSION = "team-a/support-bot@aaaaaaaaaaaa"
T0 = dt.datetime(2026, 11, 28, 9, 0, tzinfo=dt.UTC)


def setup(tmp_path):
    store = ObjectStore(S3Settings())
    rng = random.Random(0)
    holdout = tmp_path / "val.jsonl"
    holdout.write_text("".join(json.dumps({"text": f"reset my password {i}", "label": "reset"}) + "\n"
                               for i in range(100)))
    manifest = {"digest": "sha256:" + "a" * 64, "dataset": {"uri": f"file://{holdout}",
                                                           "validationUri": f"file://{holdout}"},
                "driftProfile": {"kind": "classification", "vocabulary": {"reset": 5, "my": 5, "password": 5},
                                 "confidence": {"values": [0.85 + 0.14 * rng.random() for _ in range(100)]},
                                 "entropy": {"values": [0.05 + 0.4 * rng.random() for _ in range(100)]}}}
    doc = adapterdeployment()
    doc["spec"]["trafficSampling"] = {"rate": 1.0, "uri": f"file://{tmp_path}/samples"}
    doc["spec"]["adapters"][0]["drift"] = {"window": {"requests": 10, "minRequests": 10}, "embeddings": False}
    result = validate(doc, local=True)
    assert result.ok, result.errors
    return store, manifest, {**doc, "spec": result.defaulted["spec"]}


def write(store, tmp_path, pod: str, seconds: list[int], sequence: int) -> None:
    records = [{"time": (T0 + dt.timedelta(seconds=s)).isoformat().replace("+00:00", "Z"),
                "alias": "team-a/support-bot", "version": VERSION, "path": "/classify", "status": 200,
                "request": {"input": f"reset my password {s}"},
                "response": {"data": [{"index": 0, "label": "reset", "probs": [0.9, 0.1]}]}} for s in seconds]
    flushed = T0 + dt.timedelta(seconds=max(seconds))
    uri = agent_plan.sample_object_uri(f"file://{tmp_path}/samples", "team-a", pod, flushed, sequence)
    store.write(uri, "".join(json.dumps(r) + "\n" for r in records).encode())


def analyse(store, manifest, adep, analyzer):
    return drift_storage.analyse_samples(analyzer, store, adep=adep, adapter=adep["spec"]["adapters"][0],
                                         stable={"version": VERSION}, manifest=manifest, now="2026-11-28T09:05:00Z")


def test_windows_fill_in_request_order_across_pods_and_the_cursor_skips_what_was_read(tmp_path):
    store, manifest, adep = setup(tmp_path)
    analyzer = drift_storage.Analyzer()
    write(store, tmp_path, "pod-a", list(range(1, 30, 2)), 1)  # odd seconds 1..29, one object
    write(store, tmp_path, "pod-b", list(range(2, 31, 2)), 1)  # even seconds 2..30
    result = analyse(store, manifest, adep, analyzer)
    assert [(v["index"], v["startTime"][-3:], v["endTime"][-3:]) for v in result.verdicts] == \
        [(1, "01Z", "10Z"), (2, "11Z", "20Z"), (3, "21Z", "30Z")]
    assert result.open_window == {"index": 4, "requests": 0, "startTime": None}
    again = analyse(store, manifest, adep, analyzer)
    assert again.verdicts == [] and again.objects_read == 0


def test_the_open_window_is_kept_in_storage(tmp_path):
    store, manifest, adep = setup(tmp_path)
    write(store, tmp_path, "pod-a", [1, 2, 3, 4], 1)
    first = analyse(store, manifest, adep, drift_storage.Analyzer())
    assert first.open_window["requests"] == 4 and first.verdicts == []
    write(store, tmp_path, "pod-a", list(range(5, 11)), 2)
    second = analyse(store, manifest, adep, drift_storage.Analyzer())  # a fresh process: nothing in memory
    assert [(v["index"], v["requests"]) for v in second.verdicts] == [(1, 10)]


def _retrain_inputs(tmp_path, include_original: bool):
    store, manifest, adep = setup(tmp_path)
    original = tmp_path / "train.jsonl"
    original.write_text("".join(json.dumps({"text": f"where is my order {i}", "label": label}) + "\n"
                                for i in range(40) for label in ("reset", "order")))
    manifest = {**manifest, "dataset": {**manifest["dataset"], "uri": f"file://{original}"}}
    labelled = tmp_path / "labelled"
    labelled.mkdir()
    (labelled / "batch-1.jsonl").write_text("".join(json.dumps({"text": f"book a flight {i}", "label": "oos"}) + "\n"
                                                    for i in range(60)))
    adapter = {**adep["spec"]["adapters"][0], "drift": {"retrain": {
        "template": {"spec": {}}, "includeOriginalData": include_original,
        "labelledData": {"uri": f"file://{labelled}/", "holdoutFraction": 0.2}}}}
    data = drift_storage.prepare_retrain(store, adep, adapter, "support-retrain-1", manifest, "file:///m.json")

    def labels(uri):
        return {json.loads(line)["label"] for line in store.read(uri).decode().splitlines()}
    return data, labels


def test_a_retrain_on_new_data_only_validates_on_labels_it_trains(tmp_path):
    """Without the original data the retrain cannot learn the original labels: its validation holds the
    new holdout only (the dataset policy refuses labels only in validation); the gate's `original` set
    still measures the regression."""
    data, labels = _retrain_inputs(tmp_path, include_original=False)
    assert labels(data.train_uri) == labels(data.validation_uri) == {"oos"}
    assert labels(data.original_holdout_uri) == {"reset"}
    (tmp_path / "with").mkdir()
    data, labels = _retrain_inputs(tmp_path / "with", include_original=True)
    assert labels(data.validation_uri) == {"reset", "oos"}
    assert labels(data.train_uri) == {"reset", "order", "oos"}

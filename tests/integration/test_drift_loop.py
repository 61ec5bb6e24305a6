"""The drift loop end to end through kopf + KMock + SeaweedFS, on CLINC150 with a real MiniLM adapter:
sampled traffic (scored by the real CPU engine code, written as the agents write it) -> windows
analysed in storage -> the guard -> a FineTuneJob retrain owned by the AdapterDeployment, trained by
the real trainer process -> the promotion gate on the manifest's evaluations -> the canary of the
retrained adapter; and a worse candidate rejected with its numbers."""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

import pytest

from kubetune.api import serving
from kubetune.clients import kube
from kubetune_agent import plan as agent_plan
from kubetune_operator.controllers import adapterdeployment as adep_controller
from kubetune_operator.controllers.adapterdeployment import ADAPTERDEPLOYMENTS
from kubetune_operator.reconcile import driftloop
from kubetune_testing import training_operator_loop
from kubetune_testing.seaweedfs import ACCESS_KEY, BUCKET, SECRET_KEY
from tests.conftest import shared_file
from tests.trainer.conftest import make_config, run_in_process
from tests.trainer.test_minilm_clinc import clinc_subset, minilm_dir, minilm_spec

from .conftest import NS, eventually
from .stage_helpers import wait_status
from .test_adapterdeployment_flows import agent_pods, agents_sync

# no test here reads kmock's request history: each request is forgotten once served
pytestmark = [pytest.mark.integration, pytest.mark.forget_served_requests]
INTENTS, PER_INTENT = 6, 25
WINDOW = 60
ALIAS = f"{NS}/support-bot"
ENGINE_LABELS = {"app": "support-engine"}


def root_of(tmp_path: Path) -> str:
    """Each test's own storage prefix (the S3 server lives for the module; drift state must not leak)."""
    return f"s3://{BUCKET}/{tmp_path.name}"


def clinc() -> dict:
    return json.loads(shared_file("datasets", "clinc150", "data_full.json").read_text())


@pytest.fixture(scope="module")
def serving_adapter(tmp_path_factory, s3_server) -> dict:
    """The adapter in production: MiniLM + LoRA on 6 CLINC intents (published with its drift profile), in
    object storage as a cluster's adapters are (admission refuses file:// sources outside `kubetune local`)."""
    root = tmp_path_factory.mktemp("serving-adapter")
    train, validation, intents = clinc_subset(root, intents=INTENTS, per_intent=PER_INTENT)
    config = make_config(minilm_spec(train, validation, f"file://{root / 'out'}", epochs=3), name="support-v1")
    manifest = run_in_process(config, root / "work")
    prefix = next((root / "out").rglob("manifest.json")).parent
    adapter_dir = next((prefix / "adapter").iterdir())
    published = f"s3://{BUCKET}/serving/support-v1"
    for path in sorted(p for p in prefix.rglob("*") if p.is_file()):
        s3_server.store().upload_file(path, f"{published}/{path.relative_to(prefix)}")
    return {"manifestUri": f"{published}/manifest.json", "digest": manifest["digest"], "intents": intents,
            "adapterDir": adapter_dir, "manifest": manifest}


class Scorer:
    """The serving adapter answering /classify exactly as the CPU engine does (in-process)."""

    def __init__(self, adapter_dir: Path):
        from kubetune_engine.models import ModelHost

        self.host = ModelHost(minilm_dir(), served_name="minilm", task="auto", fidelity="kubetune")
        self.host.load_base()
        self.host.load_adapter("v1", str(adapter_dir))

    def response(self, text: str) -> dict:
        instance, adapter = self.host.resolve("v1")
        result = self.host.classify(instance, adapter, [text])[0]
        return {"object": "list", "data": [{"index": 0, "label": result.label, "probs": result.probs,
                                            "num_classes": len(result.probs)}]}


class Traffic:
    """Sample objects as the agent writes them: `<uri>/<ns>/<pod>/<date>/<timestamp>-<n>.jsonl`."""

    def __init__(self, store, scorer: Scorer, version: str, root: str, pod: str = "support-serving-0"):
        self.store, self.scorer, self.version, self.pod, self.root = store, scorer, version, pod, root
        self.sequence = 0
        self.when = dt.datetime(2026, 11, 28, 9, 0, tzinfo=dt.UTC)

    def send(self, texts: list[str]) -> None:
        for start in range(0, len(texts), 25):  # the agent flushes every N records
            self.sequence += 1
            self.when += dt.timedelta(seconds=1)
            records = []
            for text in texts[start:start + 25]:
                records.append({"time": self.when.isoformat().replace("+00:00", "Z"), "alias": ALIAS,
                                "version": self.version, "path": "/classify", "status": 200, "latency": 0.01,
                                "confidence": None, "request": {"model": ALIAS, "input": text},
                                "response": self.scorer.response(text)})
            uri = agent_plan.sample_object_uri(f"{self.root}/samples", NS, self.pod, self.when, self.sequence)
            self.store.write(uri, "".join(json.dumps(r) + "\n" for r in records).encode())


def retrain_template(endpoint: str) -> dict:
    spec = minilm_spec(Path("unused"), Path("unused"), f"s3://{BUCKET}/retrains", epochs=3)
    del spec["dataset"]
    spec["output"] = {"uri": f"s3://{BUCKET}/retrains", "endpoint": endpoint, "credentials": {"secretName": "s3-creds"}}
    return {"metadata": {"labels": {"team": "support"}}, "spec": spec}


async def submit(api, s3_server, serving_adapter: dict, tmp_path: Path, **retrain) -> None:
    await api.create_secret("s3-creds", {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY})
    doc = {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "AdapterDeployment",
        "metadata": {"name": "support", "namespace": NS},
        "spec": {
            "baseModel": {"uri": f"file://{minilm_dir()}"},
            # a classifier, which vLLM refuses: the CPU engine serves it, in pods the test plays
            "runtime": {"engine": "kubetune-cpu", "selector": {"matchLabels": ENGINE_LABELS}},
            "storage": {"endpoint": s3_server.endpoint, "credentials": {"secretName": "s3-creds"}},
            "trafficSampling": {"rate": 1.0, "uri": f"{root_of(tmp_path)}/samples"},
            "strategy": {"type": "Canary", "unloadGraceSeconds": 0,
                         "canary": {"steps": [{"setWeight": 50}, {"pause": {"seconds": 1}}, {"setWeight": 100}]}},
            "adapters": [{
                "name": "support-bot",
                "source": {"uri": serving_adapter["manifestUri"], "digest": serving_adapter["digest"]},
                "drift": {
                    "window": {"requests": WINDOW, "minRequests": 30},
                    "embeddings": False,
                    "guard": {"triggerWindows": 2, "ofWindows": 3, "clearWindows": 2, "cooldownSeconds": 0},
                    "retrain": {"labelledData": {"uri": f"{root_of(tmp_path)}/labelled/", "minExamples": 60},
                                "template": retrain_template(s3_server.endpoint), **retrain},
                    "promotion": {"maxRegression": 0.05},
                },
            }],
        },
    }
    await api.client.create(ADAPTERDEPLOYMENTS, doc)


async def drift_of(api) -> dict:
    adep = await api.get(ADAPTERDEPLOYMENTS, "support")
    records = ((adep or {}).get("status") or {}).get("adapters") or [{}]
    return records[0].get("drift") or {}


async def wait_drift(api, predicate, timeout: float = 30.0) -> dict:
    async def check():
        state = await drift_of(api)
        return state if predicate(state) else None
    return await eventually(check, timeout=timeout)


async def events(api) -> list[str]:
    return [e["reason"] for e in await api.list(kube.EVENTS) if e.get("involvedObject", {}).get("name") == "support"]


async def serve_agents(api, pods: list[str], until) -> None:
    """Play the agents until `until()` holds: load whatever is desired, report it."""
    async def synced():
        await agents_sync(api, "support", pods)
        return await until()
    return await eventually(synced, timeout=30, interval=0.2)


async def stable_digest(api) -> str | None:
    adep = await api.get(ADAPTERDEPLOYMENTS, "support")
    records = ((adep or {}).get("status") or {}).get("adapters") or [{}]
    return ((records[0].get("stable") or {}).get("digest")) if not records[0].get("canary") else None


def labelled_rows(data: dict, intents: list[str], oos: int, per_intent: int) -> list[dict]:
    """What the support team labelled after the drift: out-of-scope requests, plus fresh in-scope ones
    (rows the serving adapter was not trained on)."""
    rows = [{"text": text, "label": "oos"} for text, _ in data["oos_train"][:oos]]
    for intent in intents[:len(intents)]:
        fresh = [t for t, i in data["train"] if i == intent][PER_INTENT:PER_INTENT + per_intent]
        rows += [{"text": t, "label": intent} for t in fresh]
    return rows


async def run_until_retrain(api, s3_server, serving_adapter, tmp_path, labelled: list[dict]) -> tuple[str, list]:
    adep_controller.RUNTIME.analyzer.drift_seconds = 0.2
    data = clinc()
    version = serving.version_name(NS, "support-bot", serving_adapter["digest"])
    pods = await agent_pods(api, "support", 1, ENGINE_LABELS)
    await serve_agents(api, pods, lambda: stable_digest(api))
    traffic = Traffic(s3_server.store(), Scorer(serving_adapter["adapterDir"]), version, root_of(tmp_path))

    # in-scope traffic: windows close, nothing fires
    in_scope = [t for t, i in data["test"] if i in serving_adapter["intents"]]
    random.Random(0).shuffle(in_scope)  # real traffic interleaves the intents
    traffic.send(in_scope[:2 * WINDOW])
    state = await wait_drift(api, lambda s: len(s.get("windows") or []) >= 2, timeout=60)
    assert not any(w["drifted"] for w in state["windows"]), [w["summary"] for w in state["windows"]]
    assert state["state"] == "Watching"

    # a burst of out-of-scope traffic: drift, but no labelled data yet
    traffic.send([t for t, _ in data["oos_test"][:4 * WINDOW]])
    state = await wait_drift(api, lambda s: s.get("drifted"), timeout=60)
    assert sum(w["drifted"] for w in state["windows"]) >= 2
    await wait_drift(api, lambda s: (s.get("lastDecision") or {}).get("reason") == "InsufficientLabelledData")
    assert await api.list(kube.FINETUNEJOBS) == []

    s3_server.store().write(f"{root_of(tmp_path)}/labelled/batch-1.jsonl",
                            "".join(json.dumps(r) + "\n" for r in labelled).encode())
    state = await wait_drift(api, lambda s: s.get("retrain"), timeout=30)
    jobs = await api.list(kube.FINETUNEJOBS)
    assert len(jobs) == 1, [j["metadata"]["name"] for j in jobs]  # the burst started one retrain
    job = jobs[0]
    assert job["metadata"]["name"] == state["retrain"]["job"] == "support-support-bot-retrain-1"
    assert job["metadata"]["labels"][driftloop.LABEL_RETRAIN_OF] == "support"
    owner = job["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"]) == ("AdapterDeployment", "support")
    assert job["spec"]["evaluation"]["reference"]["manifestUri"] == serving_adapter["manifestUri"]
    return job["metadata"]["name"], pods


async def train_retrain(api, name: str, tmp_path: Path) -> None:
    """The retrain's workloads (its CPU data stage, then training) run as rendered by the stand-in."""
    async with training_operator_loop.running(api.client, NS, tmp_path / "pods") as pods:
        status = await wait_status(api, name, lambda s: s.get("phase") in ("Succeeded", "Failed"), timeout=900)
        output = "\n".join(run.logs() for run in pods.runs.values())
    assert status["phase"] == "Succeeded", (status.get("failure"), output[-4000:])


async def test_out_of_scope_drift_retrains_and_the_better_candidate_rolls_out(operator, api, s3_server,
                                                                             serving_adapter, tmp_path):
    data = clinc()
    await submit(api, s3_server, serving_adapter, tmp_path)
    labelled = labelled_rows(data, serving_adapter["intents"], oos=90, per_intent=5)
    name, pods = await run_until_retrain(api, s3_server, serving_adapter, tmp_path, labelled)
    await train_retrain(api, name, tmp_path)

    state = await wait_drift(api, lambda s: s.get("history"), timeout=60)
    entry = state["history"][-1]
    assert entry["outcome"] == "Promoted", entry
    numbers = entry["numbers"]
    print("gate:", json.dumps(numbers))
    assert numbers["new"]["candidate"] > numbers["new"]["serving"] + 0.3  # it learned "oos"
    assert numbers["original"]["candidate"] >= numbers["original"]["serving"] - 0.05
    promoted = state["promoted"]["digest"]
    assert promoted == entry["digest"] != serving_adapter["digest"]

    # the canary strategy rolls the retrained adapter out; the spec itself is untouched
    async def canary_seen():
        adep = await api.get(ADAPTERDEPLOYMENTS, "support")
        return (adep["status"]["adapters"][0].get("canary") or {}).get("digest") == promoted
    await serve_agents(api, pods, canary_seen)
    async def promoted_everywhere():
        return await stable_digest(api) == promoted
    await serve_agents(api, pods, promoted_everywhere)
    adep = await api.get(ADAPTERDEPLOYMENTS, "support")
    assert adep["spec"]["adapters"][0]["source"]["digest"] == serving_adapter["digest"]
    reasons = await events(api)
    for reason in ("WindowClean", "WindowDrifted", "DriftDetected", "InsufficientLabelledData", "RetrainStarted",
                   "CandidatePromoted"):
        assert reason in reasons, reasons
    # the new version is watched from scratch (its own reference)
    state = await wait_drift(api, lambda s: s.get("version", "").endswith(promoted.split(":")[1][:12]))
    assert state["windows"] == [] and state["state"] in ("Watching", "Cooldown")


async def test_a_candidate_worse_on_the_original_holdout_is_rejected(operator, api, s3_server, serving_adapter,
                                                                   tmp_path):
    data = clinc()
    # trained on the new data only (includeOriginalData: false) and only one in-scope intent in it: the
    # candidate handles out-of-scope requests but forgets the intents it served
    await submit(api, s3_server, serving_adapter, tmp_path, includeOriginalData=False)
    labelled = labelled_rows(data, serving_adapter["intents"][:1], oos=90, per_intent=20)
    name, _ = await run_until_retrain(api, s3_server, serving_adapter, tmp_path, labelled)
    await train_retrain(api, name, tmp_path)
    state = await wait_drift(api, lambda s: s.get("history"), timeout=60)
    entry = state["history"][-1]
    print("gate:", json.dumps(entry["numbers"]))
    assert entry["outcome"] == "Rejected" and entry["reason"] == "RegressesOnOriginalData", entry
    assert entry["numbers"]["original"]["candidate"] < entry["numbers"]["original"]["serving"] - 0.05
    assert "promoted" not in state
    assert await stable_digest(api) == serving_adapter["digest"]
    assert "CandidateRejected" in await events(api)


# --- restart safety, with a synthetic adapter (no training: fast) ------------------------------------------

def synthetic_adapter(s3_server, tmp_path: Path) -> dict:
    """A published adapter whose manifest carries a drift profile: confident, low-entropy answers."""
    from kubetune.api import storage_layout
    from kubetune.clients.storage import publish_adapter

    rng = random.Random(1)
    confidences = [0.85 + 0.14 * rng.random() for _ in range(200)]
    entropies = [0.05 + 0.4 * rng.random() for _ in range(200)]
    texts = [f"how do i reset my password number {i}" for i in range(200)]
    store = s3_server.store()
    store.write(f"s3://{BUCKET}/synthetic/val.jsonl",
                "".join(json.dumps({"text": t, "label": "reset"}) + "\n" for t in texts).encode())
    root = tmp_path / "synthetic"
    root.mkdir()
    (root / "adapter_model.safetensors").write_bytes(b"\x01" * 512)
    (root / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    prefix = storage_layout.job_prefix(f"s3://{BUCKET}/serving", NS, "synthetic", "uid-synthetic")
    document = publish_adapter(store, root, prefix, {
        "rank": 8, "task": "SequenceClassification", "baseModel": {"uri": f"file://{minilm_dir()}"},
        "dataset": {"uri": f"s3://{BUCKET}/synthetic/val.jsonl", "validationUri": f"s3://{BUCKET}/synthetic/val.jsonl",
                    "format": "text-label"},
        "driftProfile": {"kind": "classification", "holdoutSize": 200,
                         "vocabulary": {w: 10 for w in ["how", "do", "i", "reset", "my", "password", "number"]},
                         "confidence": {"values": confidences}, "entropy": {"values": entropies}}})
    return {"manifestUri": storage_layout.manifest_uri(prefix), "digest": document["digest"]}


class SyntheticTraffic(Traffic):
    """Answers as a confident model gives them (a 2-class distribution with the profile's shape)."""

    def __init__(self, store, version: str, root: str):
        super().__init__(store, None, version, root)
        self.rng = random.Random(2)

    def send(self, texts: list[str]) -> None:
        class Confident:
            def response(inner, text):
                top = 0.85 + 0.14 * self.rng.random()
                return {"data": [{"index": 0, "label": "reset", "probs": [top, 1 - top], "num_classes": 2}]}
        self.scorer = Confident()
        super().send(texts)


async def test_an_open_window_survives_an_operator_restart(operator, api, s3_server, tmp_path):
    adapter = synthetic_adapter(s3_server, tmp_path)
    await submit(api, s3_server, adapter, tmp_path)
    pods = await agent_pods(api, "support", 1, ENGINE_LABELS)
    await serve_agents(api, pods, lambda: stable_digest(api))
    version = serving.version_name(NS, "support-bot", adapter["digest"])
    traffic = SyntheticTraffic(s3_server.store(), version, root_of(tmp_path))
    texts = [f"how do i reset my password number {i}" for i in range(WINDOW)]
    traffic.send(texts[:25])
    state = await wait_drift(api, lambda s: (s.get("window") or {}).get("requests") == 25)
    assert state["state"] == "Watching" and not state.get("windows")

    await operator.stop()  # the open window lives in storage, not in the operator's memory
    await operator.start()
    traffic.send(texts[25:])
    state = await wait_drift(api, lambda s: s.get("windows"))
    assert [(w["index"], w["requests"], w["drifted"]) for w in state["windows"]] == [(1, WINDOW, False)]
    stored = s3_server.store().list(f"{root_of(tmp_path)}/samples/_kubetune/drift/{NS}/support/support-bot/windows/")
    assert len(stored) == 1
    verdict = json.loads(s3_server.store().read(stored[0]))
    assert verdict["requests"] == WINDOW and verdict["triggers"]["confidence"]["fired"] is False

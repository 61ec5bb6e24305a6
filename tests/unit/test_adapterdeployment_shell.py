"""`shell.adapterdeployment.run_pass` over an in-memory port: the rules of a pass (storage limits on
sources and on the drift pass, the desired state, status and Events) hold whichever adapter runs it."""

from __future__ import annotations

import asyncio
import time

from kubetune.api import base_identity, serving
from kubetune.api.validation import validate
from kubetune_operator.clients.drift_storage import Analyzer
from kubetune_operator.reconcile import adapterdeployment as adp
from kubetune_operator.shell import adapterdeployment as shell
from kubetune_testing.factories import adapterdeployment

DIGEST = "sha256:" + "a" * 64
MANIFEST = "s3://team-a/adapters/x/manifest.json"


class MemoryPort:
    """Every port operation in memory; what the pass did is recorded."""

    def __init__(self, adep: dict | None, located=(MANIFEST, DIGEST)):
        self.adep, self.located = adep, located
        self.verified = {(MANIFEST, DIGEST): adp.Source(manifest_uri=MANIFEST, digest=DIGEST, rank=8)}
        self.base_identities: dict = {}
        # the manifest is read and the samples analysed already: this pass reads no storage
        self.analyzer = Analyzer(manifests={MANIFEST: {"digest": DIGEST}},
                                 last_analysis={("team-a", "support", "support-bot"): time.monotonic()})
        self.located_for: list[str] = []
        self.drift_passes: list[str] = []
        self.applied: list = []
        self.status: dict | None = None
        self.events: list = []

    async def read(self):
        return self.adep

    async def object_store(self, adep):
        return None  # every source is verified already (self.verified); nothing reads storage

    async def locate_source(self, adep, adapter):
        self.located_for.append(adapter["name"])
        return self.located

    async def namespaces(self, adep):
        return None

    async def pods(self, adep, namespace):
        return [adp.Pod("support-0", True, None)]

    async def desired_state(self, adep):
        return None

    async def secrets_found(self, adep):
        return None

    async def apply_serving(self, adep, changed, desired, max_rank):
        self.applied.append((changed, desired, max_rank))

    async def write_status(self, adep, status):
        self.status = status

    async def post_events(self, adep, events):
        self.events += events

    async def retrain_jobs(self, adep, adapter):
        self.drift_passes.append(adapter["name"])
        return []

    async def retrains_in_flight(self):
        return 0

    async def create_retrain(self, job):
        raise AssertionError("no retrain is due")


def served(drift_output: str | None = None) -> dict:
    doc = adapterdeployment()
    doc["spec"]["adapters"][0]["source"] = {"uri": MANIFEST, "digest": DIGEST}
    if drift_output is not None:
        doc["spec"]["trafficSampling"] = {"rate": 0.1, "uri": "s3://team-a/samples/"}
        doc["spec"]["adapters"][0]["drift"] = {"retrain": {
            "labelledData": {"uri": "s3://team-a/labelled/"},
            "template": {"spec": {"baseModel": {"uri": "hf://org/model"}, "task": "SequenceClassification",
                                  "training": {"epochs": 2}, "output": {"uri": drift_output}}}}}
    result = validate(doc)
    assert result.ok, result.errors
    return {**result.defaulted, "metadata": {**result.defaulted["metadata"], "uid": "uid-1", "generation": 1}}


def run(port: MemoryPort, settings: adp.Settings | None = None) -> shell.PassResult | None:
    return asyncio.run(shell.run_pass(port, settings or adp.Settings()))


def test_nothing_to_reconcile_touches_nothing():
    port = MemoryPort(None)
    assert run(port) is None
    assert port.status is None and port.applied == [] and port.events == []


def test_a_pass_publishes_the_desired_state_status_and_events():
    port = MemoryPort(served())
    result = run(port)
    changed, desired, max_rank = port.applied[0]
    assert changed is desired and changed.generation == 1 and max_rank == 8
    assert [a.alias for a in desired.adapters] == [serving.alias_name("team-a", "support-bot")]
    assert port.status is result.status and port.status["adapters"][0]["stable"]["digest"] == DIGEST
    assert result.drift_events == []


def test_a_source_outside_the_namespace_prefixes_is_refused_unread():
    port = MemoryPort(served())
    run(port, adp.Settings(allowed_sources={"team-a": ("s3://elsewhere/",)}))
    record = port.status["adapters"][0]
    assert record["refused"]["reason"] in ("SourceNotAllowed", "StorageNotAllowed")
    assert "stable" not in record
    assert any(e.reason == record["refused"]["reason"] for e in port.events)


def test_a_located_problem_is_reported_as_the_source():
    port = MemoryPort(served(), located=adp.Source(problems=(("FineTuneJobNotReady", "not yet"),)))
    run(port)
    assert port.status["adapters"][0]["refused"]["reason"] == "FineTuneJobNotReady"


def test_the_drift_pass_runs_only_over_allowed_storage():
    allowed = {"team-a": ("s3://team-a/",)}
    inside, outside = MemoryPort(served("s3://team-a/out")), MemoryPort(served("s3://team-b/out"))
    run(inside, adp.Settings(allowed_sources=allowed))
    run(outside, adp.Settings(allowed_sources=allowed))
    assert inside.drift_passes == ["support-bot"] and "drift" in inside.status["adapters"][0]
    assert outside.drift_passes == [] and "drift" not in outside.status["adapters"][0]


def test_no_limits_configured_every_drift_adapter_runs():
    """`kubetune local` configures no storage limits: the same rule admits every drift adapter."""
    port = MemoryPort(served("s3://team-b/out"))
    run(port)
    assert port.drift_passes == ["support-bot"]


def test_the_served_base_is_resolved_only_for_manifests_that_record_an_identity():
    port = MemoryPort(served())
    run(port)
    assert port.base_identities == {}  # an older manifest: the URIs are compared, nothing is read
    trained = base_identity.identity({"architectures": ["LlamaForCausalLM"], "hidden_size": 4096}, "main")
    other = base_identity.identity({"architectures": ["LlamaForCausalLM"], "hidden_size": 8192}, "main")
    base = port.adep["spec"]["baseModel"]
    port.verified[(MANIFEST, DIGEST)] = adp.Source(manifest_uri=MANIFEST, digest=DIGEST, rank=8,
                                                   base_model={**base, "identity": trained})
    port.base_identities[(base["uri"], base.get("revision"))] = (time.monotonic() + 60, (other, "read"))
    run(port)
    refused = port.status["adapters"][0]["refused"]
    assert refused["reason"] == "BaseModelMismatch" and "config.json digest" in refused["message"]

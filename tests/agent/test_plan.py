"""The agent's pure decisions: sync plan, manifest and file checks, routing, measuring, reporting."""

from __future__ import annotations

import datetime as dt
import math
import random
from collections import Counter

import pytest

from kubetune.api import manifest as manifest_api
from kubetune.api import serving, storage_layout
from kubetune_agent import plan

NS = "team-a"
D1, D2, D3 = "sha256:" + "1" * 64, "sha256:" + "2" * 64, "sha256:" + "3" * 64


def version(adapter: str, digest: str, weight: int = 100, role: str = "stable") -> serving.Version:
    return serving.Version(name=serving.version_name(NS, adapter, digest), digest=digest,
                           manifest_uri=f"file:///store/{NS}/{adapter}/uid/manifest.json", weight=weight, role=role)


STABLE = version("intents", D1, 90)
CANARY = version("intents", D2, 10, "canary")
OTHER = version("summaries", D3)
DESIRED = serving.DesiredState(generation=4, adapters=[
    serving.AliasState(f"{NS}/intents", [STABLE, CANARY]), serving.AliasState(f"{NS}/summaries", [OTHER])])


# --- sync plan --------------------------------------------------------------------------------------


def test_plan_downloads_unverified_loads_verified_and_unloads_undesired():
    steps = plan.plan_sync(DESIRED, engine_loaded={OTHER.name, "team-a/old@aaaaaaaaaaaa"}, verified={D1},
                           retry_at={}, now=100.0)
    assert steps.unload == ["team-a/old@aaaaaaaaaaaa"]
    assert steps.load == [STABLE]
    assert steps.download == [CANARY]
    assert not steps.empty


def test_plan_is_empty_when_the_engine_has_exactly_the_desired_versions():
    steps = plan.plan_sync(DESIRED, {STABLE.name, CANARY.name, OTHER.name}, set(), {}, 0.0)
    assert steps.empty and steps == plan.SyncPlan()


def test_plan_reloads_everything_after_an_engine_restart():
    steps = plan.plan_sync(DESIRED, engine_loaded=set(), verified={D1, D2, D3}, retry_at={}, now=0.0)
    assert [v.name for v in steps.load] == sorted([STABLE.name, CANARY.name, OTHER.name])
    assert not steps.download and not steps.unload


def test_plan_waits_out_the_backoff_of_a_failed_version():
    steps = plan.plan_sync(DESIRED, {STABLE.name, OTHER.name}, set(), {CANARY.name: 10.0}, now=5.0)
    assert steps.waiting == [CANARY.name] and steps.empty
    steps = plan.plan_sync(DESIRED, {STABLE.name, OTHER.name}, set(), {CANARY.name: 10.0}, now=10.5)
    assert steps.download == [CANARY]


def test_plan_without_desired_state_touches_nothing():
    assert plan.plan_sync(None, {"team-a/x@aaaaaaaaaaaa"}, set(), {}, 0.0).empty


def test_retry_delay_doubles_up_to_the_cap():
    assert [plan.retry_delay(n, 2.0, 30.0) for n in range(1, 7)] == [2, 4, 8, 16, 30, 30]


def test_lora_names_are_the_entries_with_a_parent():
    models = {"object": "list", "data": [{"id": "base", "parent": None}, {"id": STABLE.name, "parent": "base"},
                                         {"id": 3, "parent": "base"}, "junk"]}
    assert plan.lora_names(models) == {STABLE.name}
    assert plan.lora_names([]) == set()


# --- manifest and file checks -----------------------------------------------------------------------


def manifest_for(files: list[dict], manifest_uri: str) -> dict:
    files = [dict(f) for f in files]
    digest = manifest_api.files_digest(files)
    job_prefix = plan.job_prefix_of(manifest_uri)
    return {"api": manifest_api.MANIFEST_API, "digest": digest, "files": files,
            "adapterPath": storage_layout.adapter_prefix(job_prefix, digest)[len(job_prefix):]}


FILES = [{"path": "adapter_config.json", "sha256": "a" * 64, "size": 10},
         {"path": "adapter_model.safetensors", "sha256": "b" * 64, "size": 4096}]


def test_manifest_of_the_desired_digest_is_accepted():
    uri = "s3://bucket/team-a/intents/uid/manifest.json"
    document = manifest_for(FILES, uri)
    assert plan.job_prefix_of(uri) == "s3://bucket/team-a/intents/uid/"
    wanted = serving.Version("n", document["digest"], uri, 100)
    assert plan.check_manifest(document, wanted) is None
    assert plan.adapter_prefix_of(document, uri) == storage_layout.adapter_prefix(plan.job_prefix_of(uri),
                                                                                   document["digest"])


def test_manifest_of_another_digest_is_a_digest_mismatch():
    uri = "s3://bucket/p/manifest.json"
    document = manifest_for(FILES, uri)
    reason, message = plan.check_manifest(document, serving.Version("n", D1, uri, 100))
    assert reason == plan.DIGEST_MISMATCH and D1 in message


def test_manifest_whose_file_list_does_not_match_its_digest_is_a_digest_mismatch():
    uri = "s3://bucket/p/manifest.json"
    document = manifest_for(FILES, uri)
    document["files"][1]["sha256"] = "c" * 64  # tampered list, digest left as it was
    assert plan.check_manifest(document, serving.Version("n", document["digest"], uri, 100))[0] == \
        plan.DIGEST_MISMATCH


def test_manifest_pointing_outside_its_digest_path_is_refused():
    uri = "s3://bucket/p/manifest.json"
    document = manifest_for(FILES, uri) | {"adapterPath": "adapter/sha256-" + "f" * 64 + "/"}
    assert plan.check_manifest(document, serving.Version("n", document["digest"], uri, 100))[0] == \
        plan.DIGEST_MISMATCH


def test_malformed_manifest_is_invalid():
    assert plan.check_manifest({"api": "x"}, STABLE)[0] == plan.MANIFEST_INVALID
    assert plan.check_manifest([], STABLE)[0] == plan.MANIFEST_INVALID


def test_check_files_compares_size_then_sha256():
    good = {"adapter_config.json": (10, "a" * 64), "adapter_model.safetensors": (4096, "b" * 64)}
    assert plan.check_files(FILES, good) is None
    assert plan.check_files(FILES, good | {"adapter_model.safetensors": (4095, "b" * 64)})[0] == plan.DIGEST_MISMATCH
    assert plan.check_files(FILES, good | {"adapter_model.safetensors": (4096, "c" * 64)})[0] == plan.DIGEST_MISMATCH
    assert plan.check_files(FILES, good | {"adapter_config.json": None})[0] == plan.DOWNLOAD_FAILED


def test_error_entries_are_bounded():
    assert plan.error_entry("LoadFailed", "x" * 5000) == {"reason": "LoadFailed", "message": "x" * plan.MESSAGE_LIMIT}


# --- routing ----------------------------------------------------------------------------------------


def test_weighted_choice_follows_the_weights():
    rng = random.Random(1234)
    counts = Counter(plan.choose_version([STABLE, CANARY], rng.random()).name for _ in range(20000))
    assert counts[CANARY.name] / 20000 == pytest.approx(0.10, abs=0.01)
    assert counts[STABLE.name] / 20000 == pytest.approx(0.90, abs=0.01)


def test_weighted_choice_boundaries():
    assert plan.choose_version([STABLE, CANARY], 0.0) == STABLE
    assert plan.choose_version([STABLE, CANARY], 0.8999) == STABLE
    assert plan.choose_version([STABLE, CANARY], 0.9) == CANARY
    assert plan.choose_version([STABLE, CANARY], 1.0) == CANARY  # clamped below 1


def test_weight_zero_never_serves_while_a_weighted_version_is_loaded():
    stable, idle = version("intents", D1, 100), version("intents", D2, 0, "canary")
    rng = random.Random(5)
    assert {plan.choose_version([stable, idle], rng.random()) for _ in range(2000)} == {stable}


def test_a_version_not_loaded_hands_its_share_to_the_loaded_ones():
    rng = random.Random(9)
    picks = {plan.choose_version([STABLE, CANARY], rng.random(), loaded={CANARY.name}) for _ in range(200)}
    assert picks == {CANARY}
    assert plan.choose_version([STABLE, CANARY], 0.5, loaded=set()) is None
    idle = version("intents", D2, 0, "canary")
    assert plan.choose_version([STABLE, idle], 0.5, loaded={idle.name}) == idle  # better than nothing


def test_route_aliases_bare_and_qualified():
    loaded = {STABLE.name, CANARY.name, OTHER.name}
    assert plan.route("intents", NS, DESIRED, loaded, 0.1) == plan.Route(200, f"{NS}/intents", STABLE.name)
    assert plan.route(f"{NS}/intents", NS, DESIRED, loaded, 0.95) == plan.Route(200, f"{NS}/intents", CANARY.name)
    assert plan.route(CANARY.name, NS, DESIRED, loaded, 0.0) == plan.Route(200, f"{NS}/intents", CANARY.name)
    bare_version = CANARY.name.split("/", 1)[1]
    assert plan.route(bare_version, NS, DESIRED, loaded, 0.0).version == CANARY.name


def test_route_refuses_other_tenants_unknown_names_and_nothing_loaded():
    loaded = {STABLE.name}
    assert plan.route("team-b/intents", NS, DESIRED, loaded, 0.1).status == 404
    assert plan.route("team-b/intents@" + "1" * 12, NS, DESIRED, loaded, 0.1).status == 404
    assert plan.route("nope", NS, DESIRED, loaded, 0.1).status == 404
    assert plan.route(f"{NS}/intents@" + "9" * 12, NS, DESIRED, loaded, 0.1).status == 404
    assert plan.route("summaries", NS, DESIRED, loaded, 0.1).status == 503
    assert plan.route(CANARY.name, NS, DESIRED, loaded, 0.1).status == 503
    assert plan.route(None, NS, DESIRED, loaded, 0.1).status == 400
    assert plan.route("intents", NS, None, loaded, 0.1).status == 503
    # the routing draw falls on the canary, which is not loaded: the stable one serves
    assert plan.route("intents", NS, DESIRED, loaded, 0.95).version == STABLE.name


# --- measuring --------------------------------------------------------------------------------------


def test_record_counts_latency_buckets_per_bucket():
    metrics = serving.VersionMetrics()
    for seconds in (0.001, 0.005, 0.007, 0.3, 100.0):
        plan.record(metrics, seconds, error=False, confidences=[])
    plan.record(metrics, 0.02, error=True, confidences=[0.5, 1.0])
    assert metrics.requests == 6 and metrics.errors == 1
    assert metrics.latency_buckets[0] == 2  # <= 0.005
    assert metrics.latency_buckets[1] == 1  # <= 0.01
    assert metrics.latency_buckets[2] == 1  # <= 0.025
    assert metrics.latency_buckets[6] == 1  # <= 0.5
    assert metrics.latency_buckets[-1] == 1  # +Inf
    assert sum(metrics.latency_buckets) == metrics.requests
    assert metrics.latency_sum == pytest.approx(100.333)
    assert (metrics.confidence_sum, metrics.confidence_count) == (1.5, 2)


def test_only_server_side_failures_are_errors():
    assert plan.is_error(500) and plan.is_error(502) and plan.is_error(503)
    assert not plan.is_error(200) and not plan.is_error(400) and not plan.is_error(404)


def test_scores_of_classifications_completions_and_chats():
    classify = {"data": [{"probs": [0.7, 0.3]}, {"probs": [0.1, 0.9]}, {"probs": []}]}
    assert plan.scores(serving.ENGINE_CLASSIFY, classify) == [
        (0.7, pytest.approx(-(0.7 * math.log(0.7) + 0.3 * math.log(0.3)))),
        (0.9, pytest.approx(-(0.1 * math.log(0.1) + 0.9 * math.log(0.9))))]
    # chosen tokens only (a client's `logprobs: 0`): top-1 = the chosen token, entropy 0
    completion = {"choices": [{"logprobs": {"token_logprobs": [None, math.log(0.5), math.log(0.9)]}},
                              {"logprobs": None}]}
    assert plan.scores(serving.ENGINE_COMPLETIONS, completion) == [(pytest.approx(0.7), 0.0)]
    # top logprobs (what the agent asks for): the top-1 probability and the renormalised top-K entropy
    completion = {"choices": [{"logprobs": {"token_logprobs": [math.log(0.3)], "top_logprobs": [
        {"a": math.log(0.3), "b": math.log(0.6)}]}}]}
    [(confidence, entropy)] = plan.scores(serving.ENGINE_COMPLETIONS, completion)
    assert confidence == pytest.approx(0.6)
    assert entropy == pytest.approx(-(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3)))
    chat = {"choices": [{"logprobs": {"content": [
        {"logprob": math.log(0.6), "top_logprobs": [{"logprob": math.log(0.6)}, {"logprob": math.log(0.4)}]},
        {"logprob": math.log(0.8), "top_logprobs": [{"logprob": math.log(0.8)}, {"logprob": math.log(0.2)}]}]}}]}
    [(confidence, entropy)] = plan.scores(serving.ENGINE_CHAT, chat)
    assert confidence == pytest.approx(0.7)
    assert entropy == pytest.approx((-(0.6 * math.log(0.6) + 0.4 * math.log(0.4))
                                     - (0.8 * math.log(0.8) + 0.2 * math.log(0.2))) / 2)
    assert plan.scores(serving.ENGINE_COMPLETIONS, {"choices": [{"text": "x"}]}) == []
    assert plan.scores(serving.ENGINE_COMPLETIONS, None) == []


# --- sampling and reporting -------------------------------------------------------------------------


def test_sampling_decision_and_object_names():
    assert plan.should_sample(0.1, "s3://b/samples", 0.05)
    assert not plan.should_sample(0.1, "s3://b/samples", 0.5)
    assert not plan.should_sample(1.0, None, 0.0)
    assert not plan.should_sample(0.0, "s3://b/samples", 0.0)
    when = dt.datetime(2025, 3, 4, 5, 6, 7, tzinfo=dt.UTC)
    assert plan.sample_object_uri("s3://b/samples/", NS, "serve-0", when, 3) == \
        "s3://b/samples/team-a/serve-0/2025-03-04/20250304T050607Z-000003.jsonl"


def test_report_building_and_fingerprint():
    metrics = {STABLE.name: serving.VersionMetrics(requests=3)}
    report = plan.build_report(generation=4, engine_ready=True, engine_loaded={STABLE.name, "team-a/old@aaaaaaaaaaaa"},
                               digests={STABLE.name: D1}, errors={CANARY.name: plan.error_entry("DigestMismatch", "x")},
                               metrics=metrics, started="2025-01-01T00:00:00Z", now="2025-01-01T00:01:00Z")
    assert report.loaded == {STABLE.name: D1, "team-a/old@aaaaaaaaaaaa": ""}
    assert report.errors == {CANARY.name: {"reason": "DigestMismatch", "message": "x"}}
    parsed = serving.AgentReport.from_json(report.to_json())
    assert parsed.metrics[STABLE.name].requests == 3 and parsed.generation == 4
    metrics[STABLE.name].requests += 1  # the report holds a copy
    assert report.metrics[STABLE.name].requests == 3
    later = plan.build_report(generation=4, engine_ready=True, engine_loaded={STABLE.name, "team-a/old@aaaaaaaaaaaa"},
                              digests={STABLE.name: D1}, errors=report.errors, metrics=metrics,
                              started=report.started, now="2025-01-01T00:02:00Z")
    assert plan.report_fingerprint(later) == plan.report_fingerprint(report)  # counters and time do not count
    moved = plan.build_report(generation=5, engine_ready=True, engine_loaded={STABLE.name}, digests={}, errors={},
                              metrics={}, started=report.started, now=report.updated)
    assert plan.report_fingerprint(moved) != plan.report_fingerprint(report)

"""FineTuneJob flows through kopf + KMock + SeaweedFS, the way a user's `kubectl apply` drives them."""

from __future__ import annotations

import asyncio
import copy
import json

import kmock
import pytest

from kubetune.api import jobconfig, storage_layout
from kubetune.clients import kube
from kubetune.clients.storage import publish_adapter
from kubetune_operator.backends import render_children
from kubetune_operator.controllers import finetunejob as ftj_controller
from kubetune_operator.reconcile import conditions as cond
from kubetune_testing.factories import DATA_REPORT, finetunejob
from kubetune_testing.seaweedfs import ACCESS_KEY, BUCKET, SECRET_KEY

from .conftest import NS, eventually
from .stage_helpers import data_stage_name, pass_data_stage

pytestmark = pytest.mark.integration


def job_doc(name: str, s3_endpoint: str, **overrides) -> dict:
    doc = finetunejob(**overrides)
    doc["metadata"] = {"name": name, "namespace": NS}
    doc["spec"]["output"] = {"uri": f"s3://{BUCKET}/jobs", "endpoint": s3_endpoint,
                             "credentials": {"secretName": "s3-creds"}}
    return doc


async def submit(api, s3_server, name: str, data_stage: bool = True, **overrides) -> dict:
    """Create the FineTuneJob and (`data_stage`) let its CPU data stage succeed: the training job is next."""
    await api.create_secret("s3-creds", {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY})
    created, _ = await api.client.create(kube.FINETUNEJOBS, job_doc(name, s3_server.endpoint, **overrides))
    if data_stage:
        await pass_data_stage(api, s3_server, created)
    return created


async def status_of(api, name: str) -> dict:
    job = await api.get(kube.FINETUNEJOBS, name)
    return (job or {}).get("status") or {}


async def wait_phase(api, name: str, phase: str, timeout: float = 10.0) -> dict:
    async def check():
        status = await status_of(api, name)
        return status if status.get("phase") == phase else None
    return await eventually(check, timeout=timeout)


def condition(status: dict, kind: str) -> dict:
    return cond.find(status.get("conditions"), kind) or {}


async def events_for(api, name: str) -> list[dict]:
    return [e for e in await api.list(kube.EVENTS) if e.get("involvedObject", {}).get("name") == name]


async def wait_event(api, name: str, reason: str, containing: str = "") -> dict:
    async def check():
        return next((e for e in await events_for(api, name)
                     if e.get("reason") == reason and containing in e.get("message", "")), None)
    return await eventually(check)


def fake_adapter(tmp_path, content: bytes = b"\x07" * 2048):
    root = tmp_path / "adapter"
    root.mkdir(exist_ok=True)
    (root / "adapter_model.safetensors").write_bytes(content)
    (root / "adapter_config.json").write_text(json.dumps({"r": 16, "lora_alpha": 32}))
    return root


async def test_create_renders_configmap_and_pytorchjob(operator, api, s3_server):
    created = await submit(api, s3_server, "create-job")
    pytorchjob = await eventually(lambda: api.get(kube.PYTORCHJOBS, "create-job"))
    config_map = await api.get(kube.CONFIGMAPS, "create-job-config")
    assert config_map is not None
    config = json.loads(config_map["data"]["config.json"])
    assert config["job"]["uid"] == created["metadata"]["uid"]
    assert pytorchjob["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
    assert pytorchjob["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    status = await wait_phase(api, "create-job", "Pending")
    assert condition(status, "Accepted")["status"] == "True"
    assert condition(status, "Accepted")["observedGeneration"] == created["metadata"]["generation"]
    assert status["trainingJob"]["name"] == "create-job"
    created_event = await wait_event(api, "create-job", "Created")
    assert created_event["type"] == "Normal"
    assert created_event["involvedObject"]["uid"] == created["metadata"]["uid"]
    assert SECRET_KEY not in json.dumps(await api.list(kube.EVENTS)) + json.dumps(config_map)


async def test_the_cpu_data_stage_comes_first_and_its_report_reaches_status(operator, api, s3_server):
    created = await submit(api, s3_server, "data-job", data_stage=False)
    data_job = await eventually(lambda: api.get(kube.PYTORCHJOBS, data_stage_name("data-job")))
    status = await wait_phase(api, "data-job", "Validating")
    assert [p["metadata"]["name"] for p in await api.list(kube.PYTORCHJOBS)] == [data_stage_name("data-job")]
    container = data_job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in json.dumps(container["resources"]) and data_job["spec"]["nprocPerNode"] == "1"
    leaked = {**DATA_REPORT, "leakage": {"policy": "Drop", "matched": 3, "dropped": 3}}
    await pass_data_stage(api, s3_server, created, leaked)
    await eventually(lambda: api.get(kube.PYTORCHJOBS, "data-job"))
    status = await wait_phase(api, "data-job", "Pending")
    assert status["data"] == {"job": data_stage_name("data-job"), "state": "Succeeded", **leaked}
    assert condition(status, "DataValidated")["status"] == "True"
    leakage = await wait_event(api, "data-job", "DataLeakage", "3 of 23 validation examples")
    assert leakage["type"] == "Warning"
    await wait_event(api, "data-job", "DataValidated", "180 training and 20 validation examples")


async def test_bad_data_fails_the_job_before_any_gpu_workload(operator, api, s3_server):
    created = await submit(api, s3_server, "bad-data", data_stage=False)
    name = data_stage_name("bad-data")
    await eventually(lambda: api.get(kube.PYTORCHJOBS, name))
    prefix = storage_layout.data_stage_prefix(storage_layout.job_prefix(f"s3://{BUCKET}/jobs", NS, "bad-data",
                                                                         created["metadata"]["uid"]))
    message = "the dataset has invalid lines (nothing was trained): invalid_json: lines 3, 7"
    s3_server.store().write(storage_layout.progress_uri(prefix),
                            json.dumps({"failure": {"reason": "BadInput", "message": message}}).encode())
    await api.set_pytorchjob_conditions(name, ("Failed", "PyTorchJobFailed", "1 Master replica(s) failed"))
    status = await wait_phase(api, "bad-data", "Failed")
    assert status["failure"]["reason"] == "BadInput" and "lines 3, 7" in status["failure"]["message"]
    assert status["data"]["state"] == "Failed" and "lines 3, 7" in status["data"]["message"]
    await asyncio.sleep(1.0)  # a few resyncs: still nothing on a GPU
    assert [p["metadata"]["name"] for p in await api.list(kube.PYTORCHJOBS)] == [name]


async def test_pytorchjob_conditions_flow_into_status(operator, api, s3_server):
    await submit(api, s3_server, "run-job")
    await eventually(lambda: api.get(kube.PYTORCHJOBS, "run-job"))
    await api.set_pytorchjob_conditions(
        "run-job", ("Created", "PyTorchJobCreated", "created"), ("Running", "PyTorchJobRunning", "running"),
        startTime="2026-11-28T11:00:00Z",
        replicaStatuses={"Master": {"active": 1}, "Worker": {"active": 1}})
    status = await wait_phase(api, "run-job", "Running")
    assert condition(status, "Running")["status"] == "True"
    assert status["startTime"] == "2026-11-28T11:00:00Z"
    assert status["replicas"]["Worker"]["active"] == 1
    assert status["attempts"] == 1
    await api.set_pytorchjob_conditions(
        "run-job", ("Restarting", "PyTorchJobRestarting", "master exited 143"),
        replicaStatuses={"Master": {"active": 1, "failed": 1}, "Worker": {"active": 1}})
    status = await eventually(lambda: _attempts_at_least(api, "run-job", 2))
    assert condition(status, "Running")["reason"] == "Restarting"


async def _attempts_at_least(api, name, n):
    status = await status_of(api, name)
    return status if status.get("attempts", 0) >= n else None


async def test_success_with_manifest_publishes_the_adapter(operator, api, s3_server, tmp_path):
    created = await submit(api, s3_server, "ok-job")
    await eventually(lambda: api.get(kube.PYTORCHJOBS, "ok-job"))
    prefix = storage_layout.job_prefix(f"s3://{BUCKET}/jobs", NS, "ok-job", created["metadata"]["uid"])
    manifest = publish_adapter(s3_server.store(), fake_adapter(tmp_path), prefix,
                               {"metrics": {"eval_loss": 0.42, "accuracy": 0.91},
                                "baselineMetrics": {"eval_loss": 1.9}})
    completed = ftj_controller.now_rfc3339()
    await api.set_pytorchjob_conditions("ok-job", ("Succeeded", "PyTorchJobSucceeded", "done"),
                                        completionTime=completed)
    status = await wait_phase(api, "ok-job", "Succeeded")
    published = condition(status, "AdapterPublished")
    assert published["status"] == "True" and published["reason"] == "Verified"
    adapter = status["adapter"]
    assert adapter["digest"] == manifest["digest"]
    assert adapter["uri"] == storage_layout.adapter_prefix(prefix, manifest["digest"])
    assert adapter["sizeBytes"] == sum(f["size"] for f in manifest["files"])
    assert adapter["metrics"] == {"eval_loss": 0.42, "accuracy": 0.91}
    assert status["completionTime"] == completed
    event = await wait_event(api, "ok-job", "AdapterPublished")
    assert manifest["digest"] in event["message"]


def fake_merged(tmp_path):
    root = tmp_path / "merged"
    root.mkdir(exist_ok=True)
    (root / "model.safetensors").write_bytes(b"\x08" * 65536)
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return root


async def test_a_merged_model_is_verified_and_recorded_or_fails_the_job(operator, api, s3_server, tmp_path):
    """output.mergeAdapter on S3: both artifacts verified, status.merged recorded; a merged file removed
    after publishing fails the job with its reason (the adapter alone is never enough)."""
    store, prefixes = s3_server.store(), {}
    for name in ("merged-job", "broken-merged-job"):
        created = await submit(api, s3_server, name)  # the operator checks what the manifest references
        await eventually(lambda name=name: api.get(kube.PYTORCHJOBS, name))
        prefixes[name] = storage_layout.job_prefix(f"s3://{BUCKET}/jobs", NS, name, created["metadata"]["uid"])
        manifest = publish_adapter(store, fake_adapter(tmp_path), prefixes[name], {"metrics": {"eval_loss": 0.4}},
                                   merged_dir=fake_merged(tmp_path))
    _, bucket, key = storage_layout.split_uri(manifest["merged"]["uri"] + "model.safetensors")
    store.s3.delete_object(Bucket=bucket, Key=key)
    for name in prefixes:
        await api.set_pytorchjob_conditions(name, ("Succeeded", "PyTorchJobSucceeded", "done"))
    status = await wait_phase(api, "merged-job", "Succeeded")
    merged_uri = storage_layout.merged_prefix(prefixes["merged-job"], manifest["merged"]["digest"])
    assert status["merged"]["uri"] == merged_uri
    assert status["merged"]["digest"] == manifest["merged"]["digest"]  # same bytes: the same digest
    assert status["merged"]["sizeBytes"] == 65536 + len(json.dumps({"model_type": "llama"}))
    assert status["adapter"]["sizeBytes"] == sum(f["size"] for f in manifest["files"])
    status = await wait_phase(api, "broken-merged-job", "Failed")
    assert status["failure"]["reason"] == "MergedFileMissing"
    assert "merged model: model.safetensors is missing" in status["failure"]["message"]
    assert "merged" not in status and "adapter" not in status


async def test_missing_manifest_is_not_published_until_it_appears(operator, api, s3_server, tmp_path):
    created = await submit(api, s3_server, "late-job")
    await eventually(lambda: api.get(kube.PYTORCHJOBS, "late-job"))
    await api.set_pytorchjob_conditions("late-job", ("Succeeded", "PyTorchJobSucceeded", "done"))
    status = await wait_phase(api, "late-job", "Publishing")
    published = condition(status, "AdapterPublished")
    assert published["status"] == "False" and published["reason"] == "ManifestMissing"
    assert "adapter" not in status
    prefix = storage_layout.job_prefix(f"s3://{BUCKET}/jobs", NS, "late-job", created["metadata"]["uid"])
    publish_adapter(s3_server.store(), fake_adapter(tmp_path), prefix, {})
    status = await wait_phase(api, "late-job", "Succeeded")  # found by the periodic resync
    assert condition(status, "AdapterPublished")["status"] == "True"


async def test_manifest_that_never_appears_fails_the_job(operator, api, s3_server):
    await submit(api, s3_server, "lost-job")
    await eventually(lambda: api.get(kube.PYTORCHJOBS, "lost-job"))
    await api.set_pytorchjob_conditions("lost-job", ("Succeeded", "PyTorchJobSucceeded", "done"),
                                        completionTime="2026-11-28T00:00:00Z")
    status = await wait_phase(api, "lost-job", "Failed")
    assert status["failure"]["reason"] == "ManifestMissing"
    assert condition(status, "AdapterPublished")["status"] == "False"


async def test_tampered_adapter_is_refused(operator, api, s3_server, tmp_path):
    created = await submit(api, s3_server, "bad-digest")
    await eventually(lambda: api.get(kube.PYTORCHJOBS, "bad-digest"))
    prefix = storage_layout.job_prefix(f"s3://{BUCKET}/jobs", NS, "bad-digest", created["metadata"]["uid"])
    manifest = publish_adapter(s3_server.store(), fake_adapter(tmp_path), prefix, {})
    # same size, different bytes: only a content check can see it
    _, bucket, key = storage_layout.split_uri(prefix + manifest["adapterPath"] + "adapter_model.safetensors")
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=b"\x08" * 2048)
    await api.set_pytorchjob_conditions("bad-digest", ("Succeeded", "PyTorchJobSucceeded", "done"))
    status = await wait_phase(api, "bad-digest", "Failed")
    published = condition(status, "AdapterPublished")
    assert published["status"] == "False" and published["reason"] == "DigestMismatch"
    assert "adapter_model.safetensors" in published["message"]
    assert "adapter" not in status


async def test_training_failure_carries_the_reason(operator, api, s3_server):
    await submit(api, s3_server, "fail-job")
    await eventually(lambda: api.get(kube.PYTORCHJOBS, "fail-job"))
    await api.set_pytorchjob_conditions(
        "fail-job", ("Failed", "PyTorchJobFailed", "PyTorchJob team-a/fail-job is failed because 1 Master replica(s) "
                                                   "failed."))
    status = await wait_phase(api, "fail-job", "Failed")
    assert status["failure"]["reason"] == "PyTorchJobFailed"
    assert "1 Master replica(s) failed" in condition(status, "Failed")["message"]
    event = await wait_event(api, "fail-job", "PyTorchJobFailed")
    assert event["type"] == "Warning"


async def set_suspend(api, name: str, suspend: bool) -> None:
    """Flip spec.runPolicy.suspend like `kubectl patch`, and wait until the operator mirrored it."""
    await api.client.patch(kube.FINETUNEJOBS, NS, name, {"spec": {"runPolicy": {"suspend": suspend}}})

    async def mirrored():
        pytorchjob = await api.get(kube.PYTORCHJOBS, name)
        return pytorchjob["spec"]["runPolicy"]["suspend"] is suspend
    await eventually(mirrored)


async def test_suspend_and_resume(operator, api, s3_server):
    await submit(api, s3_server, "pause-job")
    await eventually(lambda: api.get(kube.PYTORCHJOBS, "pause-job"))
    await api.set_pytorchjob_conditions("pause-job", ("Running", "PyTorchJobRunning", "running"))
    await wait_phase(api, "pause-job", "Running")
    await set_suspend(api, "pause-job", True)
    await api.set_pytorchjob_conditions("pause-job", ("Suspended", "PyTorchJobSuspended", "suspended"))
    status = await wait_phase(api, "pause-job", "Suspended")
    assert condition(status, "Suspended")["status"] == "True"
    await set_suspend(api, "pause-job", False)
    await api.set_pytorchjob_conditions("pause-job", ("Running", "PyTorchJobResumed", "resumed"))
    status = await wait_phase(api, "pause-job", "Running")
    assert condition(status, "Suspended")["status"] == "False"


async def test_operator_restart_mid_flight_keeps_exactly_one_pytorchjob(operator, api, s3_server, k8s):
    await submit(api, s3_server, "restart-job")
    await eventually(lambda: api.get(kube.PYTORCHJOBS, "restart-job"))
    await wait_phase(api, "restart-job", "Pending")
    for _ in range(2):
        await operator.stop()
        await api.set_pytorchjob_conditions("restart-job", ("Running", "PyTorchJobRunning", "running"))
        await operator.start()
        await wait_phase(api, "restart-job", "Running")
        await asyncio.sleep(1.0)  # a few resyncs
    names = [pj["metadata"]["name"] for pj in await api.list(kube.PYTORCHJOBS)]
    assert names.count("restart-job") == 1
    # the data stage's and the training job's, each once
    assert len(k8s[kmock.action.CREATE, kmock.resource("kubeflow.org", "v1", "pytorchjobs")]) == 2


async def test_crash_after_creating_children_before_status_adopts_them(operator, api, s3_server, k8s):
    """The operator died after creating the first PyTorchJob (the data stage's) but before writing status:
    a restart adopts it, and the training job follows it once."""
    await operator.stop()
    created = await submit(api, s3_server, "adopt-job", data_stage=False)
    from kubetune.api.validation import validate

    job = copy.deepcopy(created)
    job.update({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob"})
    for child in render_children(validate(job).defaulted | {"metadata": job["metadata"]},
                                 operator.settings.render, jobconfig.Stage(kind=jobconfig.STAGE_DATA)):
        resource = kube.CONFIGMAPS if child["kind"] == "ConfigMap" else kube.PYTORCHJOBS
        await api.client.create(resource, child)
    await operator.start()
    status = await wait_phase(api, "adopt-job", "Validating")
    assert status["data"]["job"] == data_stage_name("adopt-job")
    await pass_data_stage(api, s3_server, created)
    status = await wait_phase(api, "adopt-job", "Pending")
    assert status["trainingJob"]["name"] == "adopt-job" and status["data"]["state"] == "Succeeded"
    await asyncio.sleep(1.0)
    names = sorted(pj["metadata"]["name"] for pj in await api.list(kube.PYTORCHJOBS))
    assert names == ["adopt-job", data_stage_name("adopt-job")]


async def test_final_status_survives_the_ttl_removal(operator, api, s3_server, tmp_path):
    created = await submit(api, s3_server, "ttl-job", runPolicy={"ttlSecondsAfterFinished": 0})
    await eventually(lambda: api.get(kube.PYTORCHJOBS, "ttl-job"))
    prefix = storage_layout.job_prefix(f"s3://{BUCKET}/jobs", NS, "ttl-job", created["metadata"]["uid"])
    publish_adapter(s3_server.store(), fake_adapter(tmp_path), prefix, {})
    await api.set_pytorchjob_conditions("ttl-job", ("Succeeded", "PyTorchJobSucceeded", "done"))
    final = await wait_phase(api, "ttl-job", "Succeeded")
    await api.client.delete(kube.PYTORCHJOBS, NS, "ttl-job")  # what the training operator's TTL does
    await asyncio.sleep(1.5)
    assert await api.get(kube.PYTORCHJOBS, "ttl-job") is None  # not recreated
    after = await status_of(api, "ttl-job")
    assert after["phase"] == "Succeeded" and after["adapter"] == final["adapter"]


async def test_invalid_spec_is_rejected_without_children(operator, api, s3_server):
    # The API server's CEL rules would refuse this; KMock has no admission, so the operator's own
    # validation is what stands between a bad spec and GPU time.
    await submit(api, s3_server, "bad-spec", data_stage=False, method={"type": "QLoRA", "lora": {"rank": 8}},
                 distributed={"nodes": 1, "gpusPerNode": 1})
    status = await wait_phase(api, "bad-spec", "Failed")
    accepted = condition(status, "Accepted")
    assert accepted["status"] == "False" and accepted["reason"] == "InvalidSpec"
    assert "method.quantization is required when method.type is QLoRA" in accepted["message"]
    assert await api.list(kube.PYTORCHJOBS) == []  # not even the data stage
    assert await api.get(kube.CONFIGMAPS, "bad-spec-config") is None


async def test_deleting_the_job_removes_its_children(operator, api, s3_server):
    created = await submit(api, s3_server, "gone-job")
    pj = await eventually(lambda: api.get(kube.PYTORCHJOBS, "gone-job"))
    cm = await api.get(kube.CONFIGMAPS, "gone-job-config")
    for child in (pj, cm):
        owner = child["metadata"]["ownerReferences"][0]
        assert owner["uid"] == created["metadata"]["uid"]
        assert owner["controller"] is True and owner["blockOwnerDeletion"] is True
    await api.client.delete(kube.FINETUNEJOBS, NS, "gone-job")
    await eventually(lambda: _gone(api, "gone-job"))
    # the children go with their owner (the emulator's garbage collector follows ownerReferences)
    assert await api.get(kube.PYTORCHJOBS, "gone-job") is None
    assert await api.get(kube.CONFIGMAPS, "gone-job-config") is None
    # the operator holds no finalizer (an uninstalled operator never blocks deletion) and does not
    # recreate anything for a job that is gone
    await asyncio.sleep(1.0)
    assert await api.get(kube.PYTORCHJOBS, "gone-job") is None


async def _gone(api, name):
    return await api.get(kube.FINETUNEJOBS, name) is None


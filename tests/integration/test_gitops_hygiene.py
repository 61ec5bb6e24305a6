"""GitOps hygiene through kopf + KMock + SeaweedFS: parents that carry Argo CD and Flux tracking labels
and annotations (as `kubectl apply` by Argo CD or Flux leaves them) run their flows; every request the
operator sends to a FineTuneJob or AdapterDeployment is recorded. The operator never writes spec, never
touches the parents' labels, touches annotations only under kopf's own `kubetune.io/` prefix (finalizer
bookkeeping, last-handled configuration), and none of the children in the emulator carries a tracking
key."""

from __future__ import annotations

import json

import kmock
import pytest

from kubetune.api import storage_layout
from kubetune.clients import kube
from kubetune.clients.storage import publish_adapter
from kubetune_operator.controllers.adapterdeployment import (
    ADAPTERDEPLOYMENTS,
    DEPLOYMENTS,
    RESOURCES,
    ROLEBINDINGS,
    ROLES,
    SERVICEACCOUNTS,
    SERVICES,
)
from kubetune_operator.render import gitops
from kubetune_testing.factories import TRACKING_ANNOTATIONS, TRACKING_LABELS, adapterdeployment, finetunejob
from kubetune_testing.seaweedfs import ACCESS_KEY, BUCKET, SECRET_KEY

from .conftest import NS, eventually
from .stage_helpers import pass_data_stage

pytestmark = pytest.mark.integration

OPERATOR_ANNOTATION_PREFIX = "kubetune.io/"  # kopf's progress and diff-base storage (controllers.main.configure)


def tracked_metadata(name: str) -> dict:
    return {"name": name, "namespace": NS, "labels": {**TRACKING_LABELS, "team": "a"},
            "annotations": {**TRACKING_ANNOTATIONS, "owner": "alice"}}


def writes_to(k8s, plural: str, name: str) -> list:
    return [r for r in list(k8s) if r.method in (kmock.method.PATCH, kmock.method.PUT, kmock.method.POST)
            and r.resource is not None and r.resource.plural == plural and r.name == name]


def touched_paths(request) -> list[tuple[str, ...]]:
    """Every (top-level, ...) path a merge patch or JSON patch sets, from the raw request body."""
    body = json.loads(request.body)
    if isinstance(body, list):  # JSON patch
        return [tuple(part.replace("~1", "/").replace("~0", "~") for part in op["path"].strip("/").split("/"))
                for op in body if op.get("op") != "test"]
    paths = []
    for key, value in body.items():
        if key == "metadata" and isinstance(value, dict):
            for meta_key, meta_value in value.items():
                if meta_key in ("labels", "annotations") and isinstance(meta_value, dict):
                    paths += [("metadata", meta_key, k) for k in meta_value] or [("metadata", meta_key)]
                else:
                    paths.append(("metadata", meta_key))
        else:
            paths.append((key,))
    return paths


def assert_operator_writes_only_status_and_its_bookkeeping(k8s, plural: str, name: str) -> list:
    requests = writes_to(k8s, plural, name)
    status_writes = [r for r in requests if r.subresource == "status"]
    assert status_writes, f"no status write to {plural}/{name}"
    for request in requests:
        if request.subresource == "status":
            assert {p[0] for p in touched_paths(request)} <= {"status"}, request.body
            continue
        assert request.subresource is None, request
        for path in touched_paths(request):
            assert path[0] == "metadata", f"{request.method} {plural}/{name} touches {path}: {request.body!r}"
            assert path[:2] != ("metadata", "labels"), f"the operator wrote labels: {request.body!r}"
            if path[:2] == ("metadata", "annotations"):
                assert len(path) == 3 and path[2].startswith(OPERATOR_ANNOTATION_PREFIX), request.body
            else:
                assert path[1] in ("finalizers", "resourceVersion"), request.body
    return requests


def assert_no_tracking_keys(children: list[dict], parent: dict) -> None:
    assert children
    for child in children:
        where = f"{child['kind']} {child['metadata']['name']}"
        assert child["metadata"].get("uid") != parent["metadata"]["uid"], f"{where} is its parent"
        for key in ("labels", "annotations"):
            leaked = [k for k in child["metadata"].get(key) or {} if gitops.is_tracking_key(k)]
            assert not leaked, f"{where} {key} carry {leaked}"
        template = (child.get("spec") or {}).get("template") or {}
        leaked = [k for k in (template.get("metadata") or {}).get("labels") or {} if gitops.is_tracking_key(k)]
        assert not leaked, f"{where} pod template carries {leaked}"
        assert TRACKING_ANNOTATIONS["argocd.argoproj.io/tracking-id"] not in json.dumps(child)


def owned(objects: list[dict], parent: dict) -> list[dict]:
    uid = parent["metadata"]["uid"]
    return [o for o in objects if any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences") or [])]


async def test_finetunejob_with_tracking_metadata(k8s, operator, api, s3_server, tmp_path):
    await api.create_secret("s3-creds", {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY})
    doc = finetunejob()
    doc["metadata"] = tracked_metadata("tracked")
    doc["spec"]["output"] = {"uri": f"s3://{BUCKET}/jobs", "endpoint": s3_server.endpoint,
                             "credentials": {"secretName": "s3-creds"}}
    created, _ = await api.client.create(kube.FINETUNEJOBS, doc)
    await pass_data_stage(api, s3_server, created)
    await eventually(lambda: api.get(kube.PYTORCHJOBS, "tracked"))
    await api.set_pytorchjob_conditions("tracked", ("Running", "PyTorchJobRunning", "running"))
    prefix = storage_layout.job_prefix(f"s3://{BUCKET}/jobs", NS, "tracked", created["metadata"]["uid"])
    root = tmp_path / "adapter"
    root.mkdir()
    (root / "adapter_model.safetensors").write_bytes(b"\x07" * 2048)
    (root / "adapter_config.json").write_text(json.dumps({"r": 16, "lora_alpha": 32}))
    publish_adapter(s3_server.store(), root, prefix, {"metrics": {"eval_loss": 0.42}})
    await api.set_pytorchjob_conditions("tracked", ("Succeeded", "PyTorchJobSucceeded", "done"))

    async def succeeded():
        job = await api.get(kube.FINETUNEJOBS, "tracked")
        return job if (job.get("status") or {}).get("phase") == "Succeeded" else None
    job = await eventually(succeeded, timeout=15)

    assert_operator_writes_only_status_and_its_bookkeeping(k8s, "finetunejobs", "tracked")
    assert {k: v for k, v in job["metadata"]["labels"].items()} == {**TRACKING_LABELS, "team": "a"}
    assert {k: v for k, v in job["metadata"]["annotations"].items()
            if not k.startswith(OPERATOR_ANNOTATION_PREFIX)} == {**TRACKING_ANNOTATIONS, "owner": "alice"}
    children = owned(await api.list(kube.CONFIGMAPS) + await api.list(kube.PYTORCHJOBS), created)
    # the data stage's and the training job's
    assert sorted(c["kind"] for c in children) == ["ConfigMap", "ConfigMap", "PyTorchJob", "PyTorchJob"]
    assert_no_tracking_keys(children, created)


async def test_adapterdeployment_with_tracking_metadata(k8s, operator, api, s3_server, tmp_path):
    await api.create_secret("s3-creds", {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY})
    root = tmp_path / "serving"
    root.mkdir()
    (root / "adapter_model.safetensors").write_bytes(b"\x07" * 2048)
    (root / "adapter_config.json").write_text(json.dumps({"r": 16, "lora_alpha": 32}))
    prefix = storage_layout.job_prefix(f"s3://{BUCKET}/serving", NS, "a1", "uid-a1")
    manifest = publish_adapter(s3_server.store(), root, prefix,
                               {"rank": 16, "baseModel": {"uri": "hf://meta-llama/Llama-2-7b-hf", "revision": "main"}})
    doc = adapterdeployment()
    doc["metadata"] = tracked_metadata("tracked-serving")
    doc["spec"]["adapters"] = [{"name": "support-bot", "source": {"uri": storage_layout.manifest_uri(prefix),
                                                                  "digest": manifest["digest"]}}]
    doc["spec"]["strategy"] = {"type": "Immediate", "unloadGraceSeconds": 0}
    doc["spec"]["storage"] = {"endpoint": s3_server.endpoint, "credentials": {"secretName": "s3-creds"}}
    created, _ = await api.client.create(ADAPTERDEPLOYMENTS, doc)
    await eventually(lambda: api.get(SERVICES, "tracked-serving"), timeout=15)
    await eventually(lambda: api.get(DEPLOYMENTS, "tracked-serving-serving"))

    async def status_written():
        adep = await api.get(ADAPTERDEPLOYMENTS, "tracked-serving")
        return adep if (adep.get("status") or {}).get("adapters") else None
    adep = await eventually(status_written)

    assert_operator_writes_only_status_and_its_bookkeeping(k8s, "adapterdeployments", "tracked-serving")
    assert adep["metadata"]["labels"] == {**TRACKING_LABELS, "team": "a"}
    children = []
    for resource in {*RESOURCES.values(), SERVICEACCOUNTS, ROLES, ROLEBINDINGS}:
        children += owned(await api.list(resource), created)
    assert sorted(c["kind"] for c in children) == ["ConfigMap", "Deployment", "Role", "RoleBinding", "Service",
                                                   "ServiceAccount"]
    assert_no_tracking_keys(children, created)

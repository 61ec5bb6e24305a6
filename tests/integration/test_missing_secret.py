"""A Secret the pods reference that does not exist (yet), through kopf + KMock + SeaweedFS: the
FineTuneJob waits in Pending with `SecretsFound=False` and one Warning Event naming the Secret and the
variable, creates nothing, and starts as soon as the Secret appears (a GitOps sync may create it a moment
after the job); an AdapterDeployment reports the same for its serving pods and recovers. Secrets other
than the storage credentials are checked with metadata-only reads (reconcile.secrets)."""

from __future__ import annotations

import pytest

from kubetune.api import storage_layout
from kubetune.clients import kube
from kubetune_operator.controllers.adapterdeployment import ADAPTERDEPLOYMENTS, DEPLOYMENTS
from kubetune_operator.reconcile import conditions as cond
from kubetune_testing.factories import adapterdeployment, finetunejob
from kubetune_testing.seaweedfs import ACCESS_KEY, BUCKET, SECRET_KEY

from .conftest import NS, eventually
from .test_secret_hygiene import publish

pytestmark = pytest.mark.integration
S3_KEYS = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}


async def secrets_condition(api, resource, name: str, status: str, reason: str) -> dict:
    async def check():
        doc = await api.client.get(resource, NS, name)
        found = cond.find(((doc or {}).get("status") or {}).get("conditions"), "SecretsFound") or {}
        return found if (found.get("status"), found.get("reason")) == (status, reason) else None
    return await eventually(check, timeout=20)


async def warnings(api, name: str) -> list[dict]:
    return [e for e in await api.list(kube.EVENTS)
            if e.get("involvedObject", {}).get("name") == name and e.get("type") == "Warning"]


async def test_a_job_waits_for_its_secret_then_starts(k8s, operator, api, s3_server):
    doc = finetunejob(baseModel={"uri": "hf://org/private-model", "credentials": {"secretName": "hf-late"}})
    doc["metadata"] = {"name": "late-secret", "namespace": NS}
    doc["spec"]["output"] = {"uri": f"s3://{BUCKET}/jobs", "endpoint": s3_server.endpoint,
                             "credentials": {"secretName": "s3-late"}}
    await api.client.create(kube.FINETUNEJOBS, doc)
    missing = await secrets_condition(api, kube.FINETUNEJOBS, "late-secret", "False", "SecretNotFound")
    assert f'Secret "s3-late" not found in namespace {NS} (for AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)' \
        in missing["message"]
    assert 'Secret "hf-late" not found' in missing["message"] and "(for HF_TOKEN)" in missing["message"]
    job = await api.get(kube.FINETUNEJOBS, "late-secret")
    assert job["status"]["phase"] == "Pending" and "trainingJob" not in job["status"]
    assert await api.list(kube.PYTORCHJOBS) == []  # not even the data stage, whose pod needs them too
    assert await api.get(kube.CONFIGMAPS, "late-secret-config") is None
    await eventually(lambda: warnings(api, "late-secret"))

    # the storage Secret arrives with a key missing: read whole (the operator uses it), so its keys are checked
    await api.create_secret("s3-late", {"AWS_ACCESS_KEY_ID": ACCESS_KEY})
    await api.create_secret("hf-late", {"token": "hf_not_a_real_token"})
    keyless = await secrets_condition(api, kube.FINETUNEJOBS, "late-secret", "False", "SecretKeyNotFound")
    assert keyless["message"].startswith('Secret "s3-late" has no key "AWS_SECRET_ACCESS_KEY"')
    assert await api.list(kube.PYTORCHJOBS) == []

    await api.client.patch(kube.SECRETS, NS, "s3-late", {"data": {"AWS_SECRET_ACCESS_KEY": "c2VjcmV0"}})
    await secrets_condition(api, kube.FINETUNEJOBS, "late-secret", "True", "SecretsFound")
    assert await eventually(lambda: api.get(kube.PYTORCHJOBS, "late-secret-data"), timeout=20)  # the first stage
    reasons = [e["reason"] for e in await warnings(api, "late-secret")]
    assert reasons.count("SecretNotFound") == 1 and reasons.count("SecretKeyNotFound") == 1  # once each
    # only the storage Secret was ever read whole; the token only as metadata
    whole = {r.name for r in list(k8s) if r.resource is not None and r.resource.plural == "secrets"
             and r.method == "GET" and "as=PartialObjectMetadata" not in (r.headers.get("Accept") or "")}
    assert whole == {"s3-late"}


async def test_an_adapterdeployment_reports_its_serving_pods_missing_secret(k8s, operator, api, s3_server,
                                                                           tmp_path):
    prefix = storage_layout.job_prefix(f"s3://{BUCKET}/serving", NS, "late", "uid-late")
    manifest = publish(s3_server, tmp_path, prefix, "serve", {"rank": 16,
                                                             "baseModel": {"uri": "hf://meta-llama/Llama-2-7b-hf"}})
    doc = adapterdeployment()
    doc["metadata"] = {"name": "late-serve", "namespace": NS}
    # the engine's gated base model: its token Secret is the engine container's, checked like the agents'
    doc["spec"]["baseModel"]["credentials"] = {"secretName": "hf-serve-late"}
    doc["spec"]["adapters"] = [{"name": "support-bot", "source": {"uri": storage_layout.manifest_uri(prefix),
                                                                  "digest": manifest["digest"]}}]
    doc["spec"]["strategy"] = {"type": "Immediate", "unloadGraceSeconds": 0}
    doc["spec"]["storage"] = {"endpoint": s3_server.endpoint, "credentials": {"secretName": "serve-late"}}
    await api.client.create(ADAPTERDEPLOYMENTS, doc)
    missing = await secrets_condition(api, ADAPTERDEPLOYMENTS, "late-serve", "False", "SecretNotFound")
    assert 'Secret "serve-late" not found' in missing["message"]
    assert f'Secret "hf-serve-late" not found in namespace {NS} (for HF_TOKEN)' in missing["message"]
    deployment = await eventually(lambda: api.get(DEPLOYMENTS, "late-serve-serving"))  # its pods wait for them
    engine = deployment["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-serve-late", "key": "token"}}} \
        in engine["env"]
    await eventually(lambda: warnings(api, "late-serve"))
    await api.create_secret("serve-late", S3_KEYS)

    async def only_the_token_missing():
        doc = await api.client.get(ADAPTERDEPLOYMENTS, NS, "late-serve")
        found = cond.find(((doc or {}).get("status") or {}).get("conditions"), "SecretsFound") or {}
        return found if found.get("status") == "False" and "serve-late" not in found["message"].replace(
            "hf-serve-late", "") else None
    assert "(for HF_TOKEN)" in (await eventually(only_the_token_missing, timeout=20))["message"]
    await api.create_secret("hf-serve-late", {"token": "hf_not_a_real_token"})
    await secrets_condition(api, ADAPTERDEPLOYMENTS, "late-serve", "True", "SecretsFound")
    reads = [r for r in list(k8s) if r.resource is not None and r.resource.plural == "secrets" and r.method == "GET"]
    metadata_only = {r.name for r in reads if "as=PartialObjectMetadata" in (r.headers.get("Accept") or "")}
    whole = {r.name for r in reads if "as=PartialObjectMetadata" not in (r.headers.get("Accept") or "")}
    assert "hf-serve-late" in metadata_only and "hf-serve-late" not in whole  # its value never reaches the operator


async def test_a_secret_in_a_namespace_that_did_not_grant_it_is_reported_until_it_opts_in(k8s, operator, api,
                                                                                          s3_server):
    """Cluster-wide, the operator reads Secrets only where a namespace granted the chart's Secrets role:
    elsewhere the job says so (SecretNotReadable) and waits; a tenant's RoleBinding lets it start."""
    tenant = "team-c"  # not in the chart's rbac.secretNamespaces
    k8s.expected_refusals = [f'cannot get resource "secrets" in API group "" in the namespace "{tenant}"']
    await api.client.create(kube.SECRETS, {"apiVersion": "v1", "kind": "Secret",
                                           "metadata": {"name": "s3-creds", "namespace": tenant},
                                           "stringData": S3_KEYS})
    doc = finetunejob()
    doc["metadata"] = {"name": "tenant-job", "namespace": tenant}
    doc["spec"]["output"] = {"uri": f"s3://{BUCKET}/jobs", "endpoint": s3_server.endpoint,
                             "credentials": {"secretName": "s3-creds"}}
    await api.client.create(kube.FINETUNEJOBS, doc)

    async def secrets_found(reason: str):
        job = await api.client.get(kube.FINETUNEJOBS, tenant, "tenant-job")
        found = cond.find(((job or {}).get("status") or {}).get("conditions"), "SecretsFound") or {}
        return found if found.get("reason") == reason else None
    unreadable = await eventually(lambda: secrets_found("SecretNotReadable"), timeout=20)
    assert unreadable["message"].startswith(f'the operator may not read Secret "s3-creds" in namespace {tenant} '
                                            "(for AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY): grant it with a "
                                            "RoleBinding of the chart's <release>-secrets ClusterRole")
    assert await api.client.list(kube.PYTORCHJOBS, tenant) == []

    await api.client.create(kube.Resource("rbac.authorization.k8s.io", "v1", "rolebindings"), {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "kubetune-secrets", "namespace": tenant},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kubetune-secrets"},
        "subjects": [{"kind": "ServiceAccount", "name": "kubetune", "namespace": "kubetune-system"}]})
    await eventually(lambda: secrets_found("SecretsFound"), timeout=20)
    assert await eventually(lambda: api.client.get(kube.PYTORCHJOBS, tenant, "tenant-job-data"), timeout=20)
    assert k8s.enforcement.authorizer.refused


async def test_an_adapterdeployment_says_which_secret_it_may_not_read(k8s, operator, api, s3_server, tmp_path):
    """Its storage credentials unreadable, storage is not reached with any other credentials; the
    status says why and the pass goes on."""
    tenant = "team-c"
    k8s.expected_refusals = [f'cannot get resource "secrets" in API group "" in the namespace "{tenant}"']
    prefix = storage_layout.job_prefix(f"s3://{BUCKET}/serving", tenant, "c", "uid-c")
    manifest = publish(s3_server, tmp_path, prefix, "serve", {"rank": 16,
                                                             "baseModel": {"uri": "hf://meta-llama/Llama-2-7b-hf"}})
    doc = adapterdeployment()
    doc["metadata"] = {"name": "tenant-serve", "namespace": tenant}
    doc["spec"]["adapters"] = [{"name": "support-bot", "source": {"uri": storage_layout.manifest_uri(prefix),
                                                                  "digest": manifest["digest"]}}]
    doc["spec"]["storage"] = {"endpoint": s3_server.endpoint, "credentials": {"secretName": "s3-creds"}}
    await api.client.create(ADAPTERDEPLOYMENTS, doc)

    async def unreadable():
        found = await api.client.get(ADAPTERDEPLOYMENTS, tenant, "tenant-serve")
        condition = cond.find(((found or {}).get("status") or {}).get("conditions"), "SecretsFound") or {}
        return condition if condition.get("reason") == "SecretNotReadable" else None
    condition = await eventually(unreadable, timeout=20)
    assert f'the operator may not read Secret "s3-creds" in namespace {tenant}' in condition["message"]
    status = (await api.client.get(ADAPTERDEPLOYMENTS, tenant, "tenant-serve"))["status"]
    assert status["phase"] != "Ready"

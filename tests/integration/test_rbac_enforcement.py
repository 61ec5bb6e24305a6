"""The emulator's RBAC and admission stand-ins answer as the API server does: what the chart does not
grant is refused with 403 and the API server's message, Roles cannot escalate, blockOwnerDeletion needs
the owner's finalizers, and an agent may change nothing but its own Pod's report."""

from __future__ import annotations

import aiohttp
import pytest

from kubetune.api import serving
from kubetune.clients import kube
from kubetune_operator.controllers.adapterdeployment import PODS, ROLES
from kubetune_operator.render import serving as serving_render
from kubetune_testing import auth, rbac
from kubetune_testing.factories import adapterdeployment

from .conftest import NS, OPERATOR_USER, enforce_watch_namespaces, eventually

# no test here reads kmock's request history: each request is forgotten once served
pytestmark = [pytest.mark.integration, pytest.mark.forget_served_requests]
RBAC_API = kube.Resource("rbac.authorization.k8s.io", "v1", "rolebindings")
SERVICES = kube.Resource("", "v1", "services")


@pytest.fixture(autouse=True)
def not_a_flow(k8s):
    """These probes are not flows of the product: what they use does not count for RBAC coverage."""
    k8s.enforcement.authorizer.uses = set()


def client_of(k8s, user: auth.UserInfo) -> kube.KubeClient:
    return kube.KubeClient(str(k8s.url), token=k8s.authenticator.issue(user), retries=0)


async def refused(call) -> kube.ApiError:
    with pytest.raises(kube.ApiError) as error:
        await call
    return error.value


async def answer(k8s, user: auth.UserInfo, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """The raw HTTP answer (status, JSON body) to one request of `user`."""
    headers = {"Authorization": f"Bearer {k8s.authenticator.issue(user)}"}
    if method == "PATCH":
        headers["Content-Type"] = "application/merge-patch+json"
    async with aiohttp.ClientSession() as session, session.request(
            method, str(k8s.url).rstrip("/") + path, json=body, headers=headers) as response:
        return response.status, await response.json(content_type=None)


def test_request_attributes_as_the_api_server_derives_them():
    a = rbac.attributes
    assert a("GET", "/api/v1/namespaces/team-a/pods", {}) == rbac.Attributes(
        "list", "/api/v1/namespaces/team-a/pods", "pods", "", "", "team-a", "")
    assert a("GET", "/apis/kubeflow.org/v1/pytorchjobs", {"watch": "true"}).verb == "watch"
    status = a("PATCH", "/apis/kubetune.io/v1alpha1/namespaces/team-a/finetunejobs/j/status", {})
    assert (status.verb, status.group, status.combined, status.name) == ("patch", "kubetune.io",
                                                                         "finetunejobs/status", "j")
    assert a("DELETE", "/api/v1/namespaces/team-a/configmaps", {}).verb == "deletecollection"
    assert a("PUT", "/api/v1/namespaces/team-a", {}) == rbac.Attributes(
        "update", "/api/v1/namespaces/team-a", "namespaces", "", "", "team-a", "team-a")
    assert not a("GET", "/apis/kubetune.io/v1alpha1", {}).is_resource  # discovery


async def test_what_the_chart_does_not_grant_is_refused_with_the_api_servers_status(k8s, api):
    operator = client_of(k8s, OPERATOR_USER)
    await api.client.create(SERVICES, {"apiVersion": "v1", "kind": "Service",
                                       "metadata": {"name": "svc", "namespace": NS}})
    code, body = await answer(k8s, OPERATOR_USER, "DELETE", f"/api/v1/namespaces/{NS}/services/svc")
    assert code == 403 and body["code"] == 403 and body["status"] == "Failure"
    assert body["reason"] == "Forbidden" and body["details"] == {"name": "svc", "kind": "services"}
    assert body["message"] == (
        'services "svc" is forbidden: User "system:serviceaccount:kubetune-system:kubetune" cannot delete '
        'resource "services" in API group "" in the namespace "team-a"')
    # no list or watch of Secrets anywhere; no get of Secrets where no namespace opted in
    assert (await refused(operator.list(kube.SECRETS, NS))).status == 403
    assert (await refused(operator.get(kube.SECRETS, "team-c", "s3-creds"))).status == 403
    assert await operator.get(kube.SECRETS, NS, "absent") is None  # 404: granted, not there
    assert await operator.list(kube.PYTORCHJOBS, None) == []  # cluster-wide, as kopf watches
    await operator.close()


async def test_watch_namespaces_grants_only_the_watched_namespaces(k8s):
    enforce_watch_namespaces(k8s, ("team-a",), uses=set())
    operator = client_of(k8s, OPERATOR_USER)
    assert await operator.list(kube.PYTORCHJOBS, "team-a") == []
    code, body = await answer(k8s, OPERATOR_USER, "GET", "/apis/kubeflow.org/v1/pytorchjobs")
    assert code == 403 and body["message"] == (
        'pytorchjobs.kubeflow.org is forbidden: User "system:serviceaccount:kubetune-system:kubetune" cannot '
        'list resource "pytorchjobs" in API group "kubeflow.org" at the cluster scope')
    assert (await refused(operator.list(kube.CONFIGMAPS, "team-b"))).status == 403
    assert await operator.get(kube.SECRETS, "team-a", "absent") is None
    await operator.close()


async def test_roles_cannot_grant_what_their_creator_does_not_hold(k8s):
    operator = client_of(k8s, OPERATOR_USER)
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "too-much", "namespace": NS},
            "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]}]}
    code, body = await answer(k8s, OPERATOR_USER, "POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/roles",
                              role)
    assert code == 403
    assert body["message"].startswith(
        'roles.rbac.authorization.k8s.io "too-much" is forbidden: user "system:serviceaccount:kubetune-system:'
        'kubetune" (groups=[')
    assert body["message"].endswith('attempting to grant RBAC permissions not currently held:\n'
                                    '{APIGroups:[""], Resources:["secrets"], Verbs:["list"]}')
    role["rules"] = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]}]  # held: allowed
    created, _ = await operator.create(ROLES, role)
    assert created["rules"] == role["rules"]
    await operator.close()


async def test_stored_rbac_is_read_per_request_and_block_owner_deletion_needs_finalizers(k8s, api):
    user = auth.UserInfo("jane", ("developers", "system:authenticated"))
    jane = client_of(k8s, user)
    owner, _ = await api.client.create(kube.FINETUNEJOBS, {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "owner", "namespace": NS},
        "spec": {}})
    child = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "child", "namespace": NS,
             "ownerReferences": [{"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "name": "owner",
                                  "uid": owner["metadata"]["uid"], "blockOwnerDeletion": True}]}}
    assert (await refused(jane.create(kube.CONFIGMAPS, child))).status == 403  # no binding yet
    rules = [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]}]
    await api.client.create(ROLES, {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                                    "metadata": {"name": "dev", "namespace": NS}, "rules": rules})
    await api.client.create(RBAC_API, {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "dev", "namespace": NS},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "dev"},
        "subjects": [{"kind": "Group", "name": "developers"}]})
    code, body = await answer(k8s, user, "POST", f"/api/v1/namespaces/{NS}/configmaps", child)
    assert code == 403 and body["message"].startswith(
        'configmaps "child" is forbidden: cannot set blockOwnerDeletion if an ownerReference refers to a resource '
        'you can\'t set finalizers on: User "jane" cannot update resource "finetunejobs/finalizers" in API group '
        '"kubetune.io" in the namespace "team-a"')
    rules.append({"apiGroups": ["kubetune.io"], "resources": ["finetunejobs/finalizers"], "verbs": ["update"]})
    await api.client.patch(ROLES, NS, "dev", {"rules": rules})
    created, _ = await jane.create(kube.CONFIGMAPS, child)
    assert created["metadata"]["name"] == "child"
    await jane.close()


async def test_an_agent_changes_nothing_but_its_own_pods_report(k8s, api, operator):
    """The agents' Role lets them patch pods; the chart's ValidatingAdmissionPolicy narrows that to the
    pod the token is bound to and the report annotation, answered as the API server does (403 here: the
    policy names reason Forbidden; without one it would be 422 Invalid)."""
    doc = adapterdeployment()
    doc["metadata"] = {"name": "support", "namespace": NS}
    doc["spec"]["runtime"] = {"selector": {"matchLabels": {"app": "vllm"}, "maxLoraRank": 16}}
    await api.client.create(kube.Resource("kubetune.io", "v1alpha1", "adapterdeployments"), doc)
    for pod in ("serving-0", "serving-1"):
        await api.client.create(PODS, {"apiVersion": "v1", "kind": "Pod",
                                       "metadata": {"name": pod, "namespace": NS, "labels": {"app": "vllm"},
                                                    "annotations": {"team": "a"}},
                                       "spec": {"containers": [{"name": "engine", "image": "vllm"}]}})
    await eventually(lambda: api.get(RBAC_API, "support-kubetune-agent"))
    agent = api.agent("support", "serving-0")
    report = {"metadata": {"annotations": {serving.ANNOTATION_REPORT: "{}"}}}
    patched = await agent.patch(PODS, NS, "serving-0", report)
    assert patched["metadata"]["annotations"][serving.ANNOTATION_REPORT] == "{}"

    agent_user = auth.service_account(NS, serving_render.agent_account_name("support"), pod="serving-0")
    code, body = await answer(k8s, agent_user, "PATCH", f"/api/v1/namespaces/{NS}/pods/serving-1", report)
    assert code == 403 and body["reason"] == "Forbidden"
    assert body["details"]["causes"] == [{"message": body["message"].split(" is forbidden: ")[1]}]
    assert body["message"] == (
        'pods "serving-1" is forbidden: ValidatingAdmissionPolicy \'kubetune-agent-report\' with binding '
        '\'kubetune-agent-report\' denied request: a kubetune agent may patch only the Pod its token is bound to')
    for change in ({"metadata": {"annotations": {"team": "b"}}}, {"metadata": {"labels": {"app": "other"}}}):
        error = await refused(agent.patch(PODS, NS, "serving-0", change))
        assert error.status == 403 and "may change only the kubetune.io/agent-report annotation" in str(error)
    unbound = client_of(k8s, auth.service_account(NS, serving_render.agent_account_name("support")))
    assert (await refused(unbound.patch(PODS, NS, "serving-0", report))).status == 403  # no pod-bound token
    assert (await refused(agent.get(kube.CONFIGMAPS, NS, "other-config"))).status == 403  # one ConfigMap only
    assert (await refused(agent.delete(PODS, NS, "serving-0"))).status == 403
    await unbound.close()

"""The emulator's RBAC authorizer and admission policies as pure decisions: rule matching as
rbac.go/rule.go do it, bindings scoped as the API server scopes them, the chart's agent policy."""

from __future__ import annotations

import types

from kubetune_testing import auth, rbac, rbac_coverage
from kubetune_testing.admission_policy import AdmissionPolicies

ROLE_GROUP = rbac.RBAC_GROUP


def attrs(verb: str, resource: str = "", group: str = "", sub: str = "", ns: str = "team-a", name: str = "",
          path: str = "/apis/x") -> rbac.Attributes:
    return rbac.Attributes(verb, path, resource, group, sub, ns, name)


def test_rules_match_verbs_groups_resources_subresources_and_names():
    rule = {"apiGroups": ["kubetune.io"], "resources": ["finetunejobs/status"], "verbs": ["patch"]}
    assert rbac.rule_allows(rule, attrs("patch", "finetunejobs", "kubetune.io", "status"))
    assert not rbac.rule_allows(rule, attrs("patch", "finetunejobs", "kubetune.io"))  # the main resource
    assert not rbac.rule_allows(rule, attrs("update", "finetunejobs", "kubetune.io", "status"))
    wild = {"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["*"]}
    assert rbac.rule_allows(wild, attrs("update", "pods", "", "status"))
    assert not rbac.rule_allows(wild, attrs("update", "pods"))
    named = {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["a-desired"], "verbs": ["get", "list"]}
    assert rbac.rule_allows(named, attrs("get", "configmaps", name="a-desired"))
    assert not rbac.rule_allows(named, attrs("get", "configmaps", name="other"))
    assert not rbac.rule_allows(named, attrs("list", "configmaps"))  # a list names no object
    urls = {"nonResourceURLs": ["/apis/*", "/version"], "verbs": ["get"]}
    assert rbac.rule_allows(urls, rbac.Attributes("get", "/apis/kubetune.io/v1alpha1"))
    assert not rbac.rule_allows(urls, rbac.Attributes("get", "/metrics"))


def test_a_list_or_watch_of_one_name_by_field_selector_is_authorized_for_that_name():
    path = "/api/v1/namespaces/team-a/configmaps"
    watch = rbac.attributes("GET", path, {"watch": "1", "fieldSelector": "metadata.name=a-desired"})
    assert (watch.verb, watch.resource, watch.name) == ("watch", "configmaps", "a-desired")
    listed = rbac.attributes("GET", path, {"fieldSelector": "metadata.name==a-desired"})
    assert (listed.verb, listed.name) == ("list", "a-desired")
    named = {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["a-desired"], "verbs": ["list", "watch"]}
    assert rbac.rule_allows(named, watch) and rbac.rule_allows(named, listed)
    assert not rbac.rule_allows({**named, "verbs": ["get", "list"]}, watch)  # a Role without watch
    for selector in ("metadata.name=other", "metadata.name!=a-desired", "metadata.name=a-desired,metadata.name=b",
                     "metadata.namespace=team-a"):
        assert not rbac.rule_allows(named, rbac.attributes("GET", path, {"watch": "1", "fieldSelector": selector}))


def _authorizer(*docs: dict) -> rbac.RbacAuthorizer:
    return rbac.RbacAuthorizer(types.SimpleNamespace(objects={}), docs)


def test_a_cluster_role_bound_by_a_role_binding_applies_in_that_namespace_only():
    reader = {"apiVersion": f"{ROLE_GROUP}/v1", "kind": "ClusterRole", "metadata": {"name": "reader"},
              "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]}
    binding = {"apiVersion": f"{ROLE_GROUP}/v1", "kind": "RoleBinding",
               "metadata": {"name": "reader", "namespace": "team-a"},
               "roleRef": {"apiGroup": ROLE_GROUP, "kind": "ClusterRole", "name": "reader"},
               "subjects": [{"kind": "ServiceAccount", "name": "op", "namespace": "ops"}]}
    authorizer = _authorizer(reader, binding)
    user = auth.service_account("ops", "op")
    assert authorizer.allows(user, attrs("get", "secrets", ns="team-a", name="s"))[0]
    assert not authorizer.allows(user, attrs("get", "secrets", ns="team-b", name="s"))[0]
    assert not authorizer.allows(user, attrs("get", "secrets", ns="", name="s"))[0]  # cluster scope
    assert not authorizer.allows(auth.service_account("ops", "other"), attrs("get", "secrets", name="s"))[0]
    # every authenticated user may discover the API (system:discovery)
    assert authorizer.allows(user, rbac.Attributes("get", "/apis"))[0]
    dangling = {**binding, "roleRef": {**binding["roleRef"], "name": "gone"}}
    allowed, reason = _authorizer(dangling).allows(user, attrs("get", "secrets", name="s"))
    assert not allowed and reason == f'RBAC: [clusterrole.{ROLE_GROUP} "gone" not found]'


def test_the_chart_binds_the_operator_and_never_secrets_cluster_wide():
    authorizer = _authorizer(*rbac.render_chart())
    operator = auth.service_account(rbac.RELEASE_NAMESPACE, "kubetune")
    assert authorizer.allows(operator, attrs("watch", "finetunejobs", "kubetune.io", ns=""))[0]
    assert authorizer.allows(operator, attrs("update", "finetunejobs", "kubetune.io", "finalizers", name="j"))[0]
    assert not authorizer.allows(operator, attrs("get", "secrets", name="s3-creds"))[0]
    assert not authorizer.allows(operator, attrs("delete", "pytorchjobs", "kubeflow.org", name="j"))[0]
    opted_in = _authorizer(*rbac.render_chart(**{"rbac.secretNamespaces": ["team-a"]}))
    assert opted_in.allows(operator, attrs("get", "secrets", name="s3-creds"))[0]
    assert not opted_in.allows(operator, attrs("list", "secrets"))[0]


def _pod(name: str, annotations: dict) -> dict:
    return {"metadata": {"name": name, "annotations": annotations}, "spec": {"containers": [{"name": "engine"}]}}


def test_the_agent_policy_admits_only_its_own_pods_report():
    policies = AdmissionPolicies(types.SimpleNamespace(objects={}), rbac.render_chart())
    policy = next(iter(policies.policies.values()))
    agent = auth.service_account("team-a", "support-kubetune-agent", pod="serving-0")

    def denial(user: auth.UserInfo, name: str, old: dict, new: dict):
        request = {"operation": "UPDATE", "name": name, "namespace": "team-a",
                   "userInfo": {"username": user.username, "groups": list(user.groups), "extra": user.extra_map}}
        return policies.evaluate(policy, {"object": new, "oldObject": old, "request": request, "params": None})

    old = _pod("serving-0", {"team": "a"})
    report = _pod("serving-0", {"team": "a", "kubetune.io/agent-report": "{}"})
    assert denial(agent, "serving-0", old, report) is None
    assert denial(agent, "serving-1", _pod("serving-1", {}), _pod("serving-1", {"kubetune.io/agent-report": "{}"})) \
        == ("a kubetune agent may patch only the Pod its token is bound to", "Forbidden")
    assert denial(agent, "serving-0", old, _pod("serving-0", {"team": "b"}))[0] == \
        "a kubetune agent may change only the kubetune.io/agent-report annotation"
    assert denial(agent, "serving-0", old, _pod("serving-0", {}))[0].startswith("a kubetune agent may change only")
    unbound = auth.service_account("team-a", "support-kubetune-agent")
    assert denial(unbound, "serving-0", old, report)[0].startswith("a kubetune agent may patch only")
    # other users are not the policy's business
    assert denial(auth.service_account("team-a", "datadog-agent"), "serving-1", old, _pod("x", {})) is None


def test_coverage_reports_unused_grants_and_stale_reasons():
    grants = {rbac_coverage.Grant("operator", "get", "", "configmaps"),
              rbac_coverage.Grant("operator", "delete", "", "configmaps"),
              rbac_coverage.Grant("agent", "patch", "", "pods")}
    uses = rbac_coverage.used([rbac.Use(rbac.OPERATOR, "get", "", "configmaps", "team-a"),
                               rbac.Use("system:serviceaccount:team-a:x-kubetune-agent", "patch", "", "pods", "team-a"),
                               rbac.Use("jane", "delete", "", "configmaps", "team-a")])  # not a subject: ignored
    assert rbac_coverage.problems(grants, uses, {}) == [
        "granted but no flow used it: operator: delete configmaps (remove it, or name why in rbac-rules.yaml "
        "`unexercised`)"]
    allowed = {rbac_coverage.Grant("operator", "delete", "", "configmaps"): "why",
               rbac_coverage.Grant("operator", "get", "", "configmaps"): "stale"}
    assert rbac_coverage.problems(grants, uses, allowed) == [
        "`unexercised` but used or not granted: operator: get configmaps (drop the reason)"]
    assert rbac_coverage.Grant("operator", "patch", "kubetune.io", "finetunejobs/status") in rbac_coverage.granted()

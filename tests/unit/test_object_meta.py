"""The emulator refuses what the API server refuses, for every kind: ObjectMeta and per-kind rules as pure
functions (in the server's words), and over HTTP the 422, 413 and fieldValidation answers."""

from __future__ import annotations

import json

import aiohttp
import kmock
import pytest

from kubetune_testing import object_meta as om
from kubetune_testing import write_checks
from kubetune_testing.emulator import K8sEmulator, declare_resources

SUBDOMAIN = ("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and "
             "must start and end with an alphanumeric character (regex used for validation is "
             "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')")


def texts(group: str, kind: str, obj: dict) -> list[str]:
    return [str(e) for e in om.errors(group, kind, obj)]


def config_map(name: str = "cm", **extra) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, **extra}}


def test_an_uppercase_name_is_refused_in_the_api_servers_words():
    assert texts("", "ConfigMap", config_map("Job_1")) == [f'metadata.name: Invalid value: "Job_1": {SUBDOMAIN}']
    body = om.invalid("", "ConfigMap", "Job_1", om.errors("", "ConfigMap", config_map("Job_1")))
    assert body["message"] == f'ConfigMap "Job_1" is invalid: metadata.name: Invalid value: "Job_1": {SUBDOMAIN}'
    assert body["details"]["causes"] == [{"reason": "FieldValueInvalid", "field": "metadata.name",
                                          "message": f'Invalid value: "Job_1": {SUBDOMAIN}'}]


def test_several_errors_are_listed_in_brackets_with_the_qualified_kind():
    found = om.errors("apps", "Deployment", {"metadata": {"labels": {"a": "-x"}}, "spec": {"template": {}}})
    message = om.invalid("apps", "Deployment", "", found)["message"]
    assert message.startswith('Deployment.apps "" is invalid: [metadata.name: Required value: name or generateName '
                              'is required, metadata.labels: Invalid value: "-x": a valid label must')
    assert message.endswith("spec.template.spec.containers: Required value]")


@pytest.mark.parametrize(("group", "kind", "name", "valid"), [
    ("", "Service", "svc-1", True), ("", "Service", "1svc", False), ("", "Service", "a.b", False),
    ("", "ConfigMap", "a.b", True), ("", "Namespace", "a.b", False), ("kubetune.io", "FineTuneJob", "a.b", True),
    ("rbac.authorization.k8s.io", "Role", "system:Reader", True), ("rbac.authorization.k8s.io", "Role", "a/b", False),
    ("", "Secret", "s" * 253, True), ("", "Secret", "s" * 254, False),
])
def test_names_follow_their_kinds_rule(group, kind, name, valid):
    assert (om.object_meta(group, kind, {"name": name}) == []) is valid


def test_generate_name_may_end_in_a_dash_and_needs_no_name():
    assert om.object_meta("", "Pod", {"generateName": "job-"}) == []
    assert texts("", "Pod", {"metadata": {"generateName": "Job-"}, "spec": {"containers": [
        {"name": "c", "image": "i"}]}})[0].startswith('metadata.generateName: Invalid value: "Job-"')


def test_labels_annotations_and_owner_references():
    meta = {"name": "cm", "labels": {"kubetune.io/job": "x" * 64, "bad key": "v"},
            "annotations": {"a": "x" * (256 * 1024)},
            "ownerReferences": [{"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "name": "j", "uid": ""},
                                {"apiVersion": "", "kind": "K", "name": "k", "uid": "u"}]}
    assert [str(e) for e in om.object_meta("", "ConfigMap", meta)] == [
        f'metadata.labels: Invalid value: "{"x" * 64}": must be no more than 63 characters',
        "metadata.labels: Invalid value: \"bad key\": name part must consist of alphanumeric characters, '-', '_' "
        "or '.', and must start and end with an alphanumeric character (regex used for validation is "
        "'([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')",
        "metadata.annotations: Too long: must have at most 262144 bytes",
        'metadata.ownerReferences.uid: Invalid value: "": must not be empty',
        'metadata.ownerReferences.apiVersion: Invalid value: "": version must not be empty',
    ]


def test_only_one_owner_may_be_the_controller():
    refs = [{"apiVersion": "v1", "kind": "A", "name": n, "uid": n, "controller": True} for n in ("a", "b")]
    found = om.object_meta("", "ConfigMap", {"name": "cm", "ownerReferences": refs})
    assert [e.detail for e in found] == ['Only one reference can have Controller set to true. Found "true" in '
                                         'references for A/a and A/b']


def test_config_map_and_secret_keys():
    assert texts("", "ConfigMap", {**config_map(), "data": {"a b": "1", "ok.json": "{}"}}) == [
        "data[a b]: Invalid value: \"a b\": a valid config key must consist of alphanumeric characters, '-', '_' "
        "or '.' (regex used for validation is '[-._a-zA-Z0-9]+')"]
    assert texts("", "Secret", {"metadata": {"name": "s"}, "stringData": {"..x": "1"}}) == [
        "stringData[..x]: Invalid value: \"..x\": must not start with '..'"]
    assert texts("", "ConfigMap", {**config_map(), "data": {"k": "x" * (1024 * 1024 + 1)}}) == [
        ": Too long: must have at most 1048576 bytes"]


def test_pod_templates_of_jobs():
    container = {"name": "Trainer", "image": "img", "env": [{"name": "A=B"}],
                 "resources": {"requests": {"cpu": "-1"}, "limits": {"memory": "1Gi"}}}
    job = {"metadata": {"name": "j"}, "spec": {"template": {"spec": {
        "containers": [container], "nodeSelector": {"pool": "gpu pool"}, "priorityClassName": "High"}}}}
    assert [e.field for e in om.errors("batch", "Job", job)] == [
        "spec.template.spec.containers[0].name", "spec.template.spec.containers[0].env[0].name",
        "spec.template.spec.containers[0].resources.requests[cpu]", "spec.template.spec.nodeSelector",
        "spec.template.spec.priorityClassName"]


def test_a_deployments_selector_must_select_its_template():
    deployment = {"metadata": {"name": "d"}, "spec": {"selector": {"matchLabels": {"app": "a"}}, "template": {
        "metadata": {"labels": {"app": "b"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}}
    assert texts("apps", "Deployment", deployment) == [
        'spec.template.metadata.labels: Invalid value: map[string]string{"app":"b"}: `selector` does not match '
        'template `labels`']


def test_core_events_keep_the_legacy_rules():
    event = {"metadata": {"generateName": "job.", "namespace": "team-a"}, "involvedObject": {"namespace": "team-a"}}
    assert om.errors("", "Event", event) == []
    event["involvedObject"]["namespace"] = "team-b"
    assert texts("", "Event", event) == ['involvedObject.namespace: Invalid value: "team-b": does not match '
                                         'event.namespace']


def test_kubeflow_workloads_need_dns1035_names():
    denial = om.workload_refusal("kubeflow.org", "PyTorchJob", {"metadata": {"name": "1job"}})
    assert denial["code"] == 403 and denial["message"].startswith(
        'admission webhook "validator.pytorchjob.training-operator.kubeflow.org" denied the request: '
        'metadata.name: Invalid value: "1job": should match: a DNS-1035 label must consist of')
    cel = om.workload_refusal("trainer.kubeflow.org", "TrainJob", {"metadata": {"name": "a.b"}})
    assert cel["message"] == ('TrainJob.trainer.kubeflow.org "a.b" is invalid: <nil>: Invalid value: "object": '
                              'metadata.name must match RFC 1035 DNS label format')
    assert om.workload_refusal("kubeflow.org", "PyTorchJob", {"metadata": {"name": "job-1"}}) is None


def test_duplicate_fields_are_found_with_their_paths():
    body = b'{"metadata": {"name": "a", "name": "b"}, "spec": {"c": [{"x": 1, "x": 2}]}}'
    assert write_checks.duplicate_fields(body) == ["metadata.name", "spec.c[0].x"]
    assert write_checks.duplicate_fields(b"not json") == []


@pytest.fixture()
async def api():
    async with K8sEmulator() as emulator, kmock.Server(emulator), aiohttp.ClientSession() as session:
        declare_resources(emulator)
        yield session, str(emulator.url).rstrip("/") + "/api/v1/namespaces/team-a/configmaps"


async def post(session, url: str, body: bytes | str, content_type: str = "application/json"):
    response = await session.post(url, data=body, headers={"Content-Type": content_type})
    return response.status, response.headers.getall("Warning", []), await response.json()


async def test_an_invalid_child_is_refused_with_422_and_a_status(api):
    session, url = api
    status, _, body = await post(session, url, json.dumps({**config_map("Bad"), "data": {"a b": "1"}}))
    assert status == 422 and body["reason"] == "Invalid" and body["details"]["kind"] == "ConfigMap"
    assert body["message"].startswith('ConfigMap "Bad" is invalid: [metadata.name: Invalid value: "Bad": ')
    assert [c["field"] for c in body["details"]["causes"]] == ["metadata.name", "data[a b]"]


async def test_an_update_that_breaks_a_label_is_refused(api):
    session, url = api
    assert (await post(session, url, json.dumps(config_map())))[0] < 300
    response = await session.patch(f"{url}/cm", data=json.dumps({"metadata": {"labels": {"k": "a b"}}}),
                                   headers={"Content-Type": "application/merge-patch+json"})
    assert response.status == 422
    assert (await response.json())["message"].startswith('ConfigMap "cm" is invalid: metadata.labels: Invalid value:')


async def test_a_body_over_3_mib_is_413(api):
    session, url = api
    status, _, body = await post(session, url, json.dumps({**config_map(), "data": {"k": "x" * 3 * 1024 * 1024}}))
    assert (status, body["reason"], body["message"]) == (413, "RequestEntityTooLarge",
                                                         "Request entity too large: limit is 3145728")


async def test_duplicate_and_unknown_fields_warn_by_default_and_fail_when_strict(api):
    session, url = api
    body = b'{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a", "name": "b", "lables": {"x": "y"}}}'
    status, warnings, created = await post(session, url, body)
    assert status < 300 and created["metadata"]["name"] == "b" and "lables" not in created["metadata"]
    assert warnings == ['299 - "duplicate field \\"metadata.name\\""', '299 - "unknown field \\"metadata.lables\\""']
    status, _, refused = await post(session, url + "?fieldValidation=Strict", body)
    assert (status, refused["reason"]) == (400, "BadRequest")
    assert refused["message"] == ('ConfigMap in version "v1" cannot be handled as a ConfigMap: strict decoding '
                                  'error: duplicate field "metadata.name", unknown field "metadata.lables"')


async def test_a_pytorchjob_the_webhook_denies_is_403_and_a_put_is_checked_too(api):
    session, url = api
    jobs = url.replace("/api/v1/", "/apis/kubeflow.org/v1/").replace("/configmaps", "/pytorchjobs")
    job = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "1job"}, "spec": {}}
    status, _, body = await post(session, jobs, json.dumps(job))
    assert status == 403 and "denied the request: metadata.name" in body["message"]
    assert (await post(session, url, json.dumps(config_map())))[0] < 300
    response = await session.put(f"{url}/cm?fieldValidation=Strict", headers={"Content-Type": "application/json"},
                                 data=b'{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"}, '
                                      b'"data": {"k": "1", "k": "2"}}')
    assert response.status == 400
    assert (await response.json())["message"] == ('ConfigMap in version "v1" cannot be handled as a ConfigMap: '
                                                  'strict decoding error: duplicate field "data.k"')

"""The AdapterDeployment's children: valid Kubernetes objects, least privilege, runtime LoRA updating on."""

from __future__ import annotations

import json

import kubernetes_validate

from kubetune.api import serving
from kubetune.api.validation import validate
from kubetune.runtimes import vllm
from kubetune_operator.render import serving as render
from kubetune_testing.factories import adapterdeployment

DESIRED = serving.DesiredState(generation=3, adapters=[serving.AliasState("team-a/support-bot", [
    serving.Version("team-a/support-bot@" + "a" * 12, "sha256:" + "a" * 64, "s3://adapters/x/manifest.json", 100)])])


def defaulted(doc: dict) -> dict:
    result = validate(doc)
    assert result.ok, result.errors
    return {**doc, "metadata": {**doc["metadata"], "uid": "uid-1"}, "spec": result.defaulted["spec"]}


def test_managed_runtime_children_are_valid_kubernetes_objects():
    doc = adapterdeployment()
    doc["spec"]["storage"] = {"endpoint": "http://minio:9000", "credentials": {"secretName": "s3-adapters"}}
    children = render.render_children(defaulted(doc), render.ServingSettings(), DESIRED, max_lora_rank=16)
    kinds = [c["kind"] for c in children]
    assert kinds == ["ConfigMap", "ServiceAccount", "Role", "RoleBinding", "Deployment", "Service"]
    for child in children:
        kubernetes_validate.validate(child, "1.34", strict=True)
        assert child["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    config_map, deployment, service = children[0], children[4], children[5]
    assert config_map["metadata"]["name"] == "support-desired"
    assert serving.DesiredState.from_json(config_map["data"][serving.DESIRED_KEY]) == DESIRED
    engine, agent = deployment["spec"]["template"]["spec"]["containers"]
    args = engine["args"]
    assert args[args.index("--max-lora-rank") + 1] == "16" and "--enable-lora" in args
    assert args[args.index("--max-loras") + 1] == "4" and args[0] == "meta-llama/Llama-2-7b-hf"
    assert engine["command"] == ["vllm", "serve"] and "--model" not in args
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in engine["env"]
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert deployment["spec"]["replicas"] == 2
    command = agent["command"]
    assert command[command.index("--desired-configmap") + 1] == "support-desired"
    secret_refs = [e["valueFrom"]["secretKeyRef"] for e in agent["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    assert {r["name"] for r in secret_refs} == {"s3-adapters"}  # credentials by reference only
    assert service["spec"]["ports"][0]["targetPort"] == render.AGENT_PORT  # clients reach the agent's router
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert all(template_labels[k] == v for k, v in deployment["spec"]["selector"]["matchLabels"].items())


def test_agent_rbac_reads_and_watches_one_configmap_and_patches_pods_only():
    role = next(c for c in render.render_agent_rbac(defaulted(adapterdeployment())) if c["kind"] == "Role")
    rules = role["rules"]
    assert {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["support-desired"],
            "verbs": ["get", "list", "watch"]} in rules
    assert all("*" not in json.dumps(rule) for rule in rules)
    assert sorted(v for r in rules for v in r["verbs"]) == ["get", "list", "patch", "watch"]
    remote = render.render_remote_children(defaulted(adapterdeployment()), "team-b", DESIRED)
    remote_role = next(c for c in remote if c["kind"] == "Role")
    assert remote_role["rules"][0]["verbs"] == ["get", "list", "watch"]
    assert remote_role["rules"][0]["resourceNames"] == [next(c for c in remote if c["kind"] == "ConfigMap")[
        "metadata"]["name"]]


def test_selected_pods_get_only_the_desired_state_and_rbac():
    doc = adapterdeployment()
    doc["spec"]["runtime"] = {"selector": {"matchLabels": {"app": "vllm"}, "maxLoraRank": 64}}
    adep = defaulted(doc)
    kinds = [c["kind"] for c in render.render_children(adep, render.ServingSettings(), DESIRED, 64)]
    assert kinds == ["ConfigMap", "ServiceAccount", "Role", "RoleBinding"]
    assert render.pod_selector(adep) == {"app": "vllm"}


def test_model_locations_map_to_vllm_arguments():
    # positional, as `vllm serve MODEL` takes it (its --model is deprecated)
    assert vllm.model_args({"uri": "hf://org/m", "revision": "abc"}) == ["org/m", "--revision", "abc"]
    assert vllm.model_args({"uri": "s3://models/m"}) == ["s3://models/m", "--load-format", "runai_streamer"]
    assert vllm.model_args({"uri": "file:///opt/models/m"}) == ["/opt/models/m"]
    assert vllm.model_args({"uri": "file:///m", "trustRemoteCode": True}) == ["/m", "--trust-remote-code"]


def test_template_hash_moves_with_the_engine_not_with_the_adapters():
    adep = defaulted(adapterdeployment())
    settings = render.ServingSettings()
    key = render.ANNOTATION_TEMPLATE_HASH
    base = render.render_deployment(adep, settings, 16)["metadata"]["annotations"][key]
    assert render.render_deployment(adep, settings, 16)["metadata"]["annotations"][key] == base
    assert render.render_deployment(adep, settings, 32)["metadata"]["annotations"][key] != base
    other_image = render.ServingSettings().with_engine_image("vllm", "vllm/vllm-openai:v0.12.0")
    assert render.render_deployment(adep, other_image, 16)["metadata"]["annotations"][key] != base
    # the desired adapters live in the ConfigMap only: the pods never restart for an adapter change
    children = render.render_children(adep, settings, serving.DesiredState(generation=9), 16)
    assert next(c for c in children if c["kind"] == "Deployment")["metadata"]["annotations"][key] == base

"""What the engine container needs to fetch its base model: spec.baseModel's access as the environment
vLLM and the CPU engine read (Secrets by reference only), the args as `vllm serve` and
`python -m kubetune_engine` take them, and the Secret pre-check covering them."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import yaml

from kubetune.api import serving
from kubetune.api import v1alpha1 as api
from kubetune.api.validation import validate
from kubetune.runtimes import base_model
from kubetune_operator.reconcile import adapterdeployment as adp
from kubetune_operator.reconcile import conditions as cond
from kubetune_operator.reconcile import secrets
from kubetune_operator.render import serving as render
from kubetune_testing.factories import adapterdeployment

REPO = Path(__file__).resolve().parents[2]
NOW = "2026-12-07T12:00:00Z"
S3_BASE = {"uri": "s3://models/llama", "s3": {"endpoint": "http://minio.storage:9000", "region": "eu-west-1",
                                              "credentials": {"secretName": "model-bucket"}}}


def defaulted(doc: dict) -> dict:
    result = validate(doc)
    assert result.ok, result.errors
    return {**doc, "metadata": {**doc["metadata"], "uid": "uid-1"}, "spec": result.defaulted["spec"]}


def engine_of(adep: dict, max_lora_rank: int = 16) -> dict:
    deployment = render.render_deployment(adep, render.ServingSettings(), max_lora_rank)
    kubernetes_validate.validate(deployment, "1.34", strict=True)
    return deployment["spec"]["template"]["spec"]["containers"][0]


def env_map(container: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def with_base(base: dict, **managed) -> dict:
    doc = adapterdeployment()
    doc["spec"]["baseModel"] = base
    doc["spec"]["runtime"]["managed"].update(managed)
    return defaulted(doc)


def test_a_finetunejobs_base_model_is_an_adapterdeployments():
    def without_description(schema: dict) -> dict:
        return {k: v for k, v in schema.items() if k != "description"}

    finetunejob = api.FINETUNEJOB_SPEC["properties"]["baseModel"]
    serving_base = api.ADAPTERDEPLOYMENT_SPEC["properties"]["baseModel"]
    assert without_description(finetunejob) == without_description(serving_base)
    assert {"credentials", "s3", "revision", "trustRemoteCode"} <= serving_base["properties"].keys()
    assert "region" in serving_base["properties"]["s3"]["properties"]


def test_the_canary_example_gives_vllm_its_hf_token_from_the_secret():
    doc = yaml.safe_load((REPO / "examples" / "adapterdeployment-canary.yaml").read_text())
    engine = engine_of(defaulted(doc))
    assert env_map(engine)["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    assert engine["command"] == ["vllm", "serve"]
    args = engine["args"]
    assert args[:3] == ["meta-llama/Llama-2-7b-hf", "--revision", "01c7f73d771dfac7d292323805ebc428287df4f9"]
    assert args[args.index("--max-loras") + 1] == "4" and args[args.index("--max-cpu-loras") + 1] == "8"
    assert not any("token" in arg.lower() for arg in args)  # nothing secret in args


def test_an_s3_base_streams_with_the_aws_variables_and_the_endpoint():
    engine = engine_of(with_base(S3_BASE))
    env = env_map(engine)
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "model-bucket", "key": "AWS_ACCESS_KEY_ID"}}
    assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "model-bucket", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert env["AWS_ENDPOINT_URL"] == env["RUNAI_STREAMER_S3_ENDPOINT"] == "http://minio.storage:9000"
    assert env["RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING"] == "0" and env["AWS_EC2_METADATA_DISABLED"] == "true"
    assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"] == "eu-west-1"
    assert engine["args"][:3] == ["s3://models/llama", "--load-format", "runai_streamer"]
    assert "HF_TOKEN" not in env


def test_no_access_variables_when_the_base_needs_none():
    assert base_model.base_model_env({"uri": "hf://org/open-model", "revision": "main"}) == []
    # the SDKs' default chain (an IAM role): no keys, no S3-compatible switches for AWS S3 itself
    assert base_model.base_model_env({"uri": "s3://models/llama"}) == []
    env = env_map(engine_of(with_base({"uri": "file:///opt/models/llama"})))
    assert not [name for name in env if name.startswith(("AWS_", "RUNAI_", "HF_TOKEN"))]


def test_max_loras_is_per_batch_and_max_cpu_loras_only_when_set():
    args = engine_of(with_base({"uri": "file:///opt/models/llama"}, maxLoras=2))["args"]
    assert args[0] == "/opt/models/llama" and "--model" not in args
    assert args[args.index("--max-loras") + 1] == "2" and "--max-cpu-loras" not in args
    args = engine_of(with_base({"uri": "file:///opt/models/llama"}, maxLoras=2, maxCpuLoras=16))["args"]
    assert args[args.index("--max-cpu-loras") + 1] == "16"


def test_a_managed_cpu_runtime_renders_the_cpu_engine_fetching_its_base():
    doc = adapterdeployment()
    doc["spec"]["baseModel"] = S3_BASE
    doc["spec"]["runtime"] = {"engine": "kubetune-cpu", "managed": {"replicas": 1, "maxLoras": 2, "maxCpuLoras": 4}}
    adep = defaulted(doc)
    children = render.render_children(adep, render.ServingSettings(), serving.DesiredState(generation=1), 16)
    for child in children:
        kubernetes_validate.validate(child, "1.34", strict=True)
    deployment = next(c for c in children if c["kind"] == "Deployment")
    engine, agent = deployment["spec"]["template"]["spec"]["containers"]
    command = engine["command"]
    assert command[:4] == ["python", "-m", "kubetune_engine", "s3://models/llama"]  # positional, as vLLM
    assert command[command.index("--download-dir") + 1] == render.MODEL_CACHE
    assert command[command.index("--fidelity") + 1] == "kubetune"
    assert command[command.index("--host") + 1] == "0.0.0.0"  # the kubelet probes the pod's IP
    assert command[command.index("--max-loras") + 1] == "2" and command[command.index("--max-cpu-loras") + 1] == "4"
    assert "--enable-lora" not in command and "args" not in engine
    assert "trainer" in engine["image"] and "resources" not in engine  # no GPU asked for
    assert engine["securityContext"]["readOnlyRootFilesystem"] is True
    assert engine["startupProbe"]["httpGet"]["path"] == "/health"
    env = env_map(engine)
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "model-bucket", "key": "AWS_ACCESS_KEY_ID"}}
    assert env["HOME"] == "/tmp/home" and "HF_HUB_OFFLINE" not in env
    assert agent["command"][agent["command"].index("--runtime") + 1] == "kubetune-cpu"
    hf = with_base({"uri": "hf://org/m", "revision": "abc"})
    hf["spec"]["runtime"]["engine"] = "kubetune-cpu"
    hf_engine = engine_of(hf)
    assert hf_engine["command"][3:6] == ["hf://org/m", "--revision", "abc"]
    assert env_map(hf_engine)["HF_HUB_OFFLINE"] == "0"


def test_the_secret_precheck_covers_the_engines_base_model_secrets():
    doc = adapterdeployment()
    doc["spec"]["baseModel"] = {"uri": "hf://meta-llama/Llama-2-7b-hf", "credentials": {"secretName": "hf-token"}}
    doc["spec"]["storage"] = {"credentials": {"secretName": "s3-adapters"}}
    adep = defaulted(doc)
    assert adp.needs_secrets(adep) == ["s3-adapters", "hf-token"]
    assert adp.needs_secrets(with_base(S3_BASE)) == ["model-bucket"]
    source = adp.Source(manifest_uri="s3://adapters/x/manifest.json", digest="sha256:" + "a" * 64, rank=16)
    found = {"s3-adapters": frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}), "hf-token": frozenset({"hf"})}
    plan = adp.decide(adp.Observed(adep={**adep, "status": {}}, now=NOW, sources={"support-bot": source}, pods=[],
                                   secrets=found), adp.Settings())
    condition = cond.find(plan.status["conditions"], secrets.CONDITION)
    assert condition["status"] == "False" and condition["reason"] == secrets.SECRET_KEY_NOT_FOUND
    assert condition["message"].startswith('Secret "hf-token" has no key "token" (for HF_TOKEN)')
    assert ("Warning", secrets.SECRET_KEY_NOT_FOUND) in [(e.type, e.reason) for e in plan.events]


def test_the_shared_s3_region_reaches_the_trainers_model_store_too(monkeypatch):
    from kubetune.api import jobconfig
    from kubetune_trainer import storage

    monkeypatch.setenv(jobconfig.ENV_MODEL_S3_ACCESS_KEY, "model-id")
    monkeypatch.setenv(jobconfig.ENV_MODEL_S3_SECRET_KEY, "model-secret")
    spec = {"output": {"uri": "s3://out/jobs", "region": "us-east-1"}, "baseModel": S3_BASE}
    settings = storage.model_store(spec).s3_settings
    assert (settings.endpoint, settings.region, settings.access_key) == ("http://minio.storage:9000", "eu-west-1",
                                                                         "model-id")
    no_region = {**S3_BASE, "s3": {k: v for k, v in S3_BASE["s3"].items() if k != "region"}}
    assert storage.model_store({**spec, "baseModel": no_region}).s3_settings.region == "us-east-1"  # the output's

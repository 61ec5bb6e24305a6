"""Where storage is, for every process that reaches it: the one precedence rule (spec section >
operator setting > the SDK's default), the rendered pods of both kinds carrying the resolved endpoint
and region, each process reading them back (so the environment is honoured, not merely rendered), and
the operator's flags reaching the renderers. docs/operations.md "Object storage"."""

from __future__ import annotations

import json
import subprocess
import sys

import boto3
import pytest

from kubetune.api import jobconfig, serving, storage_location
from kubetune.api.storage_location import StorageLocation
from kubetune.api.validation import validate
from kubetune.clients import storage as store
from kubetune_operator import backends, cli
from kubetune_operator.controllers import adapterdeployment as adep_controller
from kubetune_operator.controllers import finetunejob as ftj_controller
from kubetune_operator.controllers import main as operator_main
from kubetune_operator.render import serving as serving_render
from kubetune_operator.render import training as render
from kubetune_testing.factories import adapterdeployment, finetunejob

SETTING = StorageLocation(endpoint="http://seaweedfs.storage:8333", region="eu-west-3")
SPEC_ENDPOINT = "http://minio.team-a:9000"
STAGES = [jobconfig.Stage(kind=jobconfig.STAGE_DATA), jobconfig.Stage(kind=jobconfig.STAGE_BASELINE),
          jobconfig.Stage(kind=jobconfig.STAGE_SWEEP), jobconfig.Stage()]
AWS_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "RUNAI_STREAMER_S3_ENDPOINT",
                 "KUBETUNE_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "KUBETUNE_S3_REGION")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No storage variable of the machine running the tests leaks into what is checked."""
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def defaulted(doc: dict) -> dict:
    result = validate(doc)
    assert result.ok, result.errors
    return {**doc, "metadata": {**doc["metadata"], "uid": "uid-1"}, "spec": result.defaulted["spec"]}


def containers(obj: object) -> list[dict]:
    """Every container of every pod template in a rendered object, whatever its kind."""
    if isinstance(obj, list):
        return [c for item in obj for c in containers(item)]
    if not isinstance(obj, dict):
        return []
    found = list(obj["containers"]) if isinstance(obj.get("containers"), list) else []
    return found + [c for key, value in obj.items() if key != "containers" for c in containers(value)]


def values(container: dict) -> dict[str, str]:
    """The container's plain variables (what a process sees, less the Secrets)."""
    return {e["name"]: e["value"] for e in container.get("env") or [] if "value" in e}


def silent_job(spec: dict | None = None, **output) -> dict:
    """A FineTuneJob whose spec names no endpoint or region (unless `output` or `spec` do)."""
    doc = finetunejob(**(spec or {}))
    doc["spec"]["output"] = {"uri": "s3://adapters/team-a", "credentials": {"secretName": "s3-creds"}, **output}
    return defaulted(doc)


def trainer_containers(job: dict, settings: render.RenderSettings) -> list[dict]:
    out = [c for stage in STAGES for c in containers(backends.render_children(job, settings, stage)[1])]
    assert len(out) >= len(STAGES)
    return out


def managed_adep(**spec) -> dict:
    doc = adapterdeployment()
    doc["spec"]["baseModel"] = {"uri": "s3://models/llama", "s3": {"credentials": {"secretName": "model-bucket"}}}
    doc["spec"].update(spec)
    return defaulted(doc)


def serving_containers(adep: dict, settings: serving_render.ServingSettings) -> dict[str, dict]:
    deployment = serving_render.render_deployment(adep, settings, 16)
    return {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}


# --- the rule -------------------------------------------------------------------------------------


def test_the_spec_section_wins_then_the_operator_setting_then_the_sdk():
    assert storage_location.resolve({"endpoint": SPEC_ENDPOINT}, fallback=SETTING).endpoint == SPEC_ENDPOINT
    assert storage_location.resolve({}, None, fallback=SETTING) == SETTING
    assert storage_location.resolve({"endpoint": ""}, fallback=SETTING) == SETTING  # empty is unset
    assert storage_location.resolve({}) == storage_location.AWS == StorageLocation(None, None)
    # the most specific section first: spec.baseModel.s3, then spec.output
    chained = storage_location.resolve({"region": "us-west-2"}, {"endpoint": SPEC_ENDPOINT, "region": "x"},
                                       fallback=SETTING)
    assert chained == StorageLocation(SPEC_ENDPOINT, "us-west-2")
    # endpoint and region each on its own: a spec naming only a region keeps the operator's endpoint
    assert storage_location.resolve({"region": "us-west-2"}, fallback=SETTING) == StorageLocation(
        SETTING.endpoint, "us-west-2")


def test_the_environment_carries_a_location_both_ways():
    env = storage_location.location_env(SETTING)
    assert env == [{"name": "AWS_ENDPOINT_URL", "value": SETTING.endpoint},
                   {"name": "AWS_REGION", "value": "eu-west-3"}, {"name": "AWS_DEFAULT_REGION", "value": "eu-west-3"}]
    assert storage_location.from_environment({e["name"]: e["value"] for e in env}) == SETTING
    assert storage_location.location_env(storage_location.AWS) == []
    assert storage_location.from_environment({"AWS_DEFAULT_REGION": "ap-south-1"}).region == "ap-south-1"
    # the operator's own: the chart's KUBETUNE_S3_ENDPOINT first, the standard variables else
    chart = {"KUBETUNE_S3_ENDPOINT": SETTING.endpoint, "AWS_ENDPOINT_URL": "http://other:1", "AWS_REGION": "eu-west-3"}
    assert storage_location.operator_setting(chart) == SETTING
    assert storage_location.operator_setting({"AWS_ENDPOINT_URL": "http://other:1"}).endpoint == "http://other:1"


def test_a_malformed_operator_endpoint_is_refused_naming_the_flag():
    with pytest.raises(ValueError, match="--storage-endpoint 'seaweedfs:8333': an http:// or https:// URL"):
        storage_location.operator_location("seaweedfs:8333", None)
    assert storage_location.operator_location("", "") == storage_location.AWS


def test_the_crds_default_no_region_so_the_operators_can_apply():
    job, adep = silent_job(), managed_adep()
    assert "region" not in job["spec"]["output"]
    assert "region" not in (adep["spec"].get("storage") or {})


# --- what the S3 client does with it -------------------------------------------------------------


def test_botocore_reads_the_endpoint_variable_and_the_default_region_variable(monkeypatch):
    """What the rendered variables rely on, checked against the installed botocore: AWS_ENDPOINT_URL
    (botocore >= 1.31) and AWS_DEFAULT_REGION; AWS_REGION alone it ignores, hence both are set."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", SETTING.endpoint)
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    client = boto3.client("s3", aws_access_key_id="k", aws_secret_access_key="s")
    assert client.meta.endpoint_url == SETTING.endpoint
    assert client.meta.region_name == "us-east-1"  # AWS_REGION is not botocore's variable
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    assert boto3.client("s3", aws_access_key_id="k", aws_secret_access_key="s").meta.region_name == "eu-west-3"


def test_an_object_store_without_a_region_leaves_it_to_the_sdk(monkeypatch):
    """No us-east-1 of ours over the environment's region (the old fallback did exactly that)."""
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    client = store.ObjectStore(store.S3Settings(endpoint=SETTING.endpoint, access_key="k", secret_key="s")).s3
    assert client.meta.region_name == "eu-west-3"
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    # with nothing configured botocore signs for us-east-1 itself (S3 redirects to the bucket's region)
    assert store.ObjectStore(store.S3Settings(access_key="k", secret_key="s")).s3.meta.region_name == "us-east-1"


# --- trainer pods ---------------------------------------------------------------------------------


def test_every_stage_pod_carries_the_operator_setting_when_the_spec_is_silent():
    for container in trainer_containers(silent_job(), render.RenderSettings(storage=SETTING)):
        env = values(container)
        assert env["AWS_ENDPOINT_URL"] == SETTING.endpoint, container["name"]
        assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"] == "eu-west-3"


def test_the_spec_endpoint_and_region_win_in_every_stage_pod():
    job = silent_job(endpoint=SPEC_ENDPOINT, region="us-west-2")
    for container in trainer_containers(job, render.RenderSettings(storage=SETTING)):
        env = values(container)
        assert (env["AWS_ENDPOINT_URL"], env["AWS_REGION"], env["AWS_DEFAULT_REGION"]) == (
            SPEC_ENDPOINT, "us-west-2", "us-west-2")


def test_without_any_setting_the_pods_leave_storage_to_the_sdk():
    for container in trainer_containers(silent_job(), render.RenderSettings()):
        assert not set(values(container)) & set(AWS_VARIABLES)


def test_the_trainer_reads_what_its_pod_was_rendered_with(monkeypatch):
    from kubetune_trainer import storage as trainer_storage

    job = silent_job({
        "baseModel": {"uri": "s3://models/llama", "s3": {"region": "us-west-2", "credentials": {"secretName": "m"}}},
        "dataset": {"uri": "s3://data/train.jsonl", "format": "chat",
                    "s3": {"endpoint": SPEC_ENDPOINT, "credentials": {"secretName": "d"}}}})
    container = trainer_containers(job, render.RenderSettings(storage=SETTING))[0]
    for name, value in values(container).items():
        monkeypatch.setenv(name, value)
    spec = json.loads(render.config_map_data(job)[jobconfig.CONFIG_FILE])["spec"]
    assert store.output_store_from_env(spec).s3_settings.endpoint == SETTING.endpoint
    assert store.output_store_from_env(spec).s3_settings.region == "eu-west-3"
    data = trainer_storage.data_store(spec).s3_settings
    assert (data.endpoint, data.region) == (SPEC_ENDPOINT, "eu-west-3")  # its own endpoint, the setting's region
    model = trainer_storage.model_store(spec).s3_settings
    assert (model.endpoint, model.region) == (SETTING.endpoint, "us-west-2")


def test_credentials_reach_pods_only_by_secret_reference():
    job = silent_job()
    adep = managed_adep(storage={"credentials": {"secretName": "s3-adapters"}})
    rendered = [*trainer_containers(job, render.RenderSettings(storage=SETTING)),
                *serving_containers(adep, serving_render.ServingSettings(storage=SETTING)).values()]
    for container in rendered:
        for variable in container.get("env") or []:
            if "ACCESS_KEY" in variable["name"] or "SECRET" in variable["name"]:
                assert set(variable) == {"name", "valueFrom"} and "secretKeyRef" in variable["valueFrom"]


# --- serving pods ---------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["vllm", "kubetune-cpu"])
def test_agent_and_engine_carry_the_operator_setting_when_the_spec_is_silent(engine):
    adep = managed_adep(runtime={"engine": engine, "managed": {"replicas": 1}})
    pod = serving_containers(adep, serving_render.ServingSettings(storage=SETTING))
    for name in ("agent", "engine"):
        env = values(pod[name])
        assert env["AWS_ENDPOINT_URL"] == SETTING.endpoint, name
        assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"] == "eu-west-3", name
    engine_env = values(pod["engine"])
    assert engine_env["RUNAI_STREAMER_S3_ENDPOINT"] == SETTING.endpoint  # vLLM's Run:ai streamer
    assert engine_env["RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING"] == "0"


def test_each_containers_own_spec_section_wins():
    adep = managed_adep(storage={"endpoint": SPEC_ENDPOINT, "region": "us-west-2"})
    adep["spec"]["baseModel"]["s3"]["endpoint"] = "http://models.storage:9000"
    pod = serving_containers(adep, serving_render.ServingSettings(storage=SETTING))
    agent, engine = values(pod["agent"]), values(pod["engine"])
    assert (agent["AWS_ENDPOINT_URL"], agent["AWS_REGION"]) == (SPEC_ENDPOINT, "us-west-2")  # spec.storage
    assert (engine["AWS_ENDPOINT_URL"], engine["AWS_REGION"]) == ("http://models.storage:9000", "eu-west-3")


def test_an_hf_base_needs_no_storage_in_the_engine():
    adep = managed_adep(baseModel={"uri": "hf://org/open-model"})
    engine = values(serving_containers(adep, serving_render.ServingSettings(storage=SETTING))["engine"])
    assert not set(engine) & set(AWS_VARIABLES)


def test_agent_and_cpu_engine_read_what_their_containers_were_rendered_with(monkeypatch):
    from kubetune_agent.__main__ import parse_args
    from kubetune_engine.model_source import s3_store_from_env

    adep = managed_adep(runtime={"engine": "kubetune-cpu", "managed": {"replicas": 1}})
    pod = serving_containers(adep, serving_render.ServingSettings(storage=SETTING))
    with monkeypatch.context() as patch:
        for name, value in values(pod["agent"]).items():
            patch.setenv(name, value)
        args = parse_args(["--namespace", "team-a", "--desired-file", "desired.json"])
        assert (args.s3_endpoint, args.s3_region) == (SETTING.endpoint, "eu-west-3")
    for name, value in values(pod["engine"]).items():
        monkeypatch.setenv(name, value)
    settings = s3_store_from_env().s3_settings
    assert (settings.endpoint, settings.region) == (SETTING.endpoint, "eu-west-3")


# --- the operator's setting reaches the renderers -------------------------------------------------


def test_operator_flags_and_the_charts_environment_reach_every_renderer(monkeypatch):
    monkeypatch.setenv("KUBETUNE_S3_ENDPOINT", SETTING.endpoint)  # what the chart's storage.endpoint sets
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    args = cli.build_parser().parse_args(["operator", "-A", "--storage-region", "eu-west-3"])  # a flag wins
    for runtime, name in ((ftj_controller.RUNTIME, "settings"), (ftj_controller.RUNTIME, "default_s3"),
                          (adep_controller.RUNTIME, "render"), (adep_controller.RUNTIME, "default_s3"),
                          (adep_controller.RUNTIME, "settings")):
        monkeypatch.setattr(runtime, name, getattr(runtime, name))  # restored after the test
    operator_main.apply_settings(args, cli.storage_setting(args))
    assert ftj_controller.RUNTIME.settings.render.storage == SETTING
    assert adep_controller.RUNTIME.render.storage == SETTING
    assert (ftj_controller.RUNTIME.default_s3.endpoint, ftj_controller.RUNTIME.default_s3.region) == (
        SETTING.endpoint, "eu-west-3")
    pod = trainer_containers(silent_job(), ftj_controller.RUNTIME.settings.render)[0]
    assert values(pod)["AWS_ENDPOINT_URL"] == SETTING.endpoint
    children = serving_render.render_children(managed_adep(), adep_controller.RUNTIME.render,
                                              serving.DesiredState(generation=1), 16)
    assert {values(c)["AWS_ENDPOINT_URL"] for c in containers(children)} == {SETTING.endpoint}


def test_kubetune_render_shows_the_setting_and_refuses_a_malformed_one(tmp_path):
    job = finetunejob()
    del job["spec"]["output"]["endpoint"]
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(job))
    command = [sys.executable, "-m", "kubetune_operator.cli", "render", "-f", str(path), "-o", "json"]
    out = subprocess.run([*command, "--storage-endpoint", SETTING.endpoint], capture_output=True, text=True,
                         check=True, env={"PATH": "/usr/bin:/bin"})
    rendered = [c for c in containers(json.loads(out.stdout))]
    assert rendered and all(values(c)["AWS_ENDPOINT_URL"] == SETTING.endpoint for c in rendered)
    bad = subprocess.run([*command, "--storage-endpoint", "seaweedfs:8333"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--storage-endpoint 'seaweedfs:8333'" in bad.stderr

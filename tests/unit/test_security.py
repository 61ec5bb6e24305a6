"""Security of what kubetune runs and is granted (docs/security.md): every pod restricted (non-root, no
privilege escalation, all capabilities dropped, seccomp RuntimeDefault, read-only root filesystem with
emptyDirs where it writes), RBAC without wildcards and Secrets `get` only, and the per-namespace storage
limits (reconcile.tenancy) with the FineTuneJob/AdapterDeployment decisions that use them."""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from kubetune.api import jobconfig, serving
from kubetune.api.validation import validate
from kubetune_operator.backends import pytorchjob as pytorchjob_backend
from kubetune_operator.backends import render_children
from kubetune_operator.controllers.main import _allowed_storage
from kubetune_operator.reconcile import adapterdeployment as adp
from kubetune_operator.reconcile import conditions as cond
from kubetune_operator.reconcile import finetunejob as ftj
from kubetune_operator.reconcile import tenancy
from kubetune_operator.reconcile.finetunejob_plan import Plan
from kubetune_operator.render import serving as serving_render
from kubetune_operator.render import training as render
from kubetune_testing.factories import adapterdeployment, data_validated, finetunejob
from tests.unit.test_chart import find_helm

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"
NOW = "2026-11-28T12:00:00Z"

STAGES = {
    "train": jobconfig.Stage(kind=jobconfig.STAGE_TRAIN),
    "baseline": jobconfig.Stage(kind=jobconfig.STAGE_BASELINE),
    "sweep": jobconfig.Stage(kind=jobconfig.STAGE_SWEEP, holdout_fraction=0.1),
}
JOBS = {
    "multi-node": finetunejob(),
    "single-node-qlora": finetunejob(method={"type": "QLoRA", "quantization": {}, "lora": {"rank": 64}},
                                     distributed={"nodes": 1, "gpusPerNode": 1, "deepspeed": {"enabled": False}}),
    "credentials-everywhere": finetunejob(
        baseModel={"uri": "hf://org/model", "credentials": {"secretName": "hf"}},
        dataset={"uri": "s3://data/x.jsonl", "format": "chat", "s3": {"credentials": {"secretName": "data"}}},
        tracking={"mlflow": {"trackingUri": "https://mlflow.example.com", "credentials": {"secretName": "mlflow"}},
                  "wandb": {"project": "p", "credentials": {"secretName": "wandb"}}}),
}


def defaulted(doc: dict) -> dict:
    result = validate(doc)
    assert result.ok, result.errors
    result.defaulted["metadata"].setdefault("uid", "uid-1")
    return result.defaulted


def pod_specs_of_pytorchjob(pytorchjob: dict) -> dict[str, dict]:
    return {replica: spec["template"]["spec"]
            for replica, spec in pytorchjob["spec"]["pytorchReplicaSpecs"].items()}


def training_pods() -> dict[str, dict]:
    """Every trainer pod spec: each example job x each stage x each replica, and what `decide` creates for a
    baseline, a rank sweep and a plain run."""
    pods = {}
    for job_name, doc in JOBS.items():
        for stage_name, stage in STAGES.items():
            for child in render_children(defaulted(doc), render.RenderSettings(), stage):
                if child["kind"] == "PyTorchJob":
                    for replica, spec in pod_specs_of_pytorchjob(child).items():
                        pods[f"{job_name}/{stage_name}/{replica}"] = spec
    flows = {"baseline": data_validated(finetunejob(baseline={"target": {"metric": "eval_loss", "value": 1.0}})),
             "sweep": data_validated(finetunejob(rankSweep={"ranks": [4, 8], "parallelism": 2})),
             "plain": data_validated(finetunejob()),
             "data": finetunejob()}  # the CPU data stage, every job's first child
    for flow, doc in flows.items():
        plan = ftj.decide(ftj.Observed(job=copy.deepcopy(doc), now=NOW), ftj.Settings())
        created = [c for c in plan.create if c["kind"] == "PyTorchJob"]
        assert created, flow
        for child in created:
            for replica, spec in pod_specs_of_pytorchjob(child).items():
                pods[f"decide-{flow}/{child['metadata']['name']}/{replica}"] = spec
    return pods


def serving_pods() -> dict[str, dict]:
    adep = adapterdeployment()
    adep["spec"]["storage"] = {"endpoint": "http://s3:8333", "credentials": {"secretName": "s3"}}
    adep = defaulted(adep)
    desired = serving.DesiredState(generation=1)
    pods = {}
    for rank in (16, 64):
        for child in serving_render.render_children(adep, serving_render.ServingSettings(), desired, rank):
            if child["kind"] == "Deployment":
                pods[f"serving/r{rank}"] = child["spec"]["template"]["spec"]
    assert pods
    return pods


@pytest.fixture(scope="module")
def chart_docs() -> dict[str, list[dict]]:
    helm = find_helm()
    out = {}
    for name, args in {"default": [], "namespaced": ["--set", "watchNamespaces={team-a,team-b}"],
                       "everything": ["--set", "networkPolicy.enabled=true", "--set",
                                      "metrics.serviceMonitor.enabled=true", "--set",
                                      "argocd.healthChecks.configMap=true"]}.items():
        env = {**os.environ, "HELM_CACHE_HOME": "/tmp/kubetune-helm-cache", "HELM_CONFIG_HOME": "/tmp/kubetune-helm"}
        text = subprocess.run([helm, "template", "kt", str(CHART), "-n", "kubetune-system", *args],
                              capture_output=True, text=True, check=True, timeout=60, env=env).stdout
        out[name] = [d for d in yaml.safe_load_all(text) if d]
    return out


def assert_restricted(where: str, pod: dict, *, writable_root: tuple[str, ...] = ()) -> None:
    pod_sc = pod.get("securityContext") or {}
    assert pod.get("hostNetwork") is not True and pod.get("hostPID") is not True and pod.get("hostIPC") is not True
    containers = pod["containers"] + pod.get("initContainers", [])
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for c in containers:
        sc = c.get("securityContext") or {}
        name = f"{where}/{c['name']}"
        assert (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))) is True, name
        assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, name
        assert sc.get("allowPrivilegeEscalation") is False, name
        assert sc.get("privileged") is not True, name
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], name
        assert not sc.get("capabilities", {}).get("add"), name
        seccomp = sc.get("seccompProfile") or pod_sc.get("seccompProfile")
        assert seccomp == {"type": "RuntimeDefault"}, name
        if c["name"] in writable_root:
            assert sc.get("readOnlyRootFilesystem") is False, name
        else:
            assert sc.get("readOnlyRootFilesystem") is True, name
        # where it writes: emptyDirs (or the read-only job config / projected volumes)
        for mount in c.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            assert "hostPath" not in volume, f"{name}: hostPath {mount['name']}"
        assert any(m["mountPath"] == "/tmp" for m in c.get("volumeMounts", [])), f"{name}: no writable /tmp"


def test_every_trainer_pod_is_restricted_with_a_read_only_root():
    pods = training_pods()
    assert any("/baseline/" in k for k in pods) and any("-sweep/" in k for k in pods)
    assert any(k.endswith("/Worker") for k in pods)
    for where, pod in pods.items():
        assert_restricted(where, pod)
        assert pod["automountServiceAccountToken"] is False, where
        mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert {"/tmp", render.CACHE_DIR, "/dev/shm"} <= mounts, where


def test_serving_engine_and_agent_are_restricted_with_a_read_only_root():
    for where, pod in serving_pods().items():
        assert_restricted(where, pod)
        engine = next(c for c in pod["containers"] if c["name"] == "engine")
        env = {e["name"]: e.get("value") for e in engine["env"]}
        # every cache the engine writes is redirected to the /tmp emptyDir
        for var in ("HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "VLLM_CACHE_ROOT", "TRITON_CACHE_DIR",
                    "TORCHINDUCTOR_CACHE_DIR", "NUMBA_CACHE_DIR"):
            assert env[var].startswith("/tmp/"), var
        assert env["HF_HOME"].startswith(serving_render.MODEL_CACHE)
        assert env["VLLM_NO_USAGE_STATS"] == "1"


def test_no_secret_value_in_rendered_env_only_secret_key_refs():
    pods = {**training_pods(), **serving_pods()}
    secret_vars = {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", jobconfig.ENV_HF_TOKEN, jobconfig.ENV_MLFLOW_TOKEN,
                   jobconfig.ENV_WANDB_API_KEY, jobconfig.ENV_S3_ACCESS_KEY, jobconfig.ENV_S3_SECRET_KEY,
                   jobconfig.ENV_DATA_S3_ACCESS_KEY, jobconfig.ENV_DATA_S3_SECRET_KEY}
    seen = set()
    for where, pod in pods.items():
        for c in pod["containers"]:
            for e in c.get("env", []):
                if e["name"] in secret_vars:
                    seen.add(e["name"])
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"], f"{where}: {e['name']}"
            assert not c.get("envFrom"), where
    assert {jobconfig.ENV_HF_TOKEN, jobconfig.ENV_WANDB_API_KEY, "AWS_SECRET_ACCESS_KEY"} <= seen


@pytest.mark.parametrize("case", ["default", "namespaced", "everything"])
def test_chart_deployment_is_restricted(chart_docs, case):
    deployment = next(d for d in chart_docs[case] if d["kind"] == "Deployment")
    assert_restricted(f"chart/{case}", deployment["spec"]["template"]["spec"])


@pytest.mark.parametrize("case", ["default", "namespaced", "everything"])
def test_chart_rbac_has_no_wildcards_and_secrets_are_get_only(chart_docs, case):
    roles = [d for d in chart_docs[case] if d["kind"] in ("ClusterRole", "Role")]
    assert roles
    secret_rules = []
    for role in roles:
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                assert not any("*" in str(v) for v in rule.get(key, [])), f"{role['kind']} {key}: {rule}"
            if "" in rule["apiGroups"] and "secrets" in rule["resources"]:
                secret_rules.append(rule)
    assert secret_rules, "the operator reads the Secrets its objects name"
    for rule in secret_rules:
        assert rule["verbs"] == ["get"] and rule["resources"] == ["secrets"], rule
    assert not any(b.get("roleRef", {}).get("name") in ("cluster-admin", "admin", "edit")
                   for b in chart_docs[case] if b["kind"] in ("ClusterRoleBinding", "RoleBinding"))


def test_agent_rbac_has_no_wildcards_and_no_secrets():
    for child in serving_render.render_agent_rbac(defaulted(adapterdeployment())):
        for rule in child.get("rules", []):
            assert "*" not in str(rule) and "secrets" not in rule["resources"], rule


# --- tenancy: storage URIs per namespace ----------------------------------------------------------------

ALLOWED = {"team-a": ("s3://team-a/",), "team-b": ("s3://team-b",), "*": ("s3://shared/",)}


@pytest.mark.parametrize(("uri", "namespace", "ok"), [
    ("s3://team-a/data/x.jsonl", "team-a", True),
    ("s3://team-b/x", "team-a", False),
    ("s3://shared/base/", "team-a", True),  # "*" applies to every namespace
    ("s3://team-b", "team-b", True),  # a prefix without "/" matches itself ...
    ("s3://team-b/x", "team-b", True),
    ("s3://team-bb/x", "team-b", False),  # ... and at a path boundary only
    ("s3://team-a/../team-b/x", "team-a", False),  # no dot segments
    ("s3://team-a/./x", "team-a", False),
    ("s3://shared/x", "team-c", True),
    ("s3://team-c/x", "team-c", False),  # a namespace without entries: only "*"
    ("team-a/x", "team-a", False),
])
def test_uri_allowed(uri, namespace, ok):
    assert tenancy.uri_allowed(uri, namespace, ALLOWED) is ok


def test_no_configuration_means_no_limit():
    assert tenancy.uri_allowed("s3://anything/../x", "team-a", {})
    assert tenancy.finetunejob_refusals(finetunejob(), {}) == []


def test_a_namespace_without_prefixes_and_no_star_may_use_no_storage():
    assert not tenancy.uri_allowed("s3://team-a/x", "team-z", {"team-a": ("s3://team-a/",)})
    messages = tenancy.refusals([("spec.output.uri", "s3://x/")], "team-z", {"team-a": ("s3://team-a/",)})
    assert messages == ["spec.output.uri: s3://x/ is outside the storage prefixes namespace team-z may use (none)"]


def full_job(**overrides) -> dict:
    spec = {
        "baseModel": {"uri": "s3://team-a/models/llama"},
        "dataset": {"uri": "s3://team-a/data/train.jsonl", "validationUri": "s3://team-a/data/val.jsonl",
                    "format": "chat"},
        "output": {"uri": "s3://team-a/adapters", "credentials": {"secretName": "s3-creds"}},
        "evaluation": {"sets": [{"name": "golden", "uri": "s3://team-a/eval/golden.jsonl"}],
                       "reference": {"manifestUri": "s3://team-a/adapters/old/manifest.json"}},
    }
    spec.update(overrides)
    return finetunejob(**spec)


def test_every_storage_uri_of_a_finetunejob_is_checked():
    paths = [p for p, _ in tenancy.finetunejob_storage(full_job()["spec"])]
    assert paths == ["spec.baseModel.uri", "spec.dataset.uri", "spec.dataset.validationUri", "spec.output.uri",
                     "spec.evaluation.reference.manifestUri", "spec.evaluation.sets[0].uri"]
    assert tenancy.finetunejob_refusals(full_job(), ALLOWED) == []
    other = {"uri": "s3://team-b/eval.jsonl", "name": "theirs"}
    job = full_job(evaluation={"sets": [other], "reference": {"manifestUri": "s3://team-b/m.json"}})
    assert tenancy.finetunejob_refusals(job, ALLOWED) == [
        "spec.evaluation.reference.manifestUri: s3://team-b/m.json is outside the storage prefixes namespace "
        "team-a may use (s3://team-a/, s3://shared/)",
        "spec.evaluation.sets[0].uri: s3://team-b/eval.jsonl is outside the storage prefixes namespace team-a "
        "may use (s3://team-a/, s3://shared/)"]
    # hf:// models are not storage
    assert tenancy.finetunejob_storage(finetunejob()["spec"])[0][0] == "spec.dataset.uri"


def conditions_of(plan: Plan) -> dict:
    return {c["type"]: c for c in plan.status["conditions"]}


def test_finetunejob_with_foreign_storage_is_refused_and_nothing_is_created():
    job = full_job(dataset={"uri": "s3://team-b/data/train.jsonl", "format": "chat"})
    plan = ftj.decide(ftj.Observed(job=job, now=NOW), ftj.Settings(allowed_storage=ALLOWED))
    assert plan.create == []
    accepted = conditions_of(plan)["Accepted"]
    assert accepted["status"] == "False" and accepted["reason"] == "StorageNotAllowed"
    assert "spec.dataset.uri: s3://team-b/data/train.jsonl" in accepted["message"]
    assert "s3://team-a/" in accepted["message"]
    assert plan.status["phase"] == "Failed" and plan.status["failure"]["reason"] == "StorageNotAllowed"
    # allowed storage: created as usual; no configuration: as before
    for settings in (ftj.Settings(allowed_storage=ALLOWED), ftj.Settings()):
        ok = ftj.decide(ftj.Observed(job=full_job(), now=NOW), settings)
        assert [c["kind"] for c in ok.create] == ["ConfigMap", "PyTorchJob"]
        assert conditions_of(ok)["Accepted"]["status"] == "True"
    unlimited = ftj.decide(ftj.Observed(job=job, now=NOW), ftj.Settings())
    assert unlimited.create


def test_a_running_finetunejob_goes_on_when_its_storage_is_no_longer_allowed():
    job = full_job()
    first = ftj.decide(ftj.Observed(job=job, now=NOW), ftj.Settings())
    job = {**job, "status": first.status}
    config_map, pytorchjob = first.create
    plan = ftj.decide(ftj.Observed(job=job, now=NOW, config_map=config_map,
                                   workload=pytorchjob_backend.read_status(pytorchjob)),
                      ftj.Settings(allowed_storage={"team-a": ("s3://elsewhere/",)}))
    assert plan.create == [] and plan.status.get("phase") != "Failed"
    assert conditions_of(plan)["Accepted"]["reason"] == "StorageNotAllowed"


def test_adapterdeployment_storage_paths_and_refusal():
    adep = adapterdeployment()
    adep["spec"]["trafficSampling"] = {"rate": 0.1, "uri": "s3://team-b/samples/"}
    adep["spec"]["adapters"][0]["drift"] = {"retrain": {
        "labelledData": {"uri": "s3://team-a/labelled/"},
        "template": {"spec": {"output": {"uri": "s3://team-b/out"}}}}}
    paths = dict(tenancy.adapterdeployment_storage(adep["spec"]))
    assert paths == {"spec.trafficSampling.uri": "s3://team-b/samples/",
                     "spec.adapters[0].drift.retrain.labelledData.uri": "s3://team-a/labelled/",
                     "spec.adapters[0].drift.retrain.template.spec.output.uri": "s3://team-b/out"}
    refused = tenancy.adapterdeployment_refusals(adep, ALLOWED)
    assert [m.split(":")[0] for m in refused] == ["spec.trafficSampling.uri",
                                                  "spec.adapters[0].drift.retrain.template.spec.output.uri"]
    source = adp.Source(manifest_uri="s3://team-a/adapters/x/manifest.json", digest="sha256:" + "a" * 64, rank=8)
    problems = adp.preflight(adep, adep["spec"]["adapters"][0], source, adp.Settings(allowed_sources=ALLOWED), 16)
    assert problems and problems[0][0] == "StorageNotAllowed"
    assert adp.preflight(adep, adep["spec"]["adapters"][0], source, adp.Settings(), 16) == []


def test_adapterdeployment_refused_storage_is_validated_false():
    adep = defaulted(adapterdeployment())
    adep["spec"]["trafficSampling"] = {"rate": 0.1, "uri": "s3://team-b/samples/"}
    adep["metadata"]["generation"] = 1
    source = adp.Source(manifest_uri="s3://team-a/adapters/x/manifest.json", digest="sha256:" + "a" * 64, rank=8)
    plan = adp.decide(adp.Observed(adep=adep, now=NOW, sources={"support-bot": source}, pods=[]),
                      adp.Settings(allowed_sources=ALLOWED))
    validated = cond.find(plan.status["conditions"], "Validated")
    assert validated["status"] == "False" and validated["reason"] == "StorageNotAllowed"
    assert plan.desired is None or plan.desired.adapters == []


def test_allowed_storage_flag_parsing_and_alias():
    assert _allowed_storage(["team-a=s3://a/", "*=s3://shared/", "team-a=s3://a2/", "team-a=s3://a/"]) == {
        "team-a": ("s3://a/", "s3://a2/"), "*": ("s3://shared/",)}
    with pytest.raises(SystemExit):
        _allowed_storage(["team-a"])
    with pytest.raises(SystemExit):
        _allowed_storage(["team-a=bucket"])
    from kubetune_operator.cli import build_parser
    parser = build_parser()
    args = parser.parse_args(["operator", "-A", "--allowed-source", "a=s3://a/", "--allowed-storage", "b=s3://bucket/"])
    assert args.allowed_storage == ["a=s3://a/", "b=s3://bucket/"]


def test_chart_renders_allowed_storage_flags(chart_docs):
    helm = find_helm()
    text = subprocess.run([helm, "template", "kt", str(CHART), "-n", "kubetune-system",
                           "--set", "tenancy.allowedStorage.team-a={s3://team-a/,s3://shared/}",
                           "--set", "serving.allowedSources.team-b={s3://team-b/}"],
                          capture_output=True, text=True, check=True, timeout=60).stdout
    deployment = next(d for d in yaml.safe_load_all(text) if d and d["kind"] == "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    pairs = [args[i + 1] for i, a in enumerate(args) if a == "--allowed-storage"]
    assert pairs == ["team-a=s3://team-a/", "team-a=s3://shared/", "team-b=s3://team-b/"]

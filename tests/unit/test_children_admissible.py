"""Every child kubetune renders passes the API server's validation (testing/kubetune_testing/object_meta):
for every example (through `kubetune render`, i.e. `ftj.decide`), every stage of accepted but edgy specs on
both backends, and AdapterDeployments; a spec whose child would be refused must be refused at admission."""

from __future__ import annotations

import json

import pytest
import yaml

from kubetune.api import jobconfig, k8s_values, serving
from kubetune.api.validation import validate
from kubetune_operator import backends, cli
from kubetune_operator.render import serving as serving_render
from kubetune_operator.render import training as render
from kubetune_testing import factories
from kubetune_testing import object_meta as om
from tests.conftest import REPO_ROOT

EXAMPLES = sorted(p.name for p in (REPO_ROOT / "examples").glob("*.yaml") if p.name != "secrets.yaml")
SETTINGS = render.RenderSettings(trainer_image="ghcr.io/kubetune/trainer:1.0")
STAGES = [jobconfig.Stage(kind=jobconfig.STAGE_DATA), jobconfig.Stage(kind=jobconfig.STAGE_BASELINE),
          jobconfig.Stage(kind=jobconfig.STAGE_SWEEP, holdout_fraction=0.1),
          jobconfig.Stage()]


def refusals(child: dict) -> list[str]:
    """What the API server (and the Kubeflow workload's own admission, and the training operator creating
    its pods and per-replica Services) would refuse of `child`."""
    group, kind = child["apiVersion"].rpartition("/")[0], child["kind"]
    found = [str(e) for e in om.errors(group, kind, child)]
    denial = om.workload_refusal(group, kind, child)
    found += [denial["message"]] if denial else []
    name = child["metadata"].get("name", "")
    for replica_type, replica in ((child.get("spec") or {}).get("pytorchReplicaSpecs") or {}).items():
        path = f"spec.pytorchReplicaSpecs[{replica_type}].template"
        found += [str(e) for e in om.pod_template(replica["template"], path)]
        for index in range(replica.get("replicas", 1)):  # training-operator GenGeneralName: <job>-<type>-<i>
            service = f"{name}-{replica_type.lower()}-{index}"
            found += [f"Service {service}: {m}" for m in k8s_values.dns1035_label(service)]
    trainer = (child.get("spec") or {}).get("trainer")
    if kind == "TrainJob" and trainer:
        container = {"name": "node", "image": trainer.get("image", "runtime's"), "env": trainer.get("env"),
                     "resources": trainer.get("resourcesPerNode")}
        found += [str(e) for e in om.pod_spec({"containers": [container]}, "spec.trainer")]
    return found


def assert_admissible(children: list[dict]) -> None:
    assert children
    refused = {f"{c['kind']}/{c['metadata'].get('name')}": refusals(c) for c in children}
    assert {k: v for k, v in refused.items() if v} == {}


@pytest.mark.parametrize("example", EXAMPLES)
def test_every_examples_children_are_admissible(example, capsys):
    assert cli.main(["render", "-f", str(REPO_ROOT / "examples" / example), "-o", "json"]) == 0
    assert_admissible(json.loads(capsys.readouterr().out))


def finetunejob(name: str, **spec) -> dict:
    doc = factories.finetunejob(**spec)
    doc["metadata"]["name"] = name
    return doc


def _many_labels() -> dict:
    doc = finetunejob("labelled")
    doc["metadata"]["labels"] = {f"team.example.com/key-{i}": "v" * 63 for i in range(40)}
    doc["metadata"]["annotations"] = {"example.com/note": "n" * 200_000}
    return doc


CLASSIFIER = {"task": "SequenceClassification", "dataset": {"uri": "s3://data/t.jsonl", "format": "text-label"}}
EDGY_JOBS = {
    "longest name": finetunejob("a" * 45),
    "digits": finetunejob("j0b-2024-v3"),
    "longest name, TrainJob backend": finetunejob("t" * 44 + "9", backend="TrainJob"),
    "many labels and a large annotation": _many_labels(),
    "sweep with a three-digit rank": finetunejob("s" * 45, rankSweep={"ranks": [8, 256]}, **CLASSIFIER),
    "queue and scheduling": finetunejob("queued", scheduling={"priorityClassName": "team-a.high-priority",
                                                              "nodeSelector": {"cloud.example.com/pool": "a100"}}),
}


@pytest.mark.parametrize("backend", ["PyTorchJob", "TrainJob"])
@pytest.mark.parametrize("case", list(EDGY_JOBS))
def test_every_stage_of_an_accepted_edgy_job_is_admissible(case, backend):
    doc = EDGY_JOBS[case]
    doc = {**doc, "spec": {**doc["spec"], "backend": backend}}
    result = validate(doc)
    if not result.ok:
        pytest.skip(f"refused at admission: {result.errors[0]}")
    job = {**doc, "spec": result.defaulted["spec"]}
    for stage in STAGES:
        assert_admissible(backends.render_children(job, SETTINGS, stage))


def adapterdeployment(name: str) -> dict:
    doc = factories.adapterdeployment()
    doc["metadata"].update(name=name, uid="5d2c-uid")
    return doc


def serving_children(doc: dict) -> list[dict]:
    adep = {**doc, "spec": validate(doc).defaulted["spec"]}
    long_adapter = "adapter-" + "x" * 200
    version = serving.Version(name=serving.version_name("team-a", long_adapter, "sha256:" + "b" * 64),
                              digest="sha256:" + "b" * 64, manifest_uri="s3://adapters/m.json", weight=100)
    desired = serving.DesiredState(generation=3, adapters=[serving.AliasState(
        alias=serving.alias_name("team-a", long_adapter), versions=[version])])
    settings = serving_render.ServingSettings()
    return [*serving_render.render_children(adep, settings, desired, 64),
            serving_render.render_desired_config_map(adep, desired, target="ml-platform")]


@pytest.mark.parametrize("name", ["support", "a" * 63, "s3rv-1"])
def test_an_accepted_adapterdeployments_children_are_admissible(name):
    doc = adapterdeployment(name)
    assert validate(doc).ok
    assert_admissible(serving_children(doc))


# The Service is named after the AdapterDeployment (a DNS-1035 label) and every child's labels carry its name
# (63 characters): admission refuses such names before any child exists.
@pytest.mark.parametrize("name", ["a" * 64, "1abc", "a.b"])
def test_an_adapterdeployment_whose_children_would_be_refused_is_refused(name):
    doc = adapterdeployment(name)
    assert not validate(doc).ok


def test_the_refusals_check_catches_what_the_training_operator_would_refuse():
    job = yaml.safe_load((REPO_ROOT / "examples" / "finetunejob-cpu-tiny.yaml").read_text())
    job = {**job, "metadata": {**job["metadata"], "uid": "u"}, "spec": validate(job).defaulted["spec"]}
    child = backends.render_children(job, SETTINGS)[1]
    child["metadata"]["name"] = "9" + "x" * 59
    child["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"].append({"name": "A=B"})
    found = refusals(child)
    assert any("should match" in f for f in found)
    assert any(f.startswith(f"Service 9{'x' * 59}-master-0: must be no more than 63") for f in found)
    assert any(".env[" in f and "printable ASCII" in f for f in found)

"""The TrainJob backend: every stage's TrainJob validates against Kubeflow Trainer's CRD, carries the
PyTorchJob backend's pod, and its status reads into the neutral view."""

from __future__ import annotations

import functools

import cel
import jsonschema
import kubernetes_validate
import pytest
import yaml

from kubetune.api import jobconfig
from kubetune.api.schema import iter_rules, strict_json_schema
from kubetune.api.validation import validate
from kubetune_operator.backends import BACKENDS, kueue, pytorchjob, render_children, trainjob
from kubetune_operator.backends.workload import CREATED, FAILED, RUNNING, SUCCEEDED
from kubetune_operator.render import training as render
from kubetune_testing import trainer_v2
from kubetune_testing.factories import finetunejob
from tests.conftest import SHARED

SETTINGS = render.RenderSettings(trainer_image="registry.local/kubetune/trainer:test")
SCHEMA_FILE = "schemas/trainer.kubeflow.org_trainjobs.yaml"
SCHEMA_SOURCE = "github.com/kubeflow/trainer commit 8c0f505, manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml"
STAGES = [jobconfig.Stage(), jobconfig.Stage(kind=jobconfig.STAGE_DATA),
          jobconfig.Stage(kind=jobconfig.STAGE_BASELINE), jobconfig.Stage(kind=jobconfig.STAGE_SWEEP)]
EXAMPLES = {
    "lora-2x8": finetunejob(backend="TrainJob"),
    "cpu": finetunejob(backend="TrainJob", trainingRuntime="torch-cpu",
                       distributed={"nodes": 1, "gpusPerNode": 0, "processesPerNode": 2,
                                    "deepspeed": {"enabled": False}}, training={"epochs": 1, "precision": "FP32"}),
    "scheduled": finetunejob(
        backend="TrainJob", serviceAccountName="trainer",
        scheduling={"nodeSelector": {"gpu": "h100"}, "tolerations": [{"key": "gpu", "operator": "Exists"}],
                    "queueName": "team-a"},
        runPolicy={"activeDeadlineSeconds": 3600, "suspend": True},
        resources={"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"memory": "64Gi"}},
        baseModel={"uri": "hf://org/model", "credentials": {"secretName": "hf"}}),
}


@functools.cache
def trainjob_crd_version() -> dict:
    path = SHARED / SCHEMA_FILE
    if not path.exists():
        pytest.fail(f"{path} not found: the TrainJob CRD ({SCHEMA_SOURCE}) is read in place from ../shared "
                    f"(or set KUBETUNE_SHARED)")
    crd = yaml.safe_load(path.read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")


def schema_errors(document: dict) -> list[str]:
    """Structural errors (unknown fields included) and the CRD's CEL rules, as the API server checks them."""
    schema = trainjob_crd_version()["schema"]["openAPIV3Schema"]
    strict = strict_json_schema(schema)
    strict["properties"]["metadata"] = {"type": "object"}
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in jsonschema.Draft4Validator(strict).iter_errors(document)]
    for path, entry, value in iter_rules(schema, document):
        program = cel.compile(entry["rule"])
        if "oldSelf" not in program.variables() and program.execute({"self": value}) is not True:
            errors.append(f"{path}: {entry['message']}")
    return errors


def children(doc: dict, stage: jobconfig.Stage | None = None) -> tuple[dict, dict]:
    result = validate(doc)
    assert result.ok, result.errors
    return render_children(result.defaulted, SETTINGS, stage)


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.kind)
@pytest.mark.parametrize("name", EXAMPLES)
def test_every_stages_trainjob_matches_the_trainer_v2_crd(name, stage):
    _, workload = children(EXAMPLES[name], stage)
    assert workload["kind"] == "TrainJob" and workload["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert schema_errors(workload) == []
    assert workload["metadata"]["name"] == render.stage_job_name("llama-lora", stage)


def test_the_schema_check_catches_what_the_api_server_refuses():
    _, workload = children(EXAMPLES["lora-2x8"])
    workload["spec"]["trainer"]["numProcPerNode"] = 0
    workload["spec"]["trainer"]["gpus"] = 8
    errors = schema_errors(workload)
    assert any("numProcPerNode must be greater than or equal to 1" in e for e in errors)
    assert any("gpus" in e for e in errors)


@pytest.mark.parametrize("name", EXAMPLES)
def test_the_node_pod_is_the_pytorchjob_backends_pod(name):
    doc = {**EXAMPLES[name], "spec": {k: v for k, v in EXAMPLES[name]["spec"].items()
                                      if k not in ("backend", "trainingRuntime")}}
    _, reference = children(doc)
    _, workload = children(EXAMPLES[name])
    expected = reference["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    pod = trainer_v2.node_pod(workload)
    container, want = pod["spec"]["containers"][0], expected["spec"]["containers"][0]
    for key in ("image", "command", "env", "volumeMounts", "securityContext"):
        assert container[key] == want[key], key
    assert container.get("resources", {}) == want["resources"]
    for key in ("volumes", "securityContext", "nodeSelector", "tolerations", "serviceAccountName"):
        assert pod["spec"].get(key) == expected["spec"].get(key), key
    assert pod["metadata"]["labels"] == expected["metadata"]["labels"]
    assert workload["metadata"]["ownerReferences"] == reference["metadata"]["ownerReferences"]
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", **pod["metadata"]},
                                  "spec": pod["spec"]}, "1.34", strict=True)


def test_nodes_processes_runtime_and_the_data_stage_on_one_cpu_process():
    _, train = children(EXAMPLES["lora-2x8"])
    assert train["spec"]["trainer"]["numNodes"] == 2 and train["spec"]["trainer"]["numProcPerNode"] == 8
    assert train["spec"]["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 8
    assert train["spec"]["runtimeRef"] == {"name": "torch-distributed", "apiGroup": "trainer.kubeflow.org",
                                           "kind": "ClusterTrainingRuntime"}
    _, data = children(EXAMPLES["lora-2x8"], jobconfig.Stage(kind=jobconfig.STAGE_DATA))
    assert (data["spec"]["trainer"]["numNodes"], data["spec"]["trainer"]["numProcPerNode"]) == (1, 1)
    assert "nvidia.com/gpu" not in str(data["spec"]["trainer"]["resourcesPerNode"])
    _, cpu = children(EXAMPLES["cpu"])
    assert cpu["spec"]["runtimeRef"]["name"] == "torch-cpu" and cpu["spec"]["trainer"]["numProcPerNode"] == 2


def test_a_kueue_queue_creates_it_suspended_and_labelled():
    _, queued = children(finetunejob(backend="TrainJob", scheduling={"queueName": "team-a"}))
    assert queued["spec"]["suspend"] is True
    assert queued["metadata"]["labels"][kueue.LABEL_QUEUE] == "team-a"
    _, plain = children(finetunejob(backend="TrainJob"))
    assert plain["spec"]["suspend"] is False and kueue.LABEL_QUEUE not in plain["metadata"]["labels"]
    _, scheduled = children(EXAMPLES["scheduled"])
    assert scheduled["spec"]["activeDeadlineSeconds"] == 3600


def test_pytorchjob_only_settings_are_refused_for_a_trainjob_by_name():
    for spec, field in (({"scheduling": {"priorityClassName": "batch"}}, "scheduling.priorityClassName"),
                        ({"runPolicy": {"ttlSecondsAfterFinished": 60}}, "runPolicy.ttlSecondsAfterFinished")):
        result = validate(finetunejob(backend="TrainJob", **spec))
        assert not result.ok and any(e.path.endswith(field) for e in result.errors), result.errors
        assert validate(finetunejob(**spec)).ok
    result = validate(finetunejob(trainingRuntime="torch-distributed"))
    assert any(e.path.endswith("trainingRuntime") for e in result.errors), result.errors


def _tj(*conditions: tuple[str, str], suspend: bool = False, jobs: dict | None = None) -> dict:
    return {"metadata": {"name": "j", "uid": "u-1", "labels": {render.LABEL_STAGE: "trial"},
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"suspend": suspend},
            "status": {"conditions": [{"type": t, "status": s, "reason": f"R{t}", "message": f"m {t}",
                                       "lastTransitionTime": f"2026-01-01T00:0{i}:00Z"}
                                      for i, (t, s) in enumerate(conditions, 1)],
                       "jobsStatus": [{"name": "node", **jobs}] if jobs else []}}


def test_trainjob_status_reads_into_the_neutral_view():
    created = trainjob.read_status(_tj())
    assert (created.phase, created.started, created.start_time, created.kind) == (CREATED, False, None, "TrainJob")
    assert created.uid == "u-1"  # Kueue's Workload is found by it
    running = trainjob.read_status(_tj(jobs={"active": 1, "ready": 1}))
    assert (running.phase, running.started, running.start_time) == (RUNNING, True, "2026-01-01T00:00:00Z")
    assert running.replicas == {"node": {"active": 1, "succeeded": 0, "failed": 0}} and running.attempts == 1
    complete = trainjob.read_status(_tj(("Complete", "True"), jobs={"succeeded": 1}))
    assert (complete.phase, complete.reason, complete.completion_time) == (SUCCEEDED, "RComplete",
                                                                            "2026-01-01T00:01:00Z")
    failed = trainjob.read_status(_tj(("Complete", "True"), ("Failed", "True"), jobs={"failed": 1}))
    assert (failed.phase, failed.message, failed.finished) == (FAILED, "m Failed", True)
    refused = trainjob.read_status(_tj(("Failed", "True")))  # never ran: unsupported runtime
    assert refused.phase == FAILED and refused.started
    suspended = trainjob.read_status(_tj(("Suspended", "True"), suspend=True, jobs={"active": 1}))
    assert (suspended.phase, suspended.suspended, suspended.reason) == (CREATED, True, "RSuspended")
    resumed = trainjob.read_status(_tj(("Suspended", "False"), jobs={"active": 1}))
    assert (resumed.phase, resumed.start_time) == (RUNNING, "2026-01-01T00:01:00Z")  # the deadline restarts


def test_suspend_patch_local_launch_and_the_registry():
    assert trainjob.suspend_patch(True) == {"spec": {"suspend": True}}
    job = validate(finetunejob(backend="TrainJob", distributed={"nodes": 2, "gpusPerNode": 0, "processesPerNode": 2,
                                                                "deepspeed": {"enabled": False}})).defaulted
    _, workload = render_children(job, SETTINGS)
    launch = trainjob.local_launch(workload)
    assert launch.processes == 4 and launch.backoff_limit == trainjob.JOB_BACKOFF_LIMIT and launch.replica == "node"
    assert launch.command == pytorchjob.local_launch(pytorchjob.render_pytorchjob(job, SETTINGS)).command
    assert launch.config_map == render.config_map_name(job["metadata"]["name"])
    assert BACKENDS["TrainJob"] is trainjob.BACKEND and trainjob.BACKEND.api_resource[2] == "trainjobs"


def test_the_stand_in_refuses_what_kubeflow_trainer_refuses():
    _, workload = children(EXAMPLES["lora-2x8"])
    assert trainer_v2.refusal(workload) is None
    _, cpu = children(EXAMPLES["cpu"])
    assert trainer_v2.refusal(cpu) == 'ClusterTrainingRuntime.trainer.kubeflow.org "torch-cpu" not found'
    workload["spec"]["trainer"]["env"].append({"name": "PET_NNODES", "value": "3"})
    assert "reserved envs" in trainer_v2.refusal(workload) and "PET_NNODES" in trainer_v2.refusal(workload)
    env = dict(trainer_v2.torch_env(workload, 1, 29500))
    assert env == {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "8", "PET_NODE_RANK": "1",
                   "PET_MASTER_ADDR": trainer_v2.LOOPBACK, "PET_MASTER_PORT": "29500"}

"""Training backends: the registry matches the API, and the PyTorchJob backend reads its workload."""

from __future__ import annotations

import json

from kubetune.api import jobconfig
from kubetune.api import v1alpha1 as api
from kubetune.api.validation import validate
from kubetune_operator.backends import BACKENDS, backend_for_kind, backend_of, pytorchjob, render_children
from kubetune_operator.backends.workload import CREATED, FAILED, RESTARTING, RUNNING, SUCCEEDED
from kubetune_operator.render import training as render
from kubetune_testing.factories import finetunejob


def test_the_api_enum_names_exactly_the_registered_backends():
    assert list(api.FINETUNEJOB_SPEC["properties"]["backend"]["enum"]) == list(BACKENDS)
    assert api.FINETUNEJOB_SPEC["properties"]["backend"]["default"] in BACKENDS


def test_every_backend_is_found_by_its_spec_value_and_its_kind():
    for value, backend in BACKENDS.items():
        assert backend_of({"spec": {"backend": value}}) is backend
        assert backend_for_kind(backend.kind) is backend
    assert backend_of({"spec": {}}) is BACKENDS["PyTorchJob"]


def test_render_children_is_the_config_map_then_the_backends_workload():
    job = validate(finetunejob()).defaulted
    config_map, workload = render_children(job, render.RenderSettings())
    assert config_map["kind"] == "ConfigMap" and workload["kind"] == "PyTorchJob"
    assert workload["apiVersion"] == pytorchjob.API_VERSION
    assert workload["metadata"]["name"] == render.workload_name(job["metadata"]["name"])


def _pj(*conditions: tuple[str, str], **status) -> dict:
    return {"metadata": {"name": "j", "labels": {render.LABEL_STAGE: jobconfig.STAGE_SWEEP}},
            "spec": {"runPolicy": {"suspend": status.pop("suspend", False)}},
            "status": {"conditions": [{"type": t, "status": s, "reason": f"R{t}", "message": f"m {t}",
                                       "lastTransitionTime": "2026-01-01T00:00:00Z"} for t, s in conditions],
                       **status}}


def test_pytorchjob_status_reads_into_the_neutral_view():
    assert pytorchjob.read_status(_pj(("Created", "True"))).phase == CREATED
    assert not pytorchjob.read_status(_pj(("Created", "True"))).started
    running = pytorchjob.read_status(_pj(("Created", "True"), ("Running", "True"), startTime="2026-01-01T00:00:01Z"))
    assert (running.phase, running.message, running.start_time, running.started) == (
        RUNNING, "m Running", "2026-01-01T00:00:01Z", True)
    restarting = pytorchjob.read_status(_pj(("Running", "True"), ("Restarting", "True")))
    assert restarting.phase == RESTARTING
    # a condition listed as False once held: the pods started
    assert pytorchjob.read_status(_pj(("Running", "False"))).started
    failed = pytorchjob.read_status(_pj(("Succeeded", "True"), ("Failed", "True")))
    assert (failed.phase, failed.reason, failed.finished) == (FAILED, "RFailed", True)
    assert pytorchjob.read_status(_pj(("Succeeded", "True"))).phase == SUCCEEDED
    view = pytorchjob.read_status(_pj(suspend=True, replicaStatuses={"Master": {"active": 1, "failed": 2},
                                                                     "Worker": {"active": 1}}))
    assert view.suspended and view.attempts == 3 and view.labels == {render.LABEL_STAGE: jobconfig.STAGE_SWEEP}
    assert view.replicas["Worker"] == {"active": 1, "succeeded": 0, "failed": 0}


def test_pytorchjob_suspend_patch_and_local_launch():
    assert pytorchjob.suspend_patch(True) == {"spec": {"runPolicy": {"suspend": True}}}
    job = validate(finetunejob(distributed={"nodes": 2, "gpusPerNode": 0, "processesPerNode": 2,
                                            "deepspeed": {"enabled": False}},
                               runPolicy={"backoffLimit": 2})).defaulted
    _, workload = render_children(job, render.RenderSettings())
    launch = pytorchjob.local_launch(workload)
    assert launch.processes == 4 and launch.backoff_limit == 2
    assert launch.command[:2] == ["python", "-m"] and "--config" in launch.command
    assert launch.config_map == render.config_map_name(job["metadata"]["name"])


def test_the_backend_choice_stays_out_of_the_trainers_job_config():
    job = validate(finetunejob()).defaulted
    assert job["spec"]["backend"] == "PyTorchJob"
    config_map, _ = render_children(job, render.RenderSettings())
    assert "backend" not in json.loads(config_map["data"][jobconfig.CONFIG_FILE])["spec"]

"""One FineTuneJob pass (shell.run_pass) over an in-memory port: what it reads, when, and what it applies."""

from __future__ import annotations

import asyncio
import copy

from kubetune.api.manifest import ManifestCheck
from kubetune_operator.backends import pytorchjob
from kubetune_operator.reconcile import finetunejob as ftj
from kubetune_operator.reconcile.finetunejob_plan import StageReport
from kubetune_operator.shell import finetunejob as shell
from kubetune_testing.factories import data_result, data_validated, finetunejob

NOW = "2026-11-28T12:00:00Z"


class MemoryPort:
    """A port whose world is a few dicts; it records every call."""

    def __init__(self, job: dict | None):
        self.job = job
        self.config_maps: list[dict] = []
        self.workloads: list[dict] = []
        self.calls: list[tuple] = []
        self.reports: dict[str, StageReport] = {}  # stage prefix -> what its trainer left

    async def read_job(self):
        return copy.deepcopy(self.job)

    async def list_config_maps(self, job):
        return self.config_maps

    async def list_workloads(self, job):
        return [shell.Workload(w["metadata"], pytorchjob.read_status(w)) for w in self.workloads]

    async def check_manifest(self, job_prefix):
        self.calls.append(("manifest", job_prefix))
        return ManifestCheck(found=False)

    async def read_progress(self, prefix):
        self.calls.append(("progress", prefix))
        return None

    async def read_stage_report(self, prefix):
        self.calls.append(("stage", prefix))
        return self.reports.get(prefix)

    async def secret_keys(self, names, output):
        self.calls.append(("secrets", tuple(names)))
        return {name: frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}) for name in names}

    async def create_child(self, child):
        self.calls.append(("create", child["kind"], child["metadata"]["name"]))
        (self.config_maps if child["kind"] == "ConfigMap" else self.workloads).append(copy.deepcopy(child))

    async def patch_child(self, kind, name, patch):
        self.calls.append(("patch", kind, name, patch))

    async def write_status(self, job, status):
        self.calls.append(("status", status.get("phase")))
        self.job = {**job, "status": status}

    async def post_event(self, job, event):
        self.calls.append(("event", event.reason))


def run_pass(port: MemoryPort, now: str = NOW):
    return asyncio.run(shell.run_pass(port, ftj.Settings(), now))


def kinds(port: MemoryPort) -> list[str]:
    return [call[0] for call in port.calls]


def test_a_gone_job_is_no_pass():
    port = MemoryPort(None)
    assert run_pass(port) is None and port.calls == []


def test_a_new_job_reads_its_secrets_creates_its_children_then_writes_status_then_events():
    job = finetunejob()
    job["metadata"]["uid"] = "uid-1"
    port = MemoryPort(job)
    plan = run_pass(port)
    assert plan.status["phase"] == "Validating"
    assert kinds(port) == ["secrets", "create", "create", "status", "event", "event"]
    assert [c[2] for c in port.calls if c[0] == "create"] == ["llama-lora-data-config", "llama-lora-data"]
    assert "manifest" not in kinds(port) and "progress" not in kinds(port)


def test_the_data_stages_report_is_read_once_it_finished_then_training_is_created():
    job = finetunejob()
    job["metadata"]["uid"] = "uid-1"
    port = MemoryPort(job)
    run_pass(port)
    port.calls.clear()
    run_pass(port)
    assert "stage" not in kinds(port)  # still running: nothing to read
    prefix = ftj.job_prefix(port.job) + "data/"
    port.reports[prefix] = StageReport(result=data_result(port.job))
    port.workloads[0]["status"] = {"conditions": [{"type": "Succeeded", "status": "True"}]}
    port.calls.clear()
    plan = run_pass(port)
    assert ("stage", prefix) in port.calls
    assert plan.status["data"]["state"] == "Succeeded" and plan.status["phase"] == "Pending"
    assert [c[2] for c in port.calls if c[0] == "create"] == ["llama-lora-config", "llama-lora"]


def test_a_running_job_reads_progress_and_a_suspend_becomes_the_backends_patch():
    job = data_validated(finetunejob())
    job["metadata"]["uid"] = "uid-1"
    port = MemoryPort(job)
    run_pass(port)
    port.workloads[0]["status"] = {"conditions": [{"type": "Running", "status": "True"}]}
    port.job["spec"]["runPolicy"] = {"suspend": True}
    port.calls.clear()
    run_pass(port)
    assert kinds(port)[:1] == ["progress"] and "secrets" in kinds(port)
    assert ("patch", "PyTorchJob", "llama-lora", pytorchjob.suspend_patch(True)) in port.calls


def test_a_succeeded_job_checks_its_manifest():
    job = data_validated(finetunejob())
    job["metadata"]["uid"] = "uid-1"
    port = MemoryPort(job)
    run_pass(port)
    port.workloads[0]["status"] = {"conditions": [{"type": "Succeeded", "status": "True"}]}
    port.calls.clear()
    assert run_pass(port).status["phase"] == "Publishing"
    assert "manifest" in kinds(port)


def test_children_of_another_owner_are_not_stage_jobs():
    job = data_validated(finetunejob(rankSweep={"ranks": [4, 8]}))
    job["metadata"]["uid"] = "uid-1"
    port = MemoryPort(job)
    run_pass(port)
    trials = [w for w in port.workloads if w["metadata"]["name"] != "llama-lora"]
    assert trials, port.calls
    for trial in trials:
        trial["metadata"]["ownerReferences"] = [{"uid": "someone-else"}]
        trial["status"] = {"conditions": [{"type": "Succeeded", "status": "True"}]}
    observed = asyncio.run(shell.observe(port, port.job, NOW))
    assert observed.stage_jobs == {} and observed.stage_config_maps

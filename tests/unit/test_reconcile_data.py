"""The data stage: rendered CPU-only, first of every FineTuneJob's children, gating every GPU workload."""

from __future__ import annotations

import copy

from kubetune.api import jobconfig
from kubetune_operator.backends import kueue
from kubetune_operator.backends import pytorchjob as pytorchjob_backend
from kubetune_operator.reconcile import conditions as cond
from kubetune_operator.reconcile import data_report
from kubetune_operator.reconcile import finetunejob as ftj
from kubetune_operator.reconcile.finetunejob_plan import StageReport
from kubetune_operator.render import training as render
from kubetune_testing.factories import DATA_REPORT, data_result, data_validated, finetunejob

NOW = "2026-11-28T12:00:00Z"
SETTINGS = ftj.Settings(publish_timeout_seconds=600)
DATA_JOB = "llama-lora-data"
BASELINE = {"enabled": True, "target": {"metric": "eval_loss", "value": 1.0}, "forceTraining": False}
SWEEP = {"ranks": [8, 16], "holdoutFraction": 0.1, "epochs": 1, "metric": "eval_loss", "parallelism": 2,
         "alpha": "Proportional", "tieTolerance": 0}


def data_workload(*conditions, labels=True, suspend=False):
    meta = {"name": DATA_JOB, "labels": {render.LABEL_STAGE: jobconfig.STAGE_DATA} if labels else {}}
    status = {"conditions": [{"type": t, "status": "True", "reason": r, "message": m,
                              "lastTransitionTime": "2026-11-28T11:30:00Z"} for t, r, m in conditions],
              "startTime": "2026-11-28T11:00:00Z"}
    return pytorchjob_backend.read_status({"metadata": meta, "spec": {"runPolicy": {"suspend": suspend}},
                                           "status": status})


SUCCEEDED = ("Succeeded", "PyTorchJobSucceeded", "done")
FAILED = ("Failed", "PyTorchJobFailed", "1 Master replica(s) failed")


def step(job, workload=None, report=None, stage_config_maps=frozenset({f"{DATA_JOB}-config"})):
    stage_jobs = {DATA_JOB: workload} if workload is not None else {}
    reports = {DATA_JOB: report} if report is not None else {}
    plan = ftj.decide(ftj.Observed(job=job, now=NOW, stage_jobs=stage_jobs, stage_reports=reports,
                                   stage_config_maps=stage_config_maps), SETTINGS)
    after = copy.deepcopy(job)
    after["status"] = plan.status
    return plan, after


def condition(job, kind):
    return cond.find(job["status"].get("conditions"), kind) or {}


def launched(**spec):
    return step(finetunejob(**spec), stage_config_maps=frozenset())


def test_every_job_starts_with_the_cpu_data_stage_only():
    for spec in ({}, {"baseline": BASELINE}, {"rankSweep": SWEEP}):
        plan, job = launched(**spec)
        assert [c["metadata"]["name"] for c in plan.create] == [f"{DATA_JOB}-config", DATA_JOB], spec
        assert job["status"]["phase"] == "Validating"
        assert job["status"]["data"] == {"job": DATA_JOB, "state": "Pending"}
        assert "trainingJob" not in job["status"] and "baseline" not in job["status"]
        assert [e.reason for e in plan.events] == ["DataStageStarted", "Validating"]
        stage = jobconfig.JobConfig.from_json(plan.create[0]["data"][jobconfig.CONFIG_FILE]).stage
        assert stage.kind == jobconfig.STAGE_DATA


def test_nothing_on_a_gpu_while_the_data_stage_runs():
    _, job = launched(baseline=BASELINE)
    running = data_workload(("Running", "PyTorchJobRunning", "running"))
    for workload in (data_workload(), running, running):
        plan, job = step(job, workload)
        assert plan.create == []
        assert job["status"]["phase"] == "Validating"
    assert job["status"]["data"]["state"] == "Running"


def test_success_fills_status_data_and_starts_the_next_stage():
    _, job = launched(baseline=BASELINE)
    plan, job = step(job, data_workload(SUCCEEDED), StageReport(result=data_result(job)))
    assert job["status"]["data"] == {"job": DATA_JOB, "state": "Succeeded", **DATA_REPORT}
    assert [c["metadata"]["name"] for c in plan.create] == ["llama-lora-baseline-config", "llama-lora-baseline"]
    assert job["status"]["phase"] == "Baseline"
    assert condition(job, "DataValidated")["status"] == "True"
    validated = next(e for e in plan.events if e.reason == "DataValidated")
    assert validated.type == "Normal" and "180 training and 20 validation examples" in validated.message
    assert "p95 41" in validated.message
    assert not any(e.reason == "DataLeakage" for e in plan.events)


def test_leakage_is_a_warning_event_with_counts_and_policy():
    report = {**DATA_REPORT, "leakage": {"policy": "Drop", "matched": 20, "dropped": 20},
              "examples": {"train": 180, "validation": 0}}
    _, job = launched()
    plan, job = step(job, data_workload(SUCCEEDED), StageReport(result=data_result(job, report)))
    assert job["status"]["data"]["leakage"] == {"policy": "Drop", "matched": 20, "dropped": 20}
    leakage = next(e for e in plan.events if e.reason == "DataLeakage")
    assert leakage.type == "Warning"
    assert "20 of 20 validation examples" in leakage.message and "Drop: 20 dropped" in leakage.message
    assert [c["metadata"]["name"] for c in plan.create] == ["llama-lora-config", "llama-lora"]


def test_bad_data_fails_the_job_with_the_trainers_lines_and_no_gpu_workload():
    _, job = launched(rankSweep=SWEEP)
    failure = {"failure": {"reason": "BadInput", "message": "line 3: not JSON; line 9: no 'messages'"}}
    plan, job = step(job, data_workload(FAILED), StageReport(progress=failure))
    assert plan.create == []
    assert job["status"]["phase"] == "Failed"
    assert job["status"]["failure"]["reason"] == "BadInput"
    assert "line 3: not JSON; line 9" in job["status"]["failure"]["message"]
    assert job["status"]["data"]["state"] == "Failed"
    assert job["status"]["data"]["message"].startswith("line 3: not JSON")
    assert condition(job, "DataValidated")["status"] == "False"
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "BadInput")]
    for _ in range(2):  # final: a failed data stage never lets a GPU stage start
        plan, job = step(job)
        assert plan.create == [] and job["status"]["phase"] == "Failed"


def test_a_failed_workload_without_the_trainers_words_still_fails():
    _, job = launched()
    plan, job = step(job, data_workload(FAILED), StageReport())
    assert job["status"]["failure"]["reason"] == "DataStageFailed"
    assert "1 Master replica(s) failed" in job["status"]["data"]["message"]
    assert plan.create == []


def test_a_result_without_a_data_report_is_a_failure():
    _, job = launched()
    result = {**data_result(job)}
    del result["data"]
    plan, job = step(job, data_workload(SUCCEEDED), StageReport(result=result))
    assert job["status"]["failure"]["reason"] == "DataReportMissing"
    assert plan.create == []


def test_a_lost_data_stage_fails_unless_its_result_is_there():
    _, job = launched()
    _, running = step(job, data_workload(("Running", "PyTorchJobRunning", "running")))
    _, lost = step(running)
    assert lost["status"]["failure"]["reason"] == "JobLost"
    plan, done = step(running, None, StageReport(result=data_result(job)))
    assert done["status"]["data"]["state"] == "Succeeded"
    assert [c["metadata"]["name"] for c in plan.create] == ["llama-lora-config", "llama-lora"]


def test_a_validated_job_is_not_validated_again():
    job = data_validated(finetunejob())
    plan, job = step(job)
    assert [c["metadata"]["name"] for c in plan.create] == ["llama-lora-config", "llama-lora"]
    assert ftj.needs_stage_reports(job, {}) == {}


def test_a_job_past_its_gpu_stages_from_before_the_data_stage_is_not_sent_back():
    job = finetunejob(baseline=BASELINE)
    job["status"] = {"phase": "Baseline", "baseline": {"source": "BaselineJob", "job": "llama-lora-baseline",
                                                       "state": "Running"}}
    plan, job = step(job)
    assert not any(c["metadata"]["name"].startswith(DATA_JOB) for c in plan.create)
    assert "data" not in job["status"]


def test_suspended_job_does_not_start_the_data_stage():
    plan, job = launched(runPolicy={"suspend": True})
    assert plan.create == [] and job["status"]["phase"] == "Suspended"


def test_its_report_is_read_once_it_finished():
    _, job = launched()
    assert ftj.needs_stage_reports(job, {DATA_JOB: data_workload()}) == {}
    wanted = ftj.needs_stage_reports(job, {DATA_JOB: data_workload(SUCCEEDED)})
    assert wanted == {DATA_JOB: ftj.job_prefix(job) + "data/"}
    # adopted after a lost status write: found by its label
    assert ftj.needs_stage_reports(finetunejob(), {DATA_JOB: data_workload(SUCCEEDED)}) == wanted


# --- the pod -----------------------------------------------------------------------------------------


def _rendered(**spec):
    plan, _ = launched(**spec)
    return plan.create[1]


def test_data_stage_pod_is_cpu_only_one_process_and_schedules_like_the_job():
    scheduling = {"queueName": "gpu-queue", "nodeSelector": {"pool": "a100"}, "priorityClassName": "batch"}
    pytorchjob = _rendered(scheduling=scheduling, resources={"requests": {"cpu": "32", "memory": "400Gi"}})
    assert pytorchjob["spec"]["nprocPerNode"] == "1"
    assert list(pytorchjob["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    master = pytorchjob["spec"]["pytorchReplicaSpecs"]["Master"]
    assert master["replicas"] == 1
    pod = master["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"] == render.DATA_STAGE_RESOURCES
    assert "nvidia.com/gpu" not in str(container["resources"])
    assert pod["nodeSelector"] == {"pool": "a100"} and pod["priorityClassName"] == "batch"
    assert pytorchjob["metadata"]["labels"][kueue.LABEL_QUEUE] == "gpu-queue"
    assert pytorchjob["spec"]["runPolicy"]["suspend"] is True  # created suspended: Kueue admits it
    assert pytorchjob["metadata"]["labels"][render.LABEL_STAGE] == "data"
    training = _training_pod()
    assert container["command"] == training["containers"][0]["command"]
    assert container["securityContext"] == training["containers"][0]["securityContext"]
    assert [e["name"] for e in container["env"]] == [e["name"] for e in training["containers"][0]["env"]]


def _training_pod():
    plan, _ = step(data_validated(finetunejob()))
    return plan.create[1]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]


def test_long_job_names_keep_the_data_suffix():
    name = render.stage_job_name("x" * 70, jobconfig.Stage(kind=jobconfig.STAGE_DATA))
    assert len(name) <= render.MAX_WORKLOAD_NAME and name.endswith("-data")


# --- the report in the status ------------------------------------------------------------------------


def test_status_fields_keep_only_what_status_data_can_hold():
    report = {**DATA_REPORT, "examples": {"train": 10, "validation": -1}, "truncated": {"train": 1.5},
              "labels": [{"name": "billing", "train": 3, "validation": 1}, {"no": "name"}],
              "leakage": {"policy": "Sometimes", "matched": 2, "dropped": 2}, "extra": {"x": 1}, "invalidLines": True}
    fields = data_report.status_fields(report)
    assert fields["examples"] == {"train": 10}
    assert fields["truncated"] == {"train": 1.0}
    assert fields["labels"] == [{"name": "billing", "train": 3, "validation": 1}]
    assert fields["leakage"] == {"matched": 2, "dropped": 2}
    assert "extra" not in fields and "invalidLines" not in fields
    assert data_report.status_fields(["not", "a", "report"]) == {"labels": []}


def test_local_table_shows_every_finding():
    record = {**DATA_REPORT, "labels": [{"name": "billing", "train": 3, "validation": 1}],
              "leakage": {"policy": "Warn", "matched": 2, "dropped": 0}}
    text = data_report.table(record)
    for piece in ("train", "180", "41", "label billing: train 3, validation 1", "leakage (Warn): 2 matched",
                  "duplicates: withinTrain 0"):
        assert piece in text, piece
    assert "kept" in data_report.leakage_message(record)


def test_a_lost_status_write_after_the_data_stage_is_repaired_from_its_report():
    _, job = launched()
    _, job = step(job, data_workload(("Running", "PyTorchJobRunning", "running")))
    # the pass that saw it succeed created the training job, then its status write was lost
    training = pytorchjob_backend.read_status({"metadata": {"name": "llama-lora"}, "spec": {}, "status": {}})
    report = StageReport(result=data_result(job))
    plan = ftj.decide(ftj.Observed(job=job, now=NOW, config_map={"metadata": {"name": "llama-lora-config"}},
                                   workload=training, stage_jobs={DATA_JOB: data_workload(SUCCEEDED)},
                                   stage_reports={DATA_JOB: report},
                                   stage_config_maps=frozenset({f"{DATA_JOB}-config"})), SETTINGS)
    assert plan.create == []
    assert plan.status["data"]["state"] == "Succeeded" and plan.status["data"]["examples"]["train"] == 180
    assert plan.status["trainingJob"]["name"] == "llama-lora" and plan.status["phase"] == "Pending"


# --- the dataset policy's findings -----------------------------------------------------------------------

FINDINGS = [{"severity": "Warning", "code": "LabelsNotValidated", "message": "1 training label without a "
             "validation example, so the metrics say nothing about them: 'account'"},
            {"severity": "Warning", "code": "Leakage", "message": "1 of 4 validation examples copy training"}]


def test_warnings_reach_status_and_become_warning_events():
    report = {**DATA_REPORT, "findings": FINDINGS, "leakage": {"policy": "Warn", "matched": 1, "dropped": 0}}
    _, job = launched()
    plan, job = step(job, data_workload(SUCCEEDED), StageReport(result=data_result(job, report)))
    assert job["status"]["data"]["findings"] == FINDINGS
    warnings = [(e.type, e.reason, e.message) for e in plan.events if e.type == "Warning"]
    # Leakage keeps its own Event (DataLeakage, in the words its readers know): not a second one
    assert [reason for _, reason, _ in warnings] == ["DataLeakage", "DataLabelsNotValidated"]
    assert warnings[1][2] == "Warning: " + FINDINGS[0]["message"]
    assert [c["metadata"]["name"] for c in plan.create] == ["llama-lora-config", "llama-lora"]


def test_a_refusal_keeps_its_findings_in_status_with_an_event_each():
    _, job = launched()
    found = [{"severity": "Error", "code": "TooFewLabels", "message": "the training split has 1 distinct label"},
             {"severity": "Error", "code": "ValidationTooSmall", "message": "the validation split has 1 example"}]
    failure = {"failure": {"reason": "BadInput", "message": "the dataset cannot train", "findings": found}}
    plan, job = step(job, data_workload(FAILED), StageReport(progress=failure))
    assert job["status"]["data"]["findings"] == found
    assert job["status"]["failure"]["reason"] == "BadInput" and plan.create == []
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "DataTooFewLabels"),
                                                         ("Warning", "DataValidationTooSmall"), ("Warning", "BadInput")]


def test_findings_the_status_cannot_hold_are_left_out_or_cut():
    found = data_report.findings([{"severity": "Fatal", "code": "X", "message": "m"}, "text",
                                  {"severity": "Error", "code": "C" * 100, "message": "m" * 10_000},
                                  {"severity": "Warning"}] + [{"severity": "Warning", "code": "W"}] * 40)
    assert found[0] == {"severity": "Error", "code": "C" * 64, "message": "m" * 4096}
    assert found[1] == {"severity": "Warning", "code": "Finding", "message": ""}
    assert len(found) == data_report.MAX_FINDINGS
    assert data_report.findings(None) == [] and "findings" not in data_report.status_fields(DATA_REPORT)


def test_the_local_summary_shows_findings_of_an_accepted_and_of_a_refused_dataset():
    from kubetune_operator import report

    record = {"job": DATA_JOB, "state": "Succeeded", **DATA_REPORT, "findings": FINDINGS}
    job = {"metadata": {"name": "llama-lora"}, "status": {"phase": "Succeeded", "data": record}}
    assert "warning LabelsNotValidated: 1 training label" in report.finetunejob_summary(job)
    refused = {"job": DATA_JOB, "state": "Failed", "findings": [{"severity": "Error", "code": "TooFewLabels",
                                                                 "message": "the training split has 1 distinct"}]}
    job = {"metadata": {"name": "llama-lora"}, "status": {"phase": "Failed", "data": refused}}
    summary = report.finetunejob_summary(job)
    assert "  data refused:\n    error TooFewLabels: the training split has 1 distinct" in summary


def test_kubetune_local_exits_2_on_bad_input_only():
    from kubetune_operator.cli import local_exit_code

    assert local_exit_code({"phase": "Failed", "failure": {"reason": "BadInput", "message": "m"}}) == 2
    assert local_exit_code({"phase": "Failed", "failure": {"reason": "DataStageFailed", "message": "m"}}) == 1
    assert local_exit_code({"phase": "Failed"}) == 1
    assert local_exit_code({"phase": "Succeeded"}) == local_exit_code({"phase": "Skipped"}) == 0

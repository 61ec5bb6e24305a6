"""The stage jobs before training (pure): launch and follow the CPU-only data stage, the baseline job and
the rank-sweep trials, and record their outcomes in status.data, status.baseline and status.sweep
(reconcile.stages judges them). No GPU workload is created before the data stage has succeeded."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from kubetune.api import jobconfig
from kubetune.api import manifest as manifest_api
from kubetune_operator.backends import backend_of, render_children
from kubetune_operator.backends.workload import FAILED, RESTARTING, RUNNING, SUCCEEDED, WorkloadStatus
from kubetune_operator.render import training as render

from . import data_report, queueing, stages
from .finetunejob_plan import Event, Plan, StageReport, Status, seconds_between

if TYPE_CHECKING:
    from .finetunejob import Observed, Settings


def stage_of(job: dict, workload: WorkloadStatus) -> jobconfig.Stage | None:
    """The stage a child workload runs, from its labels (None: the training job, or not a stage)."""
    labels = workload.labels
    kind = labels.get(render.LABEL_STAGE)
    if kind in (jobconfig.STAGE_BASELINE, jobconfig.STAGE_DATA):
        return jobconfig.Stage(kind=kind)
    if kind == jobconfig.STAGE_TRIAL and str(labels.get(render.LABEL_RANK, "")).isdigit():
        return jobconfig.Stage(kind=kind, rank=int(labels[render.LABEL_RANK]))
    return None


def gpu_stages_started(status: dict) -> bool:
    """Whether a baseline job or a sweep trial was ever launched (status.baseline, status.sweep)."""
    baseline = status.get("baseline") or {}
    if baseline.get("source") == "BaselineJob" and baseline.get("state"):
        return True
    return any(t.get("state") != stages.QUEUED for t in (status.get("sweep") or {}).get("trials") or [])


def data_stage_started(status: dict) -> bool:
    return bool((status.get("data") or {}).get("state"))


def pre_training_stages(observed: Observed, settings: Settings, job: dict, plan: Plan, status: Status) -> bool:
    """Run the data stage, the baseline gate and the rank sweep; True once training may start. A job whose
    GPU stages started without a data stage on record (an operator upgrade, a lost status write) is not
    sent back to it."""
    spec = job["spec"]
    gpu_children = any((stage := stage_of(job, workload)) is not None and stage.kind != jobconfig.STAGE_DATA
                       for workload in observed.stage_jobs.values())
    due = data_stage_started(status.value) or not (gpu_stages_started(status.value) or gpu_children)
    if due and not _data_stage(observed, settings, job, plan, status):
        return False
    if stages.baseline_gates(spec) and not _baseline_stage(observed, settings, job, plan, status):
        return False
    return not stages.sweep_requested(spec) or _sweep_stage(observed, settings, job, plan, status)


def _launch_stage(observed: Observed, settings: Settings, job: dict, stage_spec: dict, stage: jobconfig.Stage,
                  plan: Plan) -> str:
    stage_job = {**job, "spec": stage_spec}
    children = render_children(stage_job, settings.render, stage)
    plan.create += [c for c in children if c["kind"] != "ConfigMap"
                    or c["metadata"]["name"] not in observed.stage_config_maps]
    return children[1]["metadata"]["name"]


def _follow_stage(observed: Observed, settings: Settings, job: dict, stage_spec: dict, stage: jobconfig.Stage,
                  record: dict, plan: Plan) -> str | None:
    """Move a stage's record along with its workload (or, when the job is gone, its result). Returns the
    reason when the stage failed in this pass."""
    name = record["job"]
    workload = observed.stage_jobs.get(name)
    report = observed.stage_reports.get(name) or StageReport()
    if workload is None:
        if record.get("state") in (stages.PENDING, stages.RUNNING):
            if report.result is not None:  # finished, then removed by its TTL before we looked
                _stage_succeeded(record, report.result, observed.now)
            else:
                _stage_failed(record, "JobLost", f"{backend_of(job).kind} {name} was deleted before it finished",
                              observed.now)
                return "JobLost"
        return None
    if record.get("state") in (None, stages.QUEUED):
        record["state"] = stages.PENDING  # adopted (its status write was lost): it exists, it is not queued
    config_map = render.stage_config_map_name(job["metadata"]["name"], stage)
    if workload.start_time:
        record["startTime"] = workload.start_time
    if workload.phase == FAILED:
        message = workload.message or f"the {workload.kind} failed"
        trainer_failure = (report.progress or {}).get("failure")
        reason = "TrainingFailed"
        if isinstance(trainer_failure, dict) and trainer_failure.get("reason"):
            reason = str(trainer_failure["reason"])
            message = f"{trainer_failure.get('message', '')} ({message})"
        _stage_failed(record, reason, message, workload.completion_time or observed.now)
        return reason
    if workload.phase == SUCCEEDED:
        completed = workload.completion_time or workload.since or observed.now
        if report.result is not None:
            _stage_succeeded(record, report.result, completed)
        elif seconds_between(completed, observed.now) >= settings.publish_timeout_seconds:
            _stage_failed(record, "ResultMissing", f"{name} succeeded but wrote no result.json within "
                          f"{settings.publish_timeout_seconds}s", completed)
            return "ResultMissing"
        return None
    if config_map not in observed.stage_config_maps:
        plan.create.append(render.render_config_map({**job, "spec": stage_spec}, stage=stage))
    record["state"] = stages.RUNNING if workload.phase in (RUNNING, RESTARTING) else stages.PENDING
    return None


def _stage_succeeded(record: dict, result: dict, completed: str) -> None:
    record["state"] = stages.SUCCEEDED
    record["metrics"] = manifest_api.numeric_metrics(result.get("metrics"))
    record["completionTime"] = completed
    _duration(record, result)
    record.pop("message", None)


def _stage_failed(record: dict, reason: str, message: str, completed: str) -> None:
    record["state"] = stages.FAILED
    record["message"] = f"{reason}: {message}"[:4000]
    record["completionTime"] = completed
    _duration(record, {})


def _duration(record: dict, result: dict) -> None:
    if record.get("startTime") and record.get("completionTime"):
        record["durationSeconds"] = max(0.0, seconds_between(record["startTime"], record["completionTime"]))
    elif _seconds_value(result.get("seconds")):
        record["durationSeconds"] = float(result["seconds"])


def _seconds_value(value: object) -> bool:
    """A duration the status can hold: JSON from storage may carry NaN or Infinity, which no API server stores."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _data_stage(observed: Observed, settings: Settings, job: dict, plan: Plan, status: Status) -> bool:
    """The CPU-only data stage: launched first, followed to its result; True once it has succeeded. Its
    report becomes status.data; a refusal (bad lines, leakage under Fail) fails the job with the trainer's
    reason and message."""
    spec, meta = job["spec"], job["metadata"]
    record = dict(status.value.get("data") or {})
    if record.get("state") == stages.SUCCEEDED:
        return True  # validated once: never again
    stage = jobconfig.Stage(kind=jobconfig.STAGE_DATA)
    name = render.stage_job_name(meta["name"], stage)
    record["job"] = name
    suspended = bool(spec.get("runPolicy", {}).get("suspend"))
    workload = observed.stage_jobs.get(name)
    if workload is not None or record.get("state") is not None:
        followed = dict(record)  # _follow_stage's times and metrics are not status.data's
        reason = _follow_stage(observed, settings, job, spec, stage, followed, plan)
        record["state"] = followed["state"]
        if reason is not None:
            message = followed["message"].removeprefix(f"{reason}: ")
            failure = ((observed.stage_reports.get(name) or StageReport()).progress or {}).get("failure")
            found = data_report.findings(failure.get("findings") if isinstance(failure, dict) else None)
            if found:
                record["findings"] = found
                plan.events += [Event(*event) for event in data_report.finding_events(found)]
            return _data_failed(status, record, "DataStageFailed" if reason == "TrainingFailed" else reason, message)
    elif not suspended:
        _launch_stage(observed, settings, job, spec, stage, plan)
        record["state"] = stages.PENDING
        plan.events.append(Event("Normal", "DataStageStarted", f"validating the dataset on CPU before any GPU is "
                                 f"requested ({name})"))
    if workload is not None:
        queueing.hold(plan, workload, spec)
    if record.get("state") == stages.SUCCEEDED:
        result = (observed.stage_reports.get(name) or StageReport()).result or {}
        if not isinstance(result.get("data"), dict):
            return _data_failed(status, record, "DataReportMissing", f"{name} succeeded but its result.json "
                                "holds no data report")
        record.update(data_report.status_fields(result["data"]))
        record.pop("message", None)
        status.value["data"] = record
        summary = data_report.summary(record)
        status.condition("DataValidated", True, "DataAccepted", summary)
        plan.events.append(Event("Normal", "DataValidated", summary))
        leakage = data_report.leakage_message(record)
        if leakage:
            plan.events.append(Event("Warning", "DataLeakage", leakage))
        # Leakage has its Event above, in the words its readers know
        plan.events += [Event(*event) for event in data_report.finding_events(record.get("findings") or [],
                                                                              skip=("Leakage",))]
        return True
    status.value["data"] = record
    queueing.stage_phase(status, spec, "Validating", "the data stage is suspended", _present(workload))
    return False


def record_data_stage(observed: Observed, settings: Settings, job: dict, plan: Plan, status: Status) -> None:
    """Bring status.data up to date once the job is past its data stage (the training job exists)."""
    _data_stage(observed, settings, job, plan, status)


def _data_failed(status: Status, record: dict, reason: str, message: str) -> bool:
    record["state"] = stages.FAILED
    record["message"] = message[:32_768]
    status.value["data"] = record
    status.condition("DataValidated", False, reason, message)
    status.fail(reason, f"the data stage ({record['job']}) failed before any GPU was requested: {message}")
    return False


def _baseline_stage(observed: Observed, settings: Settings, job: dict, plan: Plan, status: Status) -> bool:
    spec, meta = job["spec"], job["metadata"]
    target = spec["baseline"]["target"]
    stage = jobconfig.Stage(kind=jobconfig.STAGE_BASELINE)
    name = render.stage_job_name(meta["name"], stage)
    record = dict(status.value.get("baseline") or {})
    record.update(source="BaselineJob", job=name, target=dict(target))
    before = record.get("state")
    suspended = bool(spec.get("runPolicy", {}).get("suspend"))
    workload = observed.stage_jobs.get(name)
    if before not in stages.FINISHED:
        if workload is not None or before is not None:
            _follow_stage(observed, settings, job, spec, stage, record, plan)
        elif not suspended:
            _launch_stage(observed, settings, job, spec, stage, plan)
            record["state"] = stages.PENDING
            plan.events.append(Event("Normal", "BaselineStarted",
                                     f"evaluating the base model on the validation split ({name})"))
        if workload is not None:
            queueing.hold(plan, workload, spec)
    status.value["baseline"] = record
    state = record.get("state")
    if state == stages.FAILED:
        status.fail("BaselineFailed", f"the base model could not be evaluated: {record.get('message', '')}")
        return False
    if state != stages.SUCCEEDED:
        queueing.stage_phase(status, spec, "Baseline", "the baseline evaluation is suspended", _present(workload))
        return False
    metrics = record.get("metrics") or {}
    met = stages.baseline_met(metrics, target)
    record["met"] = bool(met)
    record["summary"] = stages.baseline_summary(metrics, target, spec["task"])
    if before != stages.SUCCEEDED:
        plan.events.append(Event("Normal", "BaselineEvaluated", f"base model: {_metrics_text(metrics)}"))
    if met:
        message = (f"the base model already meets the target ({record['summary']}); training was skipped. "
                   "Set spec.baseline.forceTraining: true to train anyway")
        status.condition("BaselineSufficient", True, "TargetMet", message)
        status.value["phase"] = "Skipped"
        status.value.setdefault("completionTime", observed.now)
        return False
    reason = "BelowTarget" if met is not None else "MetricMissing"
    status.condition("BaselineSufficient", False, reason, f"the base model does not meet the target "
                     f"({record['summary']}): fine-tuning")
    return True


def _sweep_stage(observed: Observed, settings: Settings, job: dict, plan: Plan, status: Status) -> bool:
    spec, meta = job["spec"], job["metadata"]
    sweep = spec["rankSweep"]
    metric = sweep["metric"]
    suspended = bool(spec.get("runPolicy", {}).get("suspend"))
    previous = {int(t["rank"]): t for t in (status.value.get("sweep") or {}).get("trials") or []}
    # Ranks added to the spec while the sweep runs join it; a trial that has started stays in it even when
    # its rank is removed (its job runs on, counts against parallelism and its result is still compared).
    launched = {rank for rank, t in previous.items() if t.get("state") != stages.QUEUED}
    launched |= {stage.rank for workload in observed.stage_jobs.values()
                 if (stage := stage_of(job, workload)) is not None and stage.kind == jobconfig.STAGE_TRIAL}
    trials, workloads = [], []
    for rank in sorted(set(stages.sweep_ranks(spec)) | launched):
        stage = stages.trial_stage(spec, rank)
        name = render.stage_job_name(meta["name"], stage)
        record = dict(previous.get(rank) or {"rank": rank, "state": stages.QUEUED})
        record.setdefault("alpha", stages.lora_alpha(spec, rank))
        record["job"] = name
        before = record["state"]
        workload = observed.stage_jobs.get(name)
        if before not in stages.FINISHED and (workload is not None or before != stages.QUEUED):
            _follow_stage(observed, settings, job, stages.trial_spec(spec, rank), stage, record, plan)
            if record["state"] == stages.SUCCEEDED and "metric" not in record:
                report = observed.stage_reports.get(name) or StageReport()
                value = stages.trial_metric(report.result, metric)
                if value is None:
                    _stage_failed(record, "MetricMissing", f"the trial reported no {metric}",
                                  record["completionTime"])
                else:
                    record["metric"] = value
        if workload is not None:
            queueing.hold(plan, workload, spec)
            workloads.append(workload)
        if record["state"] != before:
            _trial_event(plan, record, metric)
        trials.append(record)
    if not suspended:
        for rank in stages.runnable(trials, sweep["parallelism"]):
            record = next(t for t in trials if t["rank"] == rank)
            _launch_stage(observed, settings, job, stages.trial_spec(spec, rank), stages.trial_stage(spec, rank),
                          plan)
            record["state"] = stages.PENDING
            plan.events.append(Event("Normal", "TrialStarted",
                                     f"rank {rank} (alpha {record['alpha']}): {record['job']}"))
    finished = all(t["state"] in stages.FINISHED for t in trials)
    best = stages.choose_rank(trials, metric, sweep["tieTolerance"]) if finished else None
    record = {
        "metric": metric,
        "trials": trials,
        "completed": sum(1 for t in trials if t["state"] in stages.FINISHED),
        "total": len(trials),
        "summary": stages.sweep_summary(trials, best),
    }
    had_best = (status.value.get("sweep") or {}).get("bestRank")
    status.value["sweep"] = record
    if not finished:
        queueing.stage_phase(status, spec, "Sweeping", "the rank sweep is suspended", workloads)
        return False
    if best is None:
        reasons = "; ".join(f"r{t['rank']}: {t.get('message', 'failed')}" for t in trials)
        status.fail("SweepFailed", f"all {len(trials)} rank-sweep trials failed: {reasons}")
        return False
    record["bestRank"], record["bestMetric"] = best["rank"], best["metric"]
    status.value["rank"] = best["rank"]
    direction = "highest" if stages.higher_is_better(metric) else "lowest"
    message = (f"rank {best['rank']} (alpha {best['alpha']}) has the {direction} holdout {metric} "
               f"({best['metric']:.4g}) of {len(trials)} trials")
    if sweep["tieTolerance"]:
        message += f"; ties within {sweep['tieTolerance']:g} go to the smaller rank"
    status.condition("RankSelected", True, "BestHoldoutMetric", message)
    if had_best != best["rank"]:
        plan.events.append(Event("Normal", "RankChosen", message + "\n" + stages.table(trials, metric, best["rank"])))
    return True


def _present(workload: WorkloadStatus | None) -> list[WorkloadStatus]:
    return [] if workload is None else [workload]


def _trial_event(plan: Plan, record: dict, metric: str) -> None:
    if record["state"] == stages.SUCCEEDED:
        seconds = record.get("durationSeconds")
        took = f" in {seconds:.0f}s" if isinstance(seconds, int | float) else ""
        plan.events.append(Event("Normal", "TrialSucceeded",
                                 f"rank {record['rank']}: holdout {metric} {record['metric']:.4g}{took}"))
    elif record["state"] == stages.FAILED:
        plan.events.append(Event("Warning", "TrialFailed", f"rank {record['rank']}: {record.get('message', '')}"))


def _metrics_text(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())) or "no metrics"

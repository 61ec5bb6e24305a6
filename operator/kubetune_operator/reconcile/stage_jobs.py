"""The stage jobs before training (pure): launch and follow the CPU-only data stage, the baseline job and
the rank sweep (one workload), and record their outcomes in status.data, status.baseline and status.sweep
(reconcile.stages judges them). No GPU workload is created before the data stage has succeeded."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from kubetune.api import jobconfig, sweep_rules
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
    if kind in (jobconfig.STAGE_BASELINE, jobconfig.STAGE_DATA, jobconfig.STAGE_SWEEP):
        return jobconfig.Stage(kind=kind)
    return None


def gpu_stages_started(status: dict) -> bool:
    """Whether a baseline job or the sweep was ever launched (status.baseline, status.sweep)."""
    baseline = status.get("baseline") or {}
    if baseline.get("source") == "BaselineJob" and baseline.get("state"):
        return True
    return bool((status.get("sweep") or {}).get("state"))


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
    """The one sweep workload: launched, followed (its live table from progress.json), and its table
    and choice recorded in status.sweep; True once a config is chosen."""
    spec, meta = job["spec"], job["metadata"]
    sweep = spec["rankSweep"]
    stage, stage_spec = stages.sweep_stage(spec), stages.sweep_spec(spec)
    name = render.stage_job_name(meta["name"], stage)
    record = dict(status.value.get("sweep") or {})
    record.update(job=name, metric=sweep["metric"])
    before = record.get("state")
    workload = observed.stage_jobs.get(name)
    if before not in stages.FINISHED:
        if workload is not None or before is not None:
            _follow_stage(observed, settings, job, stage_spec, stage, record, plan)
        elif not spec.get("runPolicy", {}).get("suspend"):
            _launch_stage(observed, settings, job, stage_spec, stage, plan)
            record["state"] = stages.PENDING
            plan.events.append(Event("Normal", "SweepStarted", f"successive halving over {_configs_text(spec)} "
                                     f"within {sweep.get('budget', sweep_rules.DEFAULT_BUDGET):g} of the full "
                                     f"run's steps ({name})"))
        if workload is not None:
            queueing.hold(plan, workload, spec)
    record.pop("metrics", None)  # the chosen row holds them
    report = observed.stage_reports.get(name) or StageReport()
    progress = (report.progress or {}).get("sweep")
    source = report.result if report.result is not None else progress if isinstance(progress, dict) else None
    if before not in stages.FINISHED and isinstance(source, dict):
        record["trials"] = stages.trial_rows(source.get("trials"))
        record |= {k: int(source[k]) for k in ("budgetSteps", "usedSteps", "fullRunSteps")
                   if isinstance(source.get(k), int) and source[k] >= 0}
    trials = record.get("trials") or []
    best = sweep_rules.choose(trials, sweep["metric"], sweep["tieTolerance"])
    record["summary"] = stages.sweep_summary(trials, best if record.get("state") == stages.SUCCEEDED else None)
    status.value["sweep"] = record
    if record.get("state") == stages.FAILED:
        status.fail("SweepFailed", f"the rank sweep ({name}) failed: {record.get('message', '')}")
        return False
    if record.get("state") != stages.SUCCEEDED:
        queueing.stage_phase(status, spec, "Sweeping", "the rank sweep is suspended", _present(workload))
        return False
    if best is None:
        status.fail("SweepFailed", "no config of the rank sweep learned anything (each diverged, stayed at "
                    "chance or failed; see status.sweep.trials):\n" + stages.table(trials, sweep["metric"], None))
        return False
    # a row the trainer wrote without them (not finite) ran at the spec's own values
    best = {"alpha": sweep_rules.lora_alpha(spec, best["rank"]), **best}
    record.update(bestRank=best["rank"], bestMetric=best["metric"])
    if best.get("learningRate") is not None:
        record["bestLearningRate"] = best["learningRate"]
    status.value["rank"] = best["rank"]
    direction = "highest" if stages.higher_is_better(sweep["metric"]) else "lowest"
    rate = f" at learning rate {best['learningRate']:.3g}" if best.get("learningRate") is not None else ""
    message = (f"rank {best['rank']} (alpha {best['alpha']}){rate} has the "
               f"{direction} holdout {sweep['metric']} ({best['metric']:.4g}) after {best.get('steps', '?')} steps, "
               f"of {len(trials)} configs by successive halving")
    if sweep["tieTolerance"]:
        message += f"; ties within {sweep['tieTolerance']:g} go to the smaller rank"
    status.condition("RankSelected", True, "BestHoldoutMetric", message)
    if before != stages.SUCCEEDED:
        plan.events.append(Event("Normal", "RankChosen", message + "\n" + stages.table(trials, sweep["metric"], best)))
    return True


def _configs_text(spec: dict) -> str:
    ranks = ", ".join(str(c) for c in sorted({int(r) for r in spec["rankSweep"]["ranks"]}))
    rates = sorted(float(r) for r in spec["rankSweep"].get("learningRates") or [])
    return f"ranks {ranks}" + (f" x learning rates {', '.join(f'{r:g}' for r in rates)}" if len(rates) > 1 else "")


def _present(workload: WorkloadStatus | None) -> list[WorkloadStatus]:
    return [] if workload is None else [workload]


def _metrics_text(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())) or "no metrics"

"""The drift loop's decisions (pure): when a window closes, what the guards allow, when a retrain
starts, whether its candidate is promoted, and which source an alias then serves.

Everything the loop remembers lives in `status.adapters[].drift` and in storage; nothing in memory. The
statistics are in `kubetune_operator.stats`; this module only sees their verdicts (docs/drift.md, "The loop").
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
from dataclasses import dataclass, field

from kubetune.api import v1alpha1 as api
from kubetune_operator.render import gitops

HISTORY = 10  # retrain outcomes kept in status
WINDOWS_KEPT = 10  # window verdicts kept in status (at least guard.ofWindows)
LABEL_RETRAIN_OF = "kubetune.io/retrain-of"  # the AdapterDeployment that started a retrain FineTuneJob
LABEL_RETRAIN_ADAPTER = "kubetune.io/retrain-adapter"
FINISHED = ("Succeeded", "Failed", "Skipped")
HIGHER_IS_BETTER = {"accuracy": True, "macro_f1": True, "eval_loss": False, "perplexity": False}
SET_ORIGINAL, SET_NEW = "original", "new"  # the evaluation sets a retrain is judged on


@dataclass(frozen=True)
class Event:
    type: str
    reason: str
    message: str


@dataclass(frozen=True)
class RetrainJob:
    """A retrain FineTuneJob of this adapter, as observed."""
    name: str
    phase: str
    adapter: dict | None = None  # status.adapter: {digest, manifestUri, ...} once published
    message: str = ""


@dataclass(frozen=True)
class Observed:
    now: str
    version: str | None  # the stable version served now (the windows watch it); None: nothing served yet
    verdicts: tuple = ()  # windows closed since the last pass, oldest first (stats.analyse + index/endTime)
    open_window: dict | None = None  # {index, requests, startTime}
    problem: tuple[str, str] | None = None  # (reason, message): the analysis could not run this pass
    retrain_jobs: tuple = ()  # RetrainJob, this adapter's
    candidate: dict | None = None  # manifest of the finished retrain's adapter (for the gate)
    new_labelled: int = 0  # labelled examples no earlier retrain used
    labelled_problem: str | None = None
    cluster_in_flight: int = 0  # retrains running in the whole cluster
    cluster_cap: int = 2


@dataclass
class Plan:
    status: dict = field(default_factory=dict)
    events: list = field(default_factory=list)
    start_retrain: str | None = None  # create this FineTuneJob (after writing its data)


def parse_time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def plus(now: str, seconds: float) -> str:
    return (parse_time(now) + dt.timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


def seconds_between(start: str, end: str) -> float:
    return (parse_time(end) - parse_time(start)).total_seconds()


def window_due(requests: int, start_time: str | None, now: str, window: dict) -> bool:
    """A window closes at `requests` scored requests, or at `maxSeconds` if it has `minRequests`
    (a time-capped window with fewer is never analysed: too few samples to say anything)."""
    if requests >= window["requests"]:
        return True
    if start_time is None or requests < window["minRequests"]:
        return False
    return seconds_between(start_time, now) >= window["maxSeconds"]


def retrain_job_name(adep_name: str, adapter: str, sequence: int) -> str:
    """`<adep>-<adapter>-retrain-<n>`, shortened with a hash to FineTuneJob's 45-character limit."""
    name = f"{adep_name}-{adapter}-retrain-{sequence}"
    if len(name) <= 45:
        return name
    digest = hashlib.sha256(f"{adep_name}/{adapter}".encode()).hexdigest()[:6]
    suffix = f"-{digest}-retrain-{sequence}"
    return f"{adep_name}-{adapter}"[: 45 - len(suffix)].rstrip("-") + suffix


def _fired(verdict: dict) -> list[str]:
    names = [n for n, t in (verdict.get("triggers") or {}).items() if isinstance(t, dict) and t.get("fired")]
    names += [n for n, d in (verdict.get("diagnostics") or {}).items() if isinstance(d, dict) and d.get("fired")]
    return names


def _window_event(verdict: dict, alias: str) -> Event:
    summary = verdict.get("summary") or ""
    index, requests = verdict.get("index"), verdict.get("requests")
    if verdict.get("drifted"):
        return Event("Warning", "WindowDrifted", f"{alias}: window {index} ({requests} requests) shows harm: {summary}")
    if any((d or {}).get("fired") for d in (verdict.get("diagnostics") or {}).values()):
        return Event("Normal", "WindowDiagnostics",
                     f"{alias}: window {index} ({requests} requests): inputs shifted, the model is not hurt: {summary}")
    return Event("Normal", "WindowClean", f"{alias}: window {index} ({requests} requests): {summary}")


@dataclass
class _Pass:
    """One adapter's pass: the state being decided, the plan it fills, and how Events are named."""

    state: dict
    plan: Plan
    alias: str
    now: str

    def decision(self, type_: str, reason: str, message: str, *, always: bool = False) -> None:
        """Record a decision; its Event only when it differs from the last one (a pass every few
        seconds must not repeat 'cooling down' forever)."""
        last = self.state.get("lastDecision") or {}
        if always or last.get("reason") != reason:
            self.plan.events.append(Event(type_, reason, f"{self.alias}: {message}"))
        self.state["lastDecision"] = {"time": self.now, "reason": reason, "message": message}


def decide(adep: dict, adapter: dict, previous: dict | None, observed: Observed) -> Plan:
    """The next drift status of one adapter, its Events, and whether to start a retrain now."""
    guard = adapter["drift"]["guard"]
    alias = f"{adep['metadata']['namespace']}/{adapter['name']}"
    step = _Pass(copy.deepcopy(previous or {}), Plan(), alias, observed.now)
    _take_observation(step, observed)
    _judge_windows(step, guard, observed.verdicts)  # 1. windows -> the guard's drifted state
    _follow_retrain(step, adapter, observed)  # 2. the retrain in flight: follow it; judge it when it ends
    if step.state.get("drifted") and step.state.get("retrain") is None:
        _start_retrain_if_allowed(step, adep, adapter, observed)  # 3. drifted, nothing in flight
    step.state["state"] = _summary_state(step.state, observed.now, observed, guard["clearWindows"])
    step.plan.status = step.state
    return step.plan


def _take_observation(step: _Pass, observed: Observed) -> None:
    """The served version, the open window and this pass's problem, into the state."""
    state = step.state
    # a new stable version (promoted retrain, new spec source): its own reference, fresh windows
    if state.get("version") != observed.version:
        for key in ("windows", "drifted", "cleanStreak"):
            state.pop(key, None)
        state["version"] = observed.version
    if observed.open_window is not None:
        state["window"] = observed.open_window
    if observed.problem:
        reason, message = observed.problem
        step.decision("Warning", reason, message)
        state["problem"] = {"reason": reason, "message": message}
    else:
        state.pop("problem", None)


def _judge_windows(step: _Pass, guard: dict, verdicts: tuple) -> None:
    """Closed windows -> the guard's drifted state: k of the last n drifted, m clean in a row clear it."""
    state, now = step.state, step.now
    windows = list(state.get("windows") or [])
    for verdict in verdicts:
        step.plan.events.append(_window_event(verdict, step.alias))
        windows.append({"index": verdict.get("index"), "endTime": verdict.get("endTime", now),
                        "requests": verdict.get("requests"), "drifted": bool(verdict.get("drifted")),
                        "fired": _fired(verdict), "summary": (verdict.get("summary") or "")[:500]})
        recent = windows[-guard["ofWindows"]:]
        bad = sum(1 for w in recent if w["drifted"])
        if not state.get("drifted"):
            if bad >= guard["triggerWindows"]:
                state["drifted"], state["cleanStreak"] = True, 0
                state["driftedSince"] = now
                step.plan.events.append(Event(
                    "Warning", "DriftDetected", f"{step.alias}: {bad} of the last {len(recent)} windows show harm "
                    f"(guard: {guard['triggerWindows']} of {guard['ofWindows']}): {windows[-1]['summary']}"))
        elif windows[-1]["drifted"]:
            state["cleanStreak"] = 0
        else:
            state["cleanStreak"] = int(state.get("cleanStreak", 0)) + 1
            if state["cleanStreak"] >= guard["clearWindows"]:
                state["drifted"] = False
                state.pop("driftedSince", None)
                step.plan.events.append(Event(
                    "Normal", "DriftCleared",
                    f"{step.alias}: {state['cleanStreak']} clean windows in a row (guard: {guard['clearWindows']})"))
    state["windows"] = windows[-max(WINDOWS_KEPT, guard["ofWindows"]):]


def _follow_retrain(step: _Pass, adapter: dict, observed: Observed) -> None:
    """Adopt a retrain whose status patch was lost, track its phase, and close it when it ends."""
    state, now, spec = step.state, step.now, adapter["drift"]
    jobs = {j.name: j for j in observed.retrain_jobs}
    running = [j for j in observed.retrain_jobs if j.phase not in FINISHED]
    current = state.get("retrain")
    if current is None and running:  # created, but the status patch was lost: adopt it
        current = state["retrain"] = {"job": running[0].name, "startTime": now}
    if current is None:
        return
    job = jobs.get(current["job"])
    if job is None:
        if seconds_between(current.get("startTime", now), now) > 60:
            _finish(state, spec, now, {"job": current["job"], "outcome": "Failed", "reason": "RetrainMissing",
                                       "message": "the retrain FineTuneJob disappeared"})
            step.decision("Warning", "RetrainMissing", f"retrain {current['job']} disappeared", always=True)
    elif job.phase in ("Failed", "Skipped") or (job.phase == "Succeeded" and not job.adapter):
        reason = "RetrainFailed" if job.phase == "Failed" else "RetrainSkipped"
        _finish(state, spec, now, {"job": job.name, "outcome": "Failed", "reason": reason,
                                   "message": job.message[:1000]})
        step.decision("Warning", reason, f"retrain {job.name} ended without a candidate: {job.message}", always=True)
    elif job.phase == "Succeeded" and observed.candidate is not None:
        _judge_candidate(step, adapter, job, observed.candidate)
    else:
        state["retrain"] = {**current, "phase": job.phase}


def _judge_candidate(step: _Pass, adapter: dict, job: RetrainJob, candidate: dict) -> None:
    """A succeeded retrain's candidate through the gate: promoted (served next) or rejected."""
    state, now = step.state, step.now
    verdict = gate(candidate, adapter["drift"]["promotion"], adapter_task(candidate))
    entry = {"job": job.name, "digest": job.adapter.get("digest"), "outcome":
             "Promoted" if verdict.promote else "Rejected", "reason": verdict.reason,
             "message": verdict.message, "numbers": verdict.numbers}
    _finish(state, adapter["drift"], now, entry)
    if verdict.promote:
        state["promoted"] = {"job": job.name, "digest": job.adapter.get("digest"),
                             "manifestUri": job.adapter.get("manifestUri"), "time": now,
                             "replaces": adapter_source_key(adapter)}
        # the canary strategy takes it from here; the windows restart on the new version
        step.decision("Normal", "CandidatePromoted", f"retrain {job.name} promoted: {verdict.message}", always=True)
    else:
        step.decision("Warning", "CandidateRejected", f"retrain {job.name} rejected: {verdict.message}", always=True)


def _start_retrain_if_allowed(step: _Pass, adep: dict, adapter: dict, observed: Observed) -> None:
    """Drifted with nothing in flight: the first guard that holds a retrain back, or a new retrain."""
    state, now, spec = step.state, step.now, adapter["drift"]
    blocked = _blocked(state, spec, spec.get("retrain"), observed, now)
    if blocked is not None:
        step.decision(blocked[0], blocked[1], blocked[2])
        return
    jobs = {j.name for j in observed.retrain_jobs}
    sequence = int(state.get("sequence", 0)) + 1
    name = retrain_job_name(adep["metadata"]["name"], adapter["name"], sequence)
    while name in jobs:  # an earlier retrain kept its name (history trimmed, status restored)
        sequence += 1
        name = retrain_job_name(adep["metadata"]["name"], adapter["name"], sequence)
    state["sequence"] = sequence
    state["retrain"] = {"job": name, "startTime": now, "newExamples": observed.new_labelled}
    state["retrainStarts"] = [*_in_period(state, spec["guard"], now), now]
    step.plan.start_retrain = name
    step.decision("Normal", "RetrainStarted", f"drift hurts the model; retraining as FineTuneJob {name} with "
                                              f"{observed.new_labelled} new labelled examples", always=True)


def retrain_not_started(status: dict, adapter: dict, alias: str, now: str, reason: str,
                        message: str) -> tuple[dict, Event]:
    """The retrain decided this pass could not be created (unusable labelled data, an invalid job):
    recorded as a failed retrain, so the cooldown and budget hold and the reason is visible."""
    state = copy.deepcopy(status)
    job = (state.get("retrain") or {}).get("job")
    _finish(state, adapter["drift"], now, {"job": job, "outcome": "Failed", "reason": reason,
                                          "message": message[:1000]})
    state["lastDecision"] = {"time": now, "reason": reason, "message": message[:1000]}
    state["state"] = "Cooldown"
    return state, Event("Warning", reason, f"{alias}: retrain {job} not started: {message}")


def newly_promoted(status: dict, now: str) -> str | None:
    """The job promoted in this pass, if any (its labelled data is used up)."""
    last = (status.get("history") or [None])[-1]
    if last and last.get("outcome") == "Promoted" and last.get("endTime") == now:
        return last.get("job")
    return None


def _in_period(state: dict, guard: dict, now: str) -> list[str]:
    return [t for t in state.get("retrainStarts") or [] if seconds_between(t, now) < guard["periodSeconds"]]


def _blocked(state: dict, spec: dict, retrain: dict | None, observed: Observed, now: str):
    """(event type, reason, message) of the first guard that holds a retrain back; None: go."""
    guard = spec["guard"]
    if retrain is None:
        return "Warning", "DetectOnly", "drift detected; no retrain configured (drift.retrain)"
    if observed.version is None:
        return "Normal", "NothingServed", "no stable version to retrain from"
    cooldown = state.get("cooldownUntil")
    if cooldown and seconds_between(now, cooldown) > 0:
        return "Normal", "RetrainCoolingDown", f"drifted, but cooling down after the last retrain until {cooldown}"
    starts = _in_period(state, guard, now)
    if len(starts) >= guard["maxRetrainsPerPeriod"]:
        return ("Warning", "RetrainBudgetExhausted",
                f"drifted, but {len(starts)} retrains already started in the last {guard['periodSeconds']} s "
                f"(budget {guard['maxRetrainsPerPeriod']})")
    if observed.cluster_in_flight >= observed.cluster_cap:
        return ("Normal", "RetrainClusterCapReached",
                f"drifted, but {observed.cluster_in_flight} retrains run in the cluster (cap {observed.cluster_cap})")
    if observed.labelled_problem:
        return "Warning", "LabelledDataUnavailable", f"drifted, but {observed.labelled_problem}"
    needed = retrain["labelledData"]["minExamples"]
    if observed.new_labelled < needed:
        return ("Normal", "InsufficientLabelledData",
                f"drifted, but only {observed.new_labelled} new labelled examples under "
                f"{retrain['labelledData']['uri']} (need {needed})")
    return None


def _finish(state: dict, spec: dict, now: str, entry: dict) -> None:
    """A retrain ended (any outcome): history, cooldown, and fresh windows for what is served next."""
    current = state.pop("retrain", None) or {}
    entry = {**entry, "startTime": current.get("startTime"), "endTime": now}
    state["history"] = [*(state.get("history") or []), entry][-HISTORY:]
    state["cooldownUntil"] = plus(now, spec["guard"]["cooldownSeconds"])
    state["drifted"], state["cleanStreak"] = False, 0
    state.pop("driftedSince", None)
    state["windows"] = []


def _summary_state(state: dict, now: str, observed: Observed, clear_windows: int) -> str:
    if state.get("retrain"):
        return "Retraining"
    if observed.version is None:
        return "Pending"
    if state.get("problem"):
        return "Unavailable"
    if state.get("drifted"):
        return "Drifted"
    cooldown = state.get("cooldownUntil")
    if cooldown and seconds_between(now, cooldown) > 0:
        return "Cooldown"
    if any(w["drifted"] for w in (state.get("windows") or [])[-clear_windows:]):
        return "Suspect"  # a harmful window lately, not (yet) enough for the guard
    return "Watching"


# --- the promotion gate -----------------------------------------------------------------------------

@dataclass(frozen=True)
class GateVerdict:
    promote: bool
    reason: str
    message: str
    numbers: dict


def adapter_task(manifest: dict) -> str:
    return manifest.get("task") or "CausalLM"


def gate(candidate_manifest: dict, promotion: dict, task: str) -> GateVerdict:
    """Promote only a candidate that beats the serving adapter on the new holdout (by more than
    minImprovement) and loses at most maxRegression on the original holdout; both measured by the
    retrain's trainer on the same examples (manifest `evaluations`: candidate and reference)."""
    metric = promotion.get("metric") or ("accuracy" if task == "SequenceClassification" else "eval_loss")
    higher = HIGHER_IS_BETTER[metric]
    evaluations = candidate_manifest.get("evaluations") or {}
    numbers: dict = {"metric": metric}
    for name in (SET_NEW, SET_ORIGINAL):
        result = evaluations.get(name) or {}
        cand, ref = (result.get("candidate") or {}).get(metric), (result.get("reference") or {}).get(metric)
        if cand is None or ref is None:
            return GateVerdict(False, "EvaluationMissing",
                               f"the candidate's manifest has no {metric} for the candidate and the serving adapter "
                               f"on the {name!r} set", numbers)
        numbers[name] = {"candidate": cand, "serving": ref, "examples": result.get("examples")}
    gain = lambda s: (numbers[s]["candidate"] - numbers[s]["serving"]) * (1 if higher else -1)  # noqa: E731
    improvement, change = gain(SET_NEW), gain(SET_ORIGINAL)
    numbers["improvement"], numbers["originalChange"] = round(improvement, 6), round(change, 6)
    text = (f"{metric} on new data {numbers[SET_NEW]['candidate']:.4f} vs serving {numbers[SET_NEW]['serving']:.4f}; "
            f"on the original holdout {numbers[SET_ORIGINAL]['candidate']:.4f} vs "
            f"{numbers[SET_ORIGINAL]['serving']:.4f}")
    if improvement <= promotion["minImprovement"]:
        return GateVerdict(False, "NotBetterOnNewData",
                           f"{text}: improvement {improvement:+.4f} is not above {promotion['minImprovement']}",
                           numbers)
    if -change > promotion["maxRegression"]:
        return GateVerdict(False, "RegressesOnOriginalData",
                           f"{text}: regression {-change:.4f} exceeds maxRegression {promotion['maxRegression']}",
                           numbers)
    return GateVerdict(True, "BetterOnNewData", text, numbers)


# --- which source an alias serves -------------------------------------------------------------------

def adapter_source_key(adapter: dict) -> str:
    """What identifies the spec's source: a promoted retrain replaces exactly this source; when the
    user points the adapter elsewhere (a new job, a new uri/digest), the user's choice wins again."""
    source = adapter["source"]
    if source.get("fineTuneJobRef"):
        return f"fineTuneJobRef:{source['fineTuneJobRef']['name']}"
    return f"uri:{source.get('uri')}@{source.get('digest')}"


def promoted_source(adapter: dict, drift_status: dict | None) -> dict | None:
    """The promoted retrain ({job, digest, manifestUri}) the alias serves instead of the spec's
    source, or None when the spec's source applies."""
    promoted = (drift_status or {}).get("promoted")
    if not promoted or not adapter.get("drift"):
        return None
    if promoted.get("replaces") != adapter_source_key(adapter):
        return None
    return promoted


def rollout_view(adep: dict, records: dict) -> dict:
    """The AdapterDeployment as the rollout sees it: adapters whose promoted retrain replaces the
    spec's source point at that retrain's published adapter (uri + digest). `records`: adapter name ->
    status.adapters[] entry."""
    adapters = []
    for adapter in adep["spec"]["adapters"]:
        promoted = promoted_source(adapter, (records.get(adapter["name"]) or {}).get("drift"))
        if promoted:
            adapter = {**adapter, "source": {"uri": promoted["manifestUri"], "digest": promoted["digest"]}}
        adapters.append(adapter)
    return {**adep, "spec": {**adep["spec"], "adapters": adapters}}


# --- the retrain FineTuneJob -------------------------------------------------------------------------

@dataclass(frozen=True)
class RetrainData:
    """Where the operator wrote the retrain's data (each object whole, before the job exists)."""
    train_uri: str
    validation_uri: str
    original_holdout_uri: str
    new_holdout_uri: str
    format: str


def retrain_job(adep: dict, adapter: dict, name: str, data: RetrainData, serving_manifest_uri: str) -> dict:
    """The FineTuneJob of a retrain: the template, the data, and the evaluation the gate reads."""
    template = adapter["drift"]["retrain"]["template"]
    meta = adep["metadata"]
    spec = copy.deepcopy(template["spec"])
    spec["dataset"] = {**(spec.get("dataset") or {}), "uri": data.train_uri, "validationUri": data.validation_uri,
                       "format": (spec.get("dataset") or {}).get("format") or data.format}
    spec["dataset"].pop("validationSplit", None)
    spec["evaluation"] = {"sets": [{"name": SET_ORIGINAL, "uri": data.original_holdout_uri},
                                   {"name": SET_NEW, "uri": data.new_holdout_uri}],
                          "reference": {"manifestUri": serving_manifest_uri}}
    # the template's metadata minus GitOps tracking keys: the AdapterDeployment's Application must not
    # claim (and prune) the FineTuneJobs the operator creates
    template_meta = template.get("metadata") or {}
    labels = {**gitops.without_tracking(template_meta.get("labels")),
              LABEL_RETRAIN_OF: meta["name"], LABEL_RETRAIN_ADAPTER: adapter["name"]}
    return {
        "apiVersion": api.API_VERSION,
        "kind": "FineTuneJob",
        "metadata": {
            "name": name, "namespace": meta["namespace"], "labels": labels,
            "annotations": gitops.without_tracking(template_meta.get("annotations")),
            "ownerReferences": [{"apiVersion": api.API_VERSION, "kind": "AdapterDeployment", "name": meta["name"],
                                 "uid": meta.get("uid", ""), "controller": True, "blockOwnerDeletion": True}],
        },
        "spec": spec,
    }


def split_labelled(lines: list[tuple[str, str]], holdout_fraction: float) -> tuple[list[str], list[str]]:
    """(train, holdout) lines of the new labelled data: a stable split by a hash of each line's content
    (the same example lands on the same side in every retrain, so a holdout never leaks into training)."""
    train, holdout = [], []
    for key, line in lines:
        draw = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (holdout if draw < holdout_fraction else train).append(line)
    if not holdout and train:  # tiny sets: never judge on nothing
        holdout.append(train.pop())
    return train, holdout

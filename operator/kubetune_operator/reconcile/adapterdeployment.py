"""The AdapterDeployment state machine (pure): sources, agent reports and the clock in; the desired
serving state for the agents, status and events out.

Per alias: preflight, then stable / canary steps / promotion or rollback, all remembered in status
(docs/concepts.md, "AdapterDeployment lifecycle"). The shell (`kubetune_operator.shell.adapterdeployment`) runs it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from dataclasses import dataclass, field

from kubetune import runtimes
from kubetune.api import base_identity, methods, serving
from kubetune_operator.render import serving as render_serving

from . import analysis, secrets, tenancy
from . import conditions as cond


@dataclass(frozen=True)
class Source:
    """What the shell resolved for one adapter's spec.source (a FineTuneJob's status.adapter, or a uri),
    after reading and verifying its manifest."""

    manifest_uri: str | None = None
    digest: str | None = None
    rank: int | None = None
    base_model: dict | None = None  # the manifest's {uri, revision, identity}
    method: str | None = None  # the manifest's training method (spec.method.type)
    adapter_config: dict | None = None  # adapter_config.json, verified (None: whole weights, or not read)
    problems: tuple[tuple[str, str], ...] = ()  # (reason, message): FineTuneJobNotReady, ManifestMissing...


@dataclass(frozen=True)
class Pod:
    name: str
    ready: bool
    report: dict | None = None  # the agent's report (serving.AgentReport as JSON), None until it wrote one


@dataclass(frozen=True)
class Settings:
    # namespace -> URI prefixes adapters may come from ("*": every namespace). Empty: no restriction.
    allowed_sources: dict = field(default_factory=dict)
    resync_seconds: float = 10.0


@dataclass(frozen=True)
class Observed:
    adep: dict  # the AdapterDeployment, spec defaulted
    now: str
    sources: dict  # adapter name -> Source
    pods: list  # Pod, every serving pod selected
    desired: serving.DesiredState | None = None  # what the desired ConfigMap holds now
    # Secret name -> its keys (None: no such Secret) for `needs_secrets`; None: not looked at (local mode)
    secrets: dict | None = None
    # spec.baseModel's identity as read (base_identity), or (None, why unknown); None: not resolved
    served_base: tuple | None = None


@dataclass(frozen=True)
class Event:
    type: str
    reason: str
    message: str


@dataclass
class Plan:
    desired: serving.DesiredState | None = None  # write when it differs from Observed.desired
    status: dict = field(default_factory=dict)
    events: list = field(default_factory=list)
    requeue_after: float | None = None


def _seconds(start: str | None, end: str) -> float:
    if not start:
        return 0.0
    parse = dt.datetime.fromisoformat
    return (parse(end.replace("Z", "+00:00")) - parse(start.replace("Z", "+00:00"))).total_seconds()


def _plus(now: str, seconds: float) -> str:
    moment = dt.datetime.fromisoformat(now.replace("Z", "+00:00")) + dt.timedelta(seconds=seconds)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


CPU_ENGINE = runtimes.cpu.RUNTIME.name  # serves what vLLM refuses: peft loads every LoRA adapter


# --- preflight -----------------------------------------------------------------------------------------


def runtime_max_rank(spec: dict, ranks: list[int]) -> int | None:
    """The runtime's --max-lora-rank: the spec's, else the smallest value the runtime accepts that fits
    every adapter (None when an adapter is larger than it allows)."""
    runtime = spec.get("runtime") or {}
    explicit = (runtime.get("managed") or runtime.get("selector") or {}).get("maxLoraRank")
    if explicit:
        return int(explicit)
    return runtimes.runtime_of(spec).smallest_rank_for(max(ranks, default=8))


def served_ranks(adep: dict, sources: dict) -> list[int]:
    """Ranks the runtime must accept: the sources' and every version still loaded (stable, canary,
    retiring). A smaller new adapter must never shrink --max-lora-rank below what is being served."""
    ranks = [s.rank for s in sources.values() if s.rank is not None]
    for record in (adep.get("status") or {}).get("adapters") or []:
        for version in [record.get("stable"), record.get("canary"), *(record.get("retiring") or [])]:
            if version and version.get("rank") is not None:
                ranks.append(int(version["rank"]))
    return ranks


def allowed(uri: str, namespace: str, settings: Settings) -> bool:
    """Whether a source's manifest lies under the namespace's storage prefixes (reconcile.tenancy)."""
    return tenancy.uri_allowed(uri, namespace, settings.allowed_sources)


def preflight(adep: dict, adapter: dict, source: Source, settings: Settings, max_rank: int | None,
              served_base: tuple | None = None) -> list:
    """Reasons to refuse a candidate before any pod is touched: [(reason, message)], empty when it may roll.
    `served_base`: (identity, why unknown) of spec.baseModel as the shell resolved it (None: not resolved)."""
    if source.problems:
        return list(source.problems)
    name, namespace = adapter["name"], adep["metadata"]["namespace"]
    # the sample prefix, the base model and the adapter's drift storage (--allowed-storage)
    problems = []
    for message in tenancy.adapterdeployment_refusals(adep, settings.allowed_sources, adapter):
        problems.append(("StorageNotAllowed", message))
    if not allowed(source.manifest_uri or "", namespace, settings):
        problems.append(("SourceNotAllowed", f"adapters[{name}]: {source.manifest_uri} is outside the storage "
                         f"prefixes namespace {namespace} may serve from"))
    expected = adapter["source"].get("digest")
    if expected and expected != source.digest:
        problems.append(("DigestMismatch", f"adapters[{name}]: the manifest's digest {source.digest} is not "
                         f"source.digest {expected}"))
    if source.rank is not None and max_rank is not None and source.rank > max_rank:
        problems.append(("RankTooHigh", f"adapters[{name}]: rank {source.rank} is above the runtime's "
                         f"--max-lora-rank {max_rank}"))
    runtime = runtimes.runtime_of(adep["spec"])
    if source.rank is not None and max_rank is None:
        problems.append(("RankTooHigh", f"adapters[{name}]: rank {source.rank} is above every --max-lora-rank "
                         f"{runtime.title} accepts ({runtime.lora_ranks[-1]})"))
    problems += adapter_refusals(adep, name, source)
    mismatch = base_model_refusal(name, adep["spec"]["baseModel"], source.base_model or {}, served_base)
    return problems + ([mismatch] if mismatch else [])


def adapter_refusals(adep: dict, name: str, source: Source) -> list:
    """What no runtime serves (whole weights, another PEFT type) and what the chosen runtime refuses in
    adapter_config.json (vLLM: modules_to_save, DoRA, bias): the engine would refuse it on every pod."""
    facts = methods.METHODS.get(source.method or "")
    if facts is not None and not facts.publishes_adapter:
        return [("NotAnAdapter", f"adapters[{name}]: method {source.method} publishes whole weights, not an "
                 "adapter: serve them as spec.baseModel, or train with LoRA or QLoRA")]
    config = source.adapter_config
    if config is None:
        return []
    peft_type = config.get("peft_type") or "LORA"
    if peft_type != "LORA":
        return [("NotAnAdapter", f"adapters[{name}]: adapter_config.json peft_type {peft_type}: only LoRA "
                 "adapters are loaded at runtime")]
    runtime = runtimes.runtime_of(adep["spec"])
    return [("AdapterUnsupported", f"adapters[{name}]: {why}; spec.runtime.engine {runtime.name} cannot serve it"
             + ("" if runtime.name == CPU_ENGINE else f", serve it with spec.runtime.engine: {CPU_ENGINE}"))
            for why in runtime.adapter_refusals(config)]


def base_model_refusal(name: str, base: dict, trained_on: dict, served_base: tuple | None) -> tuple | None:
    """BaseModelMismatch unless the adapter's base is the served one: by identity (the manifest's
    baseModel.identity against the served base's) when both are known, else by URI and revision."""
    unknown = ""
    if trained_on.get("identity") and served_base is not None:
        served, why_unknown = served_base
        same, why = base_identity.compare(trained_on["identity"], served)
        if same is not None:
            return None if same else ("BaseModelMismatch", f"adapters[{name}]: trained on {trained_on.get('uri')}, "
                                      f"served on {base['uri']}, which is another model: {why}")
        unknown = f" (its identity cannot be verified: {why_unknown})"
    if trained_on.get("uri") and trained_on["uri"].rstrip("/") != base["uri"].rstrip("/"):
        return ("BaseModelMismatch", f"adapters[{name}]: trained on {trained_on['uri']}, served on {base['uri']}"
                + unknown)
    if trained_on.get("revision") and base.get("revision") and trained_on["revision"] != base["revision"]:
        return ("BaseModelMismatch", f"adapters[{name}]: trained on revision {trained_on['revision']}, served on "
                f"{base['revision']}")
    return None


# --- the decision --------------------------------------------------------------------------------------


def _version(namespace: str, adapter: str, source: Source) -> dict:
    return {"digest": source.digest, "manifestUri": source.manifest_uri, "rank": source.rank,
            "version": serving.version_name(namespace, adapter, source.digest)}


_COUNTS = ("requests", "errors", "confidence_count")
_SUMS = ("latency_sum", "confidence_sum")


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _counters(value: object) -> dict | None:
    """One version's counters (serving.VersionMetrics as JSON), the well-typed ones only."""
    if not isinstance(value, dict):
        return None
    out: dict = {k: value[k] for k in _COUNTS if _count(value.get(k))}
    out.update({k: float(value[k]) for k in _SUMS
                if isinstance(value.get(k), int | float) and not isinstance(value.get(k), bool)
                and math.isfinite(value[k]) and value[k] >= 0})
    buckets = value.get("latency_buckets")
    if isinstance(buckets, list) and all(_count(b) for b in buckets):
        out["latency_buckets"] = list(buckets)
    return out


def agent_report(report: object) -> dict | None:
    """An agent's report as the rollout reads it. It comes from a Pod annotation, which holds whatever JSON was
    written there (an older agent, a person with kubectl): only its well-typed parts count, so a malformed one
    cannot stop the rollout of every alias, nor put NaN into the status (analysis snapshots copy counters)."""
    if not isinstance(report, dict):
        return None
    loaded, errors, metrics = report.get("loaded"), report.get("errors"), report.get("metrics")
    return {
        "started": report["started"] if isinstance(report.get("started"), str) else None,
        "loaded": {k: v for k, v in loaded.items() if isinstance(v, str)} if isinstance(loaded, dict) else {},
        "errors": {k: {"reason": str(v.get("reason") or "")[:256], "message": str(v.get("message") or "")}
                   for k, v in errors.items() if isinstance(v, dict)} if isinstance(errors, dict) else {},
        "metrics": {k: c for k, v in metrics.items() if (c := _counters(v))} if isinstance(metrics, dict) else {},
    }


def _reports(pods: list[Pod]) -> dict[str, dict]:
    return {p.name: p.report for p in pods if p.report}


def _loaded_everywhere(pods: list[Pod], version: str, digest: str) -> tuple[int, int]:
    ready = sum(1 for p in pods if p.report and (p.report.get("loaded") or {}).get(version) == digest)
    return ready, len(pods)


def needs_secrets(adep: dict) -> list[str]:
    """The Secrets the managed serving pods reference (spec defaulted), to read before deciding."""
    return list(dict.fromkeys(r.secret for r in secrets.secret_refs(render_serving.secret_env(adep["spec"]))))


@dataclass
class _Tally:
    """What the adapters' steps found, for the conditions and the phase."""
    refused: list = field(default_factory=list)
    degraded: list = field(default_factory=list)
    progressing: list = field(default_factory=list)
    not_ready: list = field(default_factory=list)
    aliases: list = field(default_factory=list)
    records: list = field(default_factory=list)


def decide(observed: Observed, settings: Settings) -> Plan:
    observed = dataclasses.replace(observed, pods=[dataclasses.replace(p, report=agent_report(p.report))
                                                   for p in observed.pods])
    adep = observed.adep
    meta, spec = adep["metadata"], adep["spec"]
    generation = int(meta.get("generation", 1))
    previous = adep.get("status") or {}
    records = {r["name"]: r for r in previous.get("adapters") or []}
    plan = Plan()
    status = {k: v for k, v in previous.items() if k not in ("adapters",)}
    status["observedGeneration"] = generation
    requeue = [settings.resync_seconds]
    max_rank = runtime_max_rank(spec, served_ranks(adep, observed.sources))
    tally = _Tally()
    reports = _reports(observed.pods)
    for adapter in spec["adapters"]:
        rec = dict(records.get(adapter["name"]) or {"name": adapter["name"]})
        _adapter_pass(rec, adapter, observed, settings, max_rank, plan, requeue, reports, tally)
    status["adapters"] = tally.records
    plan.desired = _desired_if_changed(spec, tally.aliases, observed.desired)
    status["conditions"], ready = _conditions(status.get("conditions"), tally, observed, plan, generation)
    status["phase"] = _phase(tally, ready)
    status["summary"] = versions_summary(tally.records)
    plan.status = status
    plan.requeue_after = min(requeue)
    return plan


def _adapter_pass(rec: dict, adapter: dict, observed: Observed, settings: Settings, max_rank: int | None,
                  plan: Plan, requeue: list, reports: dict, tally: _Tally) -> None:
    """One alias: preflight its source, step its rollout, retire old versions, count its pods."""
    adep, now = observed.adep, observed.now
    namespace, name = adep["metadata"]["namespace"], adapter["name"]
    rec["alias"] = serving.alias_name(namespace, name)
    source = observed.sources.get(name) or Source(problems=(("SourceUnresolved", f"adapters[{name}]: "
                                                                                  "source not resolved"),))
    problems = preflight(adep, adapter, source, settings, max_rank, observed.served_base)
    candidate = None if problems else _version(namespace, name, source)
    if problems:
        tally.refused.append(problems[0])
        if (rec.get("refused") or {}).get("reason") != problems[0][0]:
            plan.events.append(Event("Warning", problems[0][0], problems[0][1]))
        rec["refused"] = {"digest": source.digest, "reason": problems[0][0],
                          "message": "; ".join(m for _, m in problems)}
    else:
        rec.pop("refused", None)
    _step(rec, candidate, adapter, adep["spec"], observed, plan, requeue, reports, now)
    _retire_expired(rec, requeue, now)
    versions = _served_versions(rec)
    if versions:
        tally.aliases.append(serving.AliasState(rec["alias"], versions))
    _count_pods(rec, observed.pods, tally)
    if rec.get("canary"):
        tally.progressing.append(name)
    if rec.get("rolledBack") and not rec.get("canary"):
        tally.degraded.append(rec["rolledBack"])
    tally.records.append(rec)


def _retire_expired(rec: dict, requeue: list, now: str) -> None:
    """Drop retiring versions whose grace period is over; wake up when the next one ends."""
    rec["retiring"] = [r for r in rec.get("retiring") or [] if _seconds(now, r["unloadAfter"]) > 0]
    for r in rec["retiring"]:
        requeue.append(max(1.0, _seconds(now, r["unloadAfter"])))
    if not rec["retiring"]:
        rec.pop("retiring")


def _served_versions(rec: dict) -> list:
    """The alias's versions for the agents: stable and canary share the traffic; retiring ones get none."""
    stable, canary = rec.get("stable"), rec.get("canary")
    weight = int(rec.get("canaryWeight", 0)) if canary else 0
    versions = []
    if stable:
        versions.append(serving.Version(stable["version"], stable["digest"], stable["manifestUri"], 100 - weight,
                                        "stable"))
    if canary:
        versions.append(serving.Version(canary["version"], canary["digest"], canary["manifestUri"], weight,
                                        "canary"))
    for old in rec.get("retiring") or []:
        versions.append(serving.Version(old["version"], old["digest"], old["manifestUri"], 0, "retiring"))
    return versions


def _count_pods(rec: dict, pods: list[Pod], tally: _Tally) -> None:
    """How many pods serve what is desired (per version, and the version being rolled out); their errors."""
    for role in ("stable", "canary"):
        if rec.get(role):
            loaded, _ = _loaded_everywhere(pods, rec[role]["version"], rec[role]["digest"])
            rec[role] = {**rec[role], "podsLoaded": loaded}
    target = rec.get("canary") or rec.get("stable")
    if target:
        ready, total = _loaded_everywhere(pods, target["version"], target["digest"])
        rec["podsReady"], rec["podsTotal"] = ready, total
        if ready < total or total == 0:
            tally.not_ready.append(rec["name"])
    errors = []
    for pod in pods:
        for version, error in ((pod.report or {}).get("errors") or {}).items():
            if version.startswith(rec["alias"] + "@"):
                errors.append({"pod": pod.name, "version": version, "reason": error.get("reason", ""),
                               "message": str(error.get("message", ""))[:1000]})
    if errors:
        rec["podErrors"] = errors[:20]
    else:
        rec.pop("podErrors", None)


def _desired_if_changed(spec: dict, aliases: list, current: serving.DesiredState | None) -> serving.DesiredState | None:
    """The agents' desired state, with the next generation, when its content differs from `current`."""
    sampling = spec.get("trafficSampling") or {}
    desired = serving.DesiredState(generation=0, adapters=aliases, sampling_rate=float(sampling.get("rate", 0.0)),
                                   sampling_uri=sampling.get("uri"))
    if current is not None and _content(current) == _content(desired):
        return None
    return serving.DesiredState(generation=(current.generation + 1) if current else 1, adapters=desired.adapters,
                                sampling_rate=desired.sampling_rate, sampling_uri=desired.sampling_uri)


def _conditions(conditions: list | None, tally: _Tally, observed: Observed, plan: Plan,
                generation: int) -> tuple[list, bool]:
    """Validated, Progressing, Degraded, Ready (and the Secrets check): (conditions, ready)."""
    now, spec = observed.now, observed.adep["spec"]

    def set_condition(kind: str, value: bool, reason: str, message: str) -> None:
        nonlocal conditions
        conditions = cond.set_condition(conditions, kind, value, reason, message, generation, now)

    if tally.refused:
        set_condition("Validated", False, tally.refused[0][0], tally.refused[0][1])
    else:
        set_condition("Validated", True, "PreflightPassed", "every adapter source is verified and servable")
    if tally.progressing or tally.not_ready:
        detail = ", ".join(tally.progressing) or ", ".join(tally.not_ready)
        set_condition("Progressing", True, "RollingOut", f"rolling out: {detail}")
    else:
        set_condition("Progressing", False, "Stable", "every alias serves its stable version")
    if tally.degraded:
        set_condition("Degraded", True, tally.degraded[0]["reason"], tally.degraded[0]["message"])
    elif any(r.get("podErrors") for r in tally.records):
        first = next(r["podErrors"][0] for r in tally.records if r.get("podErrors"))
        set_condition("Degraded", True, "AgentErrors",
                      f"pod {first['pod']}: {first['version']}: {first['reason']}: {first['message']}")
    else:
        set_condition("Degraded", False, "Healthy", "no rollback and no agent errors")
    ready = bool(observed.pods) and not tally.not_ready and all(r.get("stable") for r in tally.records)
    set_condition("Ready", ready, "AllPodsServing" if ready else "NotReady",
                  "every pod serves every alias" if ready else
                  (f"waiting for pods: {', '.join(tally.not_ready)}" if tally.not_ready else "no serving pods yet"))
    if observed.secrets is not None:  # pods wait in CreateContainerConfigError without them: say so
        found = secrets.problem(secrets.secret_refs(render_serving.secret_env(spec)), observed.secrets,
                                observed.adep["metadata"]["namespace"])
        conditions, warning = secrets.report(conditions, found, "serving pods", generation, now)
        if warning:
            plan.events.append(Event("Warning", warning.reason, warning.message))
    return conditions, ready


def _phase(tally: _Tally, ready: bool) -> str:
    if tally.degraded or any(r.get("podErrors") for r in tally.records):
        return "Degraded"
    if ready and not tally.progressing:
        return "Ready"
    if any(r.get("stable") for r in tally.records):
        return "Progressing"
    return "Pending"


def _short(version: dict | None) -> str:
    """The first 12 hex of a version's digest: what its served name ends with."""
    digest = (version or {}).get("digest") or ""
    return digest.split(":", 1)[-1][:12] or "?"


def versions_summary(records: list[dict]) -> str:
    """One line for `kubectl get adep`: per alias, the stable version and the canary with its weight."""
    parts = []
    for record in records:
        if record.get("stable"):
            part = f"{record['name']} {_short(record['stable'])}"
        else:
            part = f"{record['name']} (none yet)"
        if record.get("canary"):
            part += f" -> {_short(record['canary'])} {record.get('canaryWeight', 0)}%"
        parts.append(part)
    return ", ".join(parts)[:1024]


def _content(state: serving.DesiredState) -> tuple:
    return (state.adapters, state.sampling_rate, state.sampling_uri)


def _step(rec: dict, candidate: dict | None, adapter: dict, spec: dict, observed: Observed, plan: Plan,
          requeue: list, reports: dict, now: str) -> None:
    """Advance one alias's rollout by as many steps as the observation allows."""
    name = rec["name"]
    stable, canary = rec.get("stable"), rec.get("canary")
    if candidate is None:
        if canary:  # the source went bad mid-rollout: stop offering the canary
            _abandon(rec, plan, "SourceRefused", f"{name}: the canary's source no longer passes preflight")
        return
    digest = candidate["digest"]
    if stable is None:
        rec["stable"] = candidate
        rec.pop("canary", None)
        plan.events.append(Event("Normal", "Deploying", f"{name}: first version {candidate['version']}"))
        return
    if digest == stable["digest"]:
        if canary:
            _abandon(rec, plan, "SourceReverted", f"{name}: the source points at the stable version again")
        return
    if (rec.get("rolledBack") or {}).get("digest") == digest:
        return  # this candidate failed its analysis: only a new digest is tried
    strategy = spec["strategy"]
    if not canary or canary["digest"] != digest:
        rec["canary"] = candidate
        rec["stepIndex"] = 0
        rec["stepStartTime"] = now
        rec["canaryWeight"] = 100 if strategy["type"] == "Immediate" else 0
        rec.pop("analysis", None)
        plan.events.append(Event("Normal", "RolloutStarted", f"{name}: {stable['version']} -> {candidate['version']} "
                                 f"({strategy['type']})"))
        canary = rec["canary"]
    ready, total = _loaded_everywhere(observed.pods, canary["version"], canary["digest"])
    if strategy["type"] == "Immediate":
        if total and ready == total:
            _promote(rec, spec, plan, now)
        return
    steps = strategy["canary"]["steps"]
    while rec["stepIndex"] < len(steps):
        step = steps[rec["stepIndex"]]
        if "setWeight" in step:
            rec["canaryWeight"] = int(step["setWeight"])
            if not total or ready < total:
                return  # the weight applies where the canary is loaded; the step completes when it is everywhere
        elif "pause" in step:
            left = step["pause"]["seconds"] - _seconds(rec["stepStartTime"], now)
            if left > 0:
                requeue.append(left)
                return
        else:
            if not _analyse(rec, step["analysis"], reports, plan, requeue, now):
                return
        rec["stepIndex"] += 1
        rec["stepStartTime"] = now
        rec.pop("analysis", None)
    _promote(rec, spec, plan, now)


def _analyse(rec: dict, thresholds: dict, reports: dict, plan: Plan, requeue: list, now: str) -> bool:
    stable, canary = rec["stable"], rec["canary"]
    state = rec.get("analysis")
    if not state or state.get("step") != rec["stepIndex"]:
        rec["analysis"] = {"step": rec["stepIndex"], "startTime": now,
                           "stable": analysis.snapshot(reports, stable["version"]),
                           "canary": analysis.snapshot(reports, canary["version"])}
        requeue.append(min(thresholds.get("windowSeconds", 300), 5.0))
        return False
    canary_window = analysis.window(reports, canary["version"], state["canary"])
    stable_window = analysis.window(reports, stable["version"], state["stable"])
    verdict = analysis.judge(canary_window, stable_window, thresholds, _seconds(state["startTime"], now))
    rec["analysis"]["last"] = {"outcome": verdict.outcome, "message": verdict.message,
                               "canaryRequests": canary_window.requests, "stableRequests": stable_window.requests}
    if verdict.outcome == analysis.PASS:
        plan.events.append(Event("Normal", "AnalysisPassed", f"{rec['name']}: {verdict.message}"))
        return True
    if verdict.outcome == analysis.FAIL:
        rec["rolledBack"] = {"digest": canary["digest"], "version": canary["version"], "reason": "AnalysisFailed",
                             "metric": verdict.metric,
                             "message": f"{rec['name']}: canary {canary['version']} rolled back: {verdict.message}",
                             "time": now}
        plan.events.append(Event("Warning", "RolledBack", rec["rolledBack"]["message"]))
        _drop_canary(rec)
        return False
    requeue.append(min(5.0, max(1.0, thresholds.get("windowSeconds", 300) - _seconds(state["startTime"], now))))
    return False


def _promote(rec: dict, spec: dict, plan: Plan, now: str) -> None:
    old, new = rec["stable"], rec["canary"]
    grace = int(spec["strategy"].get("unloadGraceSeconds", 60))
    retiring = [r for r in rec.get("retiring") or [] if r["digest"] != new["digest"]]
    if grace > 0:
        retiring.append({**old, "unloadAfter": _plus(now, grace)})
    rec["retiring"] = retiring
    rec["stable"] = new
    rec.pop("rolledBack", None)
    _drop_canary(rec)
    plan.events.append(Event("Normal", "Promoted", f"{rec['name']}: {new['version']} is stable "
                             f"({old['version']} unloads in {grace}s)"))


def _abandon(rec: dict, plan: Plan, reason: str, message: str) -> None:
    plan.events.append(Event("Normal", reason, message))
    _drop_canary(rec)


def _drop_canary(rec: dict) -> None:
    for key in ("canary", "canaryWeight", "stepIndex", "stepStartTime", "analysis"):
        rec.pop(key, None)

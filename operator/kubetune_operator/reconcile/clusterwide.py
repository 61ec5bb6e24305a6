"""Cluster-wide rollout (pure): which namespaces an AdapterDeployment reaches, which refuse it, the agents'
reports in its own names, and per namespace the desired state, status and clean-up.

`decide` runs one rollout over the union of the served pods; this module maps between that union and the
namespaces (docs/concepts.md, "Cluster-wide rollout"; tenancy: docs/security.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from kubetune.api import serving

from . import tenancy

ACCEPT_ANNOTATION = "kubetune.io/accept-adapters-from"
SERVING, PROGRESSING, NO_PODS, REFUSED, RELEASED = "Serving", "Progressing", "NoPods", "Refused", "Released"


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: dict = field(default_factory=dict)
    annotations: dict = field(default_factory=dict)


def namespace_view(obj: dict) -> Namespace:
    meta = obj.get("metadata") or {}
    return Namespace(meta["name"], dict(meta.get("labels") or {}), dict(meta.get("annotations") or {}))


def namespace_selector(spec: dict) -> dict | None:
    return ((spec.get("runtime") or {}).get("selector") or {}).get("namespaceSelector")


def selects(selector: dict, labels: dict) -> bool:
    """A LabelSelector's meaning (matchLabels and matchExpressions all hold), as the API server reads it:
    k8s.io/apimachinery/pkg/apis/meta/v1/helpers.go LabelSelectorAsSelector."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for requirement in selector.get("matchExpressions") or []:
        key, operator, values = requirement["key"], requirement["operator"], requirement.get("values") or []
        present = key in labels
        holds = {"In": present and labels.get(key) in values, "NotIn": not present or labels[key] not in values,
                 "Exists": present, "DoesNotExist": not present}[operator]
        if not holds:
            return False
    return True


def remembered(adep: dict) -> list[str]:
    """Namespaces other than its own that the last status names: children may be there to update or release."""
    home = adep["metadata"]["namespace"]
    return [n["name"] for n in (adep.get("status") or {}).get("namespaces") or [] if n.get("name") != home]


def left(adep: dict, served: list[Namespace]) -> list[str]:
    """The namespaces it served (its status says) and no longer does: their agents must unload it."""
    return [name for name in remembered(adep) if name not in {n.name for n in served}]


def targets(adep: dict, namespaces: list[Namespace] | None) -> list[Namespace]:
    """The namespaces served: without a namespaceSelector its own; with one, every namespace it matches
    (its own only if it matches too, as a platform team's namespace usually runs no serving pods), by name.
    `namespaces` None: none were read (no selector; or `kubetune local`, where one machine is one namespace)."""
    selector = namespace_selector(adep["spec"])
    if not selector or namespaces is None:
        return [Namespace(adep["metadata"]["namespace"])]
    return sorted((n for n in namespaces if selects(selector, n.labels)), key=lambda n: n.name)


def accepts(namespace: Namespace, home: str) -> bool:
    """A namespace takes another namespace's adapters only when it says so: annotation
    kubetune.io/accept-adapters-from with that namespace among its comma-separated names, or `*`."""
    if namespace.name == home:
        return True
    names = {n.strip() for n in namespace.annotations.get(ACCEPT_ANNOTATION, "").split(",")}
    return home in names or "*" in names


def refusal(adep: dict, namespace: Namespace, manifests: dict, allowed: dict) -> tuple[str, str] | None:
    """Why `namespace` serves none of the AdapterDeployment's adapters: (reason, message), or None. Its own
    namespace's checks are preflight's; another must accept it and allow, under its own storage prefixes,
    every adapter's manifest (`manifests`: adapter name -> manifest uri) and the sample prefix its agents
    write to. All or nothing, so every served pod serves every alias and the rollout's counts stay exact."""
    home, name = adep["metadata"]["namespace"], namespace.name
    if name == home:
        return None
    if not accepts(namespace, home):
        return ("NotAccepted", f"namespace {name} does not accept adapters from {home} (annotation "
                f"{ACCEPT_ANNOTATION} does not name it)")
    problems = []
    for adapter, uri in manifests.items():
        if uri and not tenancy.uri_allowed(uri, name, allowed):
            problems.append(("SourceNotAllowed", f"adapters[{adapter}]: {uri} is outside the storage prefixes "
                             f"namespace {name} may serve from"))
    sampling = adep["spec"].get("trafficSampling") or {}
    if sampling.get("uri") and sampling.get("rate", 0) > 0:
        for message in tenancy.refusals([("spec.trafficSampling.uri", sampling["uri"])], name, allowed):
            problems.append(("StorageNotAllowed", message))
    if not problems:
        return None
    return problems[0][0], "; ".join(m for _, m in problems)


def _renamed(key: str, old_prefixes: tuple, old: str, new: str) -> str:
    return new + key[len(old):] if key.startswith(old_prefixes) else key


def to_home_names(report: dict | None, target: str, home: str, adapters: list[str]) -> dict | None:
    """An agent report of `target` in the home namespace's served names (`<target>/A@x` -> `<home>/A@x`),
    so one rollout counts and analyses every namespace's pods alike. Other names stay as they are."""
    if not isinstance(report, dict) or target == home:
        return report
    prefixes = tuple(serving.alias_name(target, a) + "@" for a in adapters)
    out = dict(report)
    for section in ("loaded", "errors", "metrics"):
        if isinstance(report.get(section), dict):
            out[section] = {_renamed(k, prefixes, f"{target}/", f"{home}/"): v for k, v in report[section].items()}
    return out


def union_pods(adep: dict, served: list[str], pods: dict, adapters: list[str]) -> list:
    """The pods one rollout drives: those of every served namespace, another namespace's named
    `<namespace>/<pod>`, with their reports in the home names. `pods`: namespace -> [reconcile Pod]."""
    home = adep["metadata"]["namespace"]
    out = []
    for namespace in served:
        for pod in pods.get(namespace) or []:
            name = pod.name if namespace == home else f"{namespace}/{pod.name}"
            out.append(dataclasses.replace(pod, name=name, report=to_home_names(pod.report, namespace, home,
                                                                                adapters)))
    return out


def desired_for(desired: serving.DesiredState, home: str, target: str, refused: bool) -> serving.DesiredState:
    """The desired state of `target`'s agents: the home state under the target's names (its agents route only
    their own namespace's names), or no adapters at all where the namespace refuses or was released."""
    if refused:
        return dataclasses.replace(desired, adapters=[])
    if target == home:
        return desired

    def rename(name: str) -> str:
        return target + name[len(home):] if name.startswith(home + "/") else name

    adapters = [serving.AliasState(rename(a.alias), [dataclasses.replace(v, name=rename(v.name))
                                                     for v in a.versions]) for a in desired.adapters]
    return dataclasses.replace(desired, adapters=adapters)


def _serves_all(pod, wanted: dict) -> bool:
    loaded = (pod.report or {}).get("loaded") or {}
    return all(loaded.get(version) == digest for version, digest in wanted.items())


def _wanted(records: list[dict]) -> dict:
    """Per alias, the version being rolled out (canary, else stable): what a pod must have loaded."""
    out = {}
    for record in records:
        target = record.get("canary") or record.get("stable")
        if target:
            out[target["version"]] = target["digest"]
    return out


def holds_any(pods: list, home: str, target: str, adapters: list[str]) -> bool:
    """Whether a released namespace's agents still have one of its versions loaded."""
    prefixes = tuple(serving.alias_name(target, a) + "@" for a in adapters)
    return any(k.startswith(prefixes) for p in pods for k in ((p.report or {}).get("loaded") or {}))


@dataclass
class Reach:
    """What the pass does per namespace, and says about it."""
    records: list = field(default_factory=list)  # status.namespaces
    summary: str = ""  # status.reach
    events: list = field(default_factory=list)  # (type, reason, message)
    release: list = field(default_factory=list)  # namespaces whose children are deleted now


def reach(adep: dict, served: list[Namespace], refusals: dict, pods: dict, released: list[str],
          adapter_records: list[dict], versions: str) -> Reach:
    """status.namespaces, status.reach, Events for newly refused namespaces, and the released namespaces whose
    agents hold nothing of it any more (their children are deleted). `pods`: namespace -> pods as listed."""
    home = adep["metadata"]["namespace"]
    adapters = [a["name"] for a in adep["spec"]["adapters"]]
    before = {n["name"]: n for n in (adep.get("status") or {}).get("namespaces") or []}
    wanted, out = _wanted(adapter_records), Reach()
    for namespace in served:
        listed = pods.get(namespace.name) or []
        record = {"name": namespace.name, "podsTotal": len(listed), "podsReady": 0}
        if namespace.name in refusals:
            reason, message = refusals[namespace.name]
            record.update(phase=REFUSED, reason=reason, message=message)
            if (before.get(namespace.name) or {}).get("reason") != reason:
                out.events.append(("Warning", "NamespaceRefused", f"namespace {namespace.name}: {message}"))
        else:
            local = [dataclasses.replace(p, report=to_home_names(p.report, namespace.name, home, adapters))
                     for p in listed]
            record["podsReady"] = sum(1 for p in local if wanted and _serves_all(p, wanted))
            record["phase"] = (NO_PODS if not listed else SERVING if record["podsReady"] == len(listed)
                               else PROGRESSING)
            record["versions"] = versions
        out.records.append(record)
    for name in released:
        if holds_any(pods.get(name) or [], home, name, adapters):
            out.records.append({"name": name, "phase": RELEASED, "podsTotal": len(pods.get(name) or []),
                                "podsReady": 0, "message": "no longer selected: its agents unload the adapters"})
        else:
            out.release.append(name)
    out.summary = reach_summary(out.records, bool(namespace_selector(adep["spec"])))
    return out


def reach_summary(records: list[dict], cluster_wide: bool) -> str:
    """`2/3 namespaces, 4/4 pods (1 refused)`; without a namespace selector just the pods."""
    counted = [r for r in records if r["phase"] not in (REFUSED, RELEASED)]
    pods = f"{sum(r['podsReady'] for r in counted)}/{sum(r['podsTotal'] for r in counted)} pods"
    if not cluster_wide:
        return pods
    selected = [r for r in records if r["phase"] != RELEASED]
    serving_now = sum(1 for r in selected if r["phase"] == SERVING)
    refused = sum(1 for r in selected if r["phase"] == REFUSED)
    return (f"{serving_now}/{len(selected)} namespaces, {pods}" + (f" ({refused} refused)" if refused else ""))


def with_reach(status: dict, adep: dict, reach_now: Reach) -> dict:
    """The status with status.reach, and status.namespaces while it may reach (or still holds) other namespaces."""
    out = {k: v for k, v in status.items() if k != "namespaces"}
    out["reach"] = reach_now.summary
    if namespace_selector(adep["spec"]) or remembered(adep):
        out["namespaces"] = reach_now.records
    return out


def writes(adep: dict, desired: serving.DesiredState, served: list[Namespace], refusals: dict, released: list[str],
           reach_now: Reach) -> list[tuple[str, serving.DesiredState | None, bool]]:
    """What to write into each other namespace: (namespace, its desired state, create it if absent), or
    (namespace, None, False) to delete its children. Served: the state under its names; refused: none
    (only updating one that exists, so a namespace that never took it is never written to); left: none
    until its agents unloaded, then deleted."""
    home = adep["metadata"]["namespace"]
    out = [(n.name, desired_for(desired, home, n.name, n.name in refusals), n.name not in refusals)
           for n in served if n.name != home]
    for name in released:
        out.append((name, None, False) if name in reach_now.release
                   else (name, desired_for(desired, home, name, True), False))
    return out

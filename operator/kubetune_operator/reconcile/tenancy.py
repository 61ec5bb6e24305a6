"""Per-namespace storage limits (pure): which storage URIs a namespace's objects may name.

Configured by `--allowed-storage NAMESPACE=PREFIX` (chart value `tenancy.allowedStorage`); unconfigured
means no limit. A prefix matches at a path boundary, and `.`/`..` segments are refused whenever limits
are configured. The rules and why: docs/security.md.
"""

from __future__ import annotations

REASON = "StorageNotAllowed"


def prefixes_for(namespace: str, allowed: dict) -> tuple[str, ...]:
    """The prefixes namespace `namespace` may use: its own and the `*` ones."""
    return tuple(allowed.get(namespace, ())) + tuple(allowed.get("*", ()) if namespace != "*" else ())


def uri_allowed(uri: str, namespace: str, allowed: dict) -> bool:
    """Whether `uri` lies under a prefix namespace `namespace` may use. Empty `allowed`: always."""
    if not allowed:
        return True
    _scheme, sep, path = uri.partition("://")
    if not sep or any(part in (".", "..") for part in path.split("/")):
        return False
    for prefix in prefixes_for(namespace, allowed):
        if prefix.endswith("/"):
            if uri.startswith(prefix):
                return True
        elif uri == prefix or uri.startswith(prefix + "/"):
            return True
    return False


def _get(doc: dict | None, *path: str):
    for key in path:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


def _is_storage(uri) -> bool:
    return isinstance(uri, str) and uri.startswith(("s3://", "file://"))


def finetunejob_storage(spec: dict, prefix: str = "spec") -> list[tuple[str, str]]:
    """Every storage URI a FineTuneJob spec names, as (field path, uri). Checkpoints, progress, stage
    results and the published adapter all go under output.uri; hf:// base models are not storage."""
    found = [
        ("baseModel.uri", _get(spec, "baseModel", "uri")),
        ("dataset.uri", _get(spec, "dataset", "uri")),
        ("dataset.validationUri", _get(spec, "dataset", "validationUri")),
        ("output.uri", _get(spec, "output", "uri")),
        ("evaluation.reference.manifestUri", _get(spec, "evaluation", "reference", "manifestUri")),
    ]
    for i, item in enumerate(_get(spec, "evaluation", "sets") or []):
        found.append((f"evaluation.sets[{i}].uri", _get(item, "uri")))
    return [(f"{prefix}.{path}", uri) for path, uri in found if _is_storage(uri)]


def adapterdeployment_storage(spec: dict, adapter: dict | None = None) -> list[tuple[str, str]]:
    """Storage URIs of an AdapterDeployment: the base model (s3://), spec.trafficSampling.uri and, per
    adapter (all of them, or only `adapter`), its drift labelled data and retrain template. An adapter's
    source is checked where it is resolved (its manifest's location: `SourceNotAllowed`)."""
    found = [("spec.baseModel.uri", _get(spec, "baseModel", "uri")),
             ("spec.trafficSampling.uri", _get(spec, "trafficSampling", "uri"))]
    for i, item in enumerate(spec.get("adapters") or []):
        if adapter is not None and item.get("name") != adapter.get("name"):
            continue
        where = f"spec.adapters[{i}]"
        retrain = _get(item, "drift", "retrain") or {}
        found.append((f"{where}.drift.retrain.labelledData.uri", _get(retrain, "labelledData", "uri")))
        template_spec = _get(retrain, "template", "spec")
        if isinstance(template_spec, dict):
            found += finetunejob_storage(template_spec, f"{where}.drift.retrain.template.spec")
    return [(path, uri) for path, uri in found if _is_storage(uri)]


def refusals(uris: list[tuple[str, str]], namespace: str, allowed: dict) -> list[str]:
    """One message per URI outside the namespace's prefixes (empty: all allowed)."""
    if not allowed:
        return []
    prefixes = prefixes_for(namespace, allowed)
    shown = ", ".join(prefixes) if prefixes else "none"
    return [f"{path}: {uri} is outside the storage prefixes namespace {namespace} may use ({shown})"
            for path, uri in uris if not uri_allowed(uri, namespace, allowed)]


def finetunejob_refusals(job: dict, allowed: dict) -> list[str]:
    return refusals(finetunejob_storage(job.get("spec") or {}), job["metadata"].get("namespace", ""), allowed)


def adapterdeployment_refusals(adep: dict, allowed: dict, adapter: dict | None = None) -> list[str]:
    return refusals(adapterdeployment_storage(adep.get("spec") or {}, adapter),
                    adep["metadata"].get("namespace", ""), allowed)


def parse(items: list[str], flag: str = "--allowed-storage") -> dict[str, tuple[str, ...]]:
    """`NAMESPACE=PREFIX` items (repeatable; `*=PREFIX` for every namespace) -> {namespace: prefixes}."""
    out: dict[str, list[str]] = {}
    for item in items:
        namespace, sep, prefix = item.partition("=")
        if not sep or not namespace or "://" not in prefix:
            raise ValueError(f"{flag} {item!r}: expected NAMESPACE=PREFIX (e.g. team-a=s3://team-a-data/)")
        out.setdefault(namespace, [])
        if prefix not in out[namespace]:
            out[namespace].append(prefix)
    return {k: tuple(v) for k, v in out.items()}

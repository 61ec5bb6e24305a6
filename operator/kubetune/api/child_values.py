"""Kubernetes value rules on the fields that reach a child object (label maps, selectors, resource
names and quantities, toleration keys) which the CRD's schema cannot encode, and the file:// URIs only
`kubetune local` can read. Pure functions over a defaulted object returning (path, message) pairs.
"""

from __future__ import annotations

from . import k8s_values

Found = list[tuple[str, str]]


def _error(path: str, message: str) -> tuple[str, str]:
    return path, message


def _label_map(path: str, mapping: dict | None) -> Found:
    return [_error(path, message) for _, message in k8s_values.labels(mapping or {})]


def _keys(path: str, keys, what: str) -> Found:
    return [_error(path, f"{what} {key!r}: {message}") for key in keys for message in k8s_values.qualified_name(key)]


def _quantities(path: str, mapping: dict | None) -> Found:
    errors = _keys(path, mapping or {}, "resource name")
    for name, value in (mapping or {}).items():
        errors.extend(_error(f"{path}.{name}", message) for message in k8s_values.non_negative_quantity(str(value)))
    return errors


def _tolerations(path: str, tolerations: list) -> Found:
    errors = []
    for index, toleration in enumerate(tolerations):
        key = toleration.get("key") or ""
        if key:
            errors.extend(_keys(f"{path}[{index}].key", [key], "key"))
        elif toleration.get("operator", "Equal") != "Exists":
            errors.append(_error(f"{path}[{index}].operator", "operator must be Exists when `key` is empty, which "
                                                              "means \"match all values and all keys\""))
    return errors


def _finetunejob_errors(spec: dict) -> Found:
    resources = spec.get("resources") or {}
    scheduling = spec.get("scheduling") or {}
    errors = _quantities("spec.resources.requests", resources.get("requests"))
    errors += _quantities("spec.resources.limits", resources.get("limits"))
    if "sharedMemory" in resources:
        errors += [_error("spec.resources.sharedMemory", message)
                   for message in k8s_values.non_negative_quantity(str(resources["sharedMemory"]))]
    errors += _keys("spec.resources.gpuResourceName", [resources.get("gpuResourceName") or "nvidia.com/gpu"],
                    "resource name")
    errors += _label_map("spec.scheduling.nodeSelector", scheduling.get("nodeSelector"))
    errors += _tolerations("spec.scheduling.tolerations", scheduling.get("tolerations") or [])
    return errors


def _selector_errors(path: str, selector: dict) -> Found:
    errors = _label_map(f"{path}.matchLabels", selector.get("matchLabels"))
    for index, requirement in enumerate(selector.get("matchExpressions") or []):
        errors += _keys(f"{path}.matchExpressions[{index}].key", [requirement["key"]], "key")
    return errors


def _adapterdeployment_errors(spec: dict) -> Found:
    errors = []
    selector = (spec.get("runtime") or {}).get("selector")
    if selector:
        errors += _selector_errors("spec.runtime.selector", selector)
        if selector.get("namespaceSelector"):
            errors += _selector_errors("spec.runtime.selector.namespaceSelector", selector["namespaceSelector"])
    for index, adapter in enumerate(spec.get("adapters") or []):
        metadata = (((adapter.get("drift") or {}).get("retrain") or {}).get("template") or {}).get("metadata") or {}
        base = f"spec.adapters[{index}].drift.retrain.template.metadata"
        errors += _label_map(f"{base}.labels", metadata.get("labels"))
        errors += _keys(f"{base}.annotations", metadata.get("annotations") or {}, "key")
    return errors


def child_value_errors(kind: str, document: dict) -> Found:
    """Values the API server would refuse in a child (Pod, PyTorchJob, Service...) kubetune renders."""
    spec = document.get("spec") or {}
    return _finetunejob_errors(spec) if kind == "FineTuneJob" else _adapterdeployment_errors(spec)


def _file_sources(kind: str, spec: dict):
    """(path, uri) of the sources a pod or the operator reads: data, and published adapters (the
    operator reads an adapter's manifest itself, so file:// would name the operator's own filesystem).
    Not here: the base model (an image or a mounted volume of the pods carries it under file:///) and
    the outputs (checked where described)."""
    if kind == "FineTuneJob":
        dataset = spec.get("dataset") or {}
        for field in ("uri", "validationUri"):
            yield f"spec.dataset.{field}", dataset.get(field)
        evaluation = spec.get("evaluation") or {}
        for index, entry in enumerate(evaluation.get("sets") or []):
            yield f"spec.evaluation.sets[{index}].uri", entry.get("uri")
        yield "spec.evaluation.reference.manifestUri", (evaluation.get("reference") or {}).get("manifestUri")
        return
    for index, adapter in enumerate(spec.get("adapters") or []):
        yield f"spec.adapters[{index}].source.uri", (adapter.get("source") or {}).get("uri")
        labelled = (((adapter.get("drift") or {}).get("retrain") or {}).get("labelledData") or {})
        yield f"spec.adapters[{index}].drift.retrain.labelledData.uri", labelled.get("uri")


def cluster_uri_errors(kind: str, spec: dict, *, local: bool) -> Found:
    """file:// sources name a path on the machine that reads them: fine for `kubetune local`, in a
    cluster the operator would read its own filesystem and the pods theirs."""
    if local:
        return []
    return [_error(path, "file:// sources work only with `kubetune local`; in a cluster use s3://BUCKET/KEY")
            for path, uri in _file_sources(kind, spec) if isinstance(uri, str) and uri.startswith("file://")]

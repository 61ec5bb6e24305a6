"""What the API server checks on every object before a CRD's own schema: the request's size, values
JSON can carry, ObjectMeta (strict fields, name, labels, annotations) and the uniqueness of
`x-kubernetes-list-type` set and map lists. Each check returns ``(path, message)`` pairs.
"""

from __future__ import annotations

import json
import math
from typing import Any

from . import k8s_values


def _nullable(kind: str, **extra) -> dict:
    """A JSON null decodes to Go's zero value (no labels, no name), so the API server accepts it."""
    return {"type": [kind, "null"], **extra}


_STRING_MAP = _nullable("object", additionalProperties={"type": "string"})

# metav1.ObjectMeta's fields: strict field validation (kubectl's default, --validate=strict) refuses
# any other key, e.g. a misspelt `lables` that would otherwise drop the labels without a word.
OBJECT_META = {
    "type": "object",
    "properties": {
        **{name: _nullable("string") for name in ("name", "generateName", "namespace", "selfLink", "uid",
                                                   "resourceVersion", "creationTimestamp", "deletionTimestamp")},
        "generation": _nullable("integer"),
        "deletionGracePeriodSeconds": _nullable("integer"),
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
        "ownerReferences": _nullable("array", items={"type": "object"}),
        "finalizers": _nullable("array", items={"type": "string"}),
        "managedFields": _nullable("array", items={"type": "object"}),
    },
    "additionalProperties": False,
}


def _path(parent: str, key: Any) -> str:
    return f"{parent}[{key}]" if isinstance(key, int) else (f"{parent}.{key}" if parent else str(key))


def json_value_errors(value: Any, path: str = "") -> list[tuple[str, str]]:
    """Values a JSON request cannot carry (NaN, infinities, non-string keys): YAML can write them, the
    API server never receives them, and a NaN once rendered invalid JSON into a ConfigMap."""
    if isinstance(value, float) and not math.isfinite(value):
        return [(path, f"must be a finite number, not {value!r} (JSON has no NaN or Infinity)")]
    if isinstance(value, dict):
        errors = []
        for key, item in value.items():
            if not isinstance(key, str):
                errors.append((path, f"keys must be strings, got {type(key).__name__} {key!r}"))
                continue
            errors.extend(json_value_errors(item, _path(path, key)))
        return errors
    if isinstance(value, list):
        return [error for index, item in enumerate(value) for error in json_value_errors(item, _path(path, index))]
    return []


def request_size_errors(document: dict) -> list[tuple[str, str]]:
    """The API server refuses a body over MaxRequestBodyBytes with 413 before it reads a field."""
    size = len(json.dumps(document, separators=(",", ":"), default=str).encode())
    if size > k8s_values.MAX_REQUEST_BYTES:
        return [("", f"Request entity too large: limit is {k8s_values.MAX_REQUEST_BYTES} (the object is {size} "
                     "bytes as JSON)")]
    return []


def object_meta_errors(metadata: dict) -> list[tuple[str, str]]:
    """ObjectMeta's value rules (apimachinery's ValidateObjectMeta) on an already well-typed metadata."""
    errors = []
    name, namespace = metadata.get("name"), metadata.get("namespace")
    if not name and not metadata.get("generateName"):
        errors.append(("metadata.name", "Required value: name or generateName is required"))
    elif name:
        errors.extend(("metadata.name", message) for message in k8s_values.dns1123_subdomain(name))
    if namespace is not None:
        errors.extend(("metadata.namespace", message) for message in k8s_values.dns1123_label(namespace))
    errors.extend(("metadata.labels", message) for _, message in k8s_values.labels(metadata.get("labels") or {}))
    annotations = metadata.get("annotations") or {}
    for key in annotations:
        errors.extend(("metadata.annotations", f"key {key!r}: {message}") for message in k8s_values.qualified_name(key))
    size = sum(len(key) + len(value) for key, value in annotations.items())
    if size > k8s_values.MAX_ANNOTATIONS_BYTES:
        errors.append(("metadata.annotations", f"Too long: must have at most {k8s_values.MAX_ANNOTATIONS_BYTES} "
                                               "bytes"))
    return errors


def decoded(document: dict) -> dict:
    """The object as the API server decodes it: a null metadata field is Go's zero value, i.e. absent."""
    metadata = document.get("metadata")
    if not isinstance(metadata, dict):
        return document
    return {**document, "metadata": {key: value for key, value in metadata.items() if value is not None}}


def _go_value(value: Any) -> str:
    """How apimachinery's field.Duplicate prints a value: strings quoted, map keys as a Go map literal."""
    if isinstance(value, dict):
        pairs = ", ".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in value.items())
        return "map[string]interface {}{" + pairs + "}"
    return json.dumps(value)


def _duplicates(keys: list) -> list[int]:
    """Index of the second occurrence of each repeated key (the API server reports each repeat once)."""
    seen: dict[str, int] = {}
    repeated = []
    for index, key in enumerate(keys):
        canonical = json.dumps(key, sort_keys=True)
        seen[canonical] = seen.get(canonical, 0) + 1
        if seen[canonical] == 2:
            repeated.append(index)
    return repeated


def list_type_errors(schema: dict, value: Any, path: str = "") -> list[tuple[str, str]]:
    """Duplicates in `x-kubernetes-list-type` set and map lists, in the API server's words
    (kubernetes apiextensions-apiserver pkg/apiserver/schema/listtype/validation.go)."""
    errors: list[tuple[str, str]] = []
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = properties.get(key, extra if isinstance(extra, dict) else None)
            if sub:
                errors.extend(list_type_errors(sub, item, _path(path, key)))
    elif isinstance(value, list):
        list_type = schema.get("x-kubernetes-list-type")
        if list_type == "set":
            errors.extend((_path(path, i), f"Duplicate value: {_go_value(value[i])}") for i in _duplicates(value))
        elif list_type == "map":
            key_fields = schema.get("x-kubernetes-list-map-keys") or []
            keys = [{k: item[k] for k in key_fields if k in item} if isinstance(item, dict) else {} for item in value]
            errors.extend((_path(path, i), f"Duplicate value: {_go_value(keys[i])}") for i in _duplicates(keys))
        for index, item in enumerate(value):
            errors.extend(list_type_errors(schema.get("items") or {}, item, _path(path, index)))
    return errors

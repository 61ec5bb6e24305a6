"""A tiny builder for Kubernetes structural OpenAPI v3 schemas.

The API of kubetune is written once with these helpers (see `v1alpha1/`); the CRDs, the
defaulting, the structural validation and the CEL rule checks are all derived from that one tree,
so the cluster and `kubetune validate` can never disagree about what a field means.

Every helper returns a plain ``dict`` in the exact shape the API server stores, which keeps the
generated YAML obvious and lets tests compare it byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

Schema = dict[str, Any]

# resource.Quantity's syntax without the minus sign: requests, limits and sizes are never negative
QUANTITY_PATTERN = (
    r"^(\+)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


def _base(kind: str, description: str, default: Any = None, **extra: Any) -> Schema:
    if not description:
        raise ValueError("every field carries a description, so `kubectl explain` helps")
    schema: Schema = {"type": kind, "description": description}
    if default is not None:
        schema["default"] = default
    schema.update({k: v for k, v in extra.items() if v is not None})
    return schema


def string(
    description: str,
    *,
    default: str | None = None,
    enum: Iterable[str] | None = None,
    pattern: str | None = None,
    min_length: int | None = None,
    max_length: int | None = None,
    fmt: str | None = None,
) -> Schema:
    return _base(
        "string",
        description,
        default,
        enum=list(enum) if enum is not None else None,
        pattern=pattern,
        minLength=min_length,
        maxLength=max_length,
        format=fmt,
    )


def integer(
    description: str,
    *,
    default: int | None = None,
    minimum: int | None = None,
    maximum: int | None = None,
    enum: Iterable[int] | None = None,
) -> Schema:
    return _base(
        "integer",
        description,
        default,
        minimum=minimum,
        maximum=maximum,
        enum=list(enum) if enum is not None else None,
        format="int64",
    )


def number(
    description: str,
    *,
    default: float | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool | None = None,
    exclusive_maximum: bool | None = None,
) -> Schema:
    return _base(
        "number",
        description,
        default,
        minimum=minimum,
        maximum=maximum,
        exclusiveMinimum=exclusive_minimum,
        exclusiveMaximum=exclusive_maximum,
    )


def boolean(description: str, *, default: bool | None = None) -> Schema:
    return _base("boolean", description, default)


def rule(expression: str, message: str, *, field_path: str | None = None, reason: str | None = None) -> Schema:
    """A CEL `x-kubernetes-validations` entry; the message must name the field it is about."""
    entry: Schema = {"rule": expression, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    if reason:
        entry["reason"] = reason
    return entry


def obj(
    description: str,
    properties: Mapping[str, Schema],
    *,
    required: Iterable[str] = (),
    rules: Iterable[Schema] = (),
    default: dict | None = None,
) -> Schema:
    required = list(required)
    unknown = set(required) - set(properties)
    if unknown:
        raise ValueError(f"required fields {sorted(unknown)} are not declared")
    schema = _base("object", description, default)
    schema["properties"] = dict(properties)
    if required:
        schema["required"] = required
    rules = list(rules)
    if rules:
        schema["x-kubernetes-validations"] = rules
    return schema


def array(
    description: str,
    items: Schema,
    *,
    default: list | None = None,
    min_items: int | None = None,
    max_items: int | None = None,
    list_type: str | None = None,
    map_keys: Iterable[str] = (),
    rules: Iterable[Schema] = (),
) -> Schema:
    """`list_type` set: duplicates are refused; map: items are keyed by `map_keys` (each required)."""
    schema = _base("array", description, default, minItems=min_items, maxItems=max_items)
    schema["items"] = items
    if list_type:
        schema["x-kubernetes-list-type"] = list_type
    if map_keys:
        schema["x-kubernetes-list-map-keys"] = list(map_keys)
    rules = list(rules)
    if rules:
        schema["x-kubernetes-validations"] = rules
    return schema


def string_map(description: str, *, max_properties: int | None = None, min_properties: int | None = None) -> Schema:
    schema = _base("object", description, maxProperties=max_properties, minProperties=min_properties)
    schema["additionalProperties"] = {"type": "string"}
    return schema


def quantity(description: str, *, default: str | None = None) -> Schema:
    """A Kubernetes resource quantity (``16Gi``, ``500m``, ``2``)."""
    schema: Schema = {
        "description": description,
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "pattern": QUANTITY_PATTERN,
        "x-kubernetes-int-or-string": True,
    }
    if default is not None:
        schema["default"] = default
    return schema


def quantity_map(description: str) -> Schema:
    schema = _base("object", description)
    schema["additionalProperties"] = {
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "pattern": QUANTITY_PATTERN,
        "x-kubernetes-int-or-string": True,
    }
    return schema


def opaque_object(description: str) -> Schema:
    """A Kubernetes core type (affinity, toleration...) passed through untouched; the API server
    that receives the child object validates it."""
    schema = _base("object", description)
    schema["x-kubernetes-preserve-unknown-fields"] = True
    return schema


# --- walking a schema together with a value --------------------------------------------------------


def is_object(schema: Schema) -> bool:
    return schema.get("type") == "object" and "properties" in schema


def apply_defaults(schema: Schema, value: Any) -> Any:
    """Return a deep copy of ``value`` with schema defaults filled in, as the API server does:
    a default applies where the field is absent and its parent object is present."""
    if isinstance(value, dict) and is_object(schema):
        result = {k: v for k, v in value.items()}
        for name, sub in schema["properties"].items():
            if name not in result and "default" in sub:
                result[name] = _copy(sub["default"])
            if name in result:
                result[name] = apply_defaults(sub, result[name])
        return result
    if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        return {k: apply_defaults(schema["additionalProperties"], v) for k, v in value.items()}
    if isinstance(value, list) and "items" in schema:
        return [apply_defaults(schema["items"], item) for item in value]
    return _copy(value)


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def strict_json_schema(schema: Schema) -> Schema:
    """The same schema with unknown fields forbidden, for client-side validation.

    The API server prunes unknown fields silently; `kubetune validate` reports them instead, because
    a typo such as ``learningrate`` would otherwise train with the default and nobody would know.
    """
    out: Schema = {}
    for key, value in schema.items():
        if key in ("x-kubernetes-validations", "x-kubernetes-int-or-string", "description"):
            continue
        if key == "properties":
            out[key] = {name: strict_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = strict_json_schema(value)
        elif key == "anyOf":
            out[key] = [strict_json_schema(sub) for sub in value]
        else:
            out[key] = value
    if is_object(schema) and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    if schema.get("x-kubernetes-int-or-string"):
        # the pattern only constrains the string form
        out.pop("pattern", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string", "pattern": schema.get("pattern", ".*")}]
    return out


def iter_rules(schema: Schema, value: Any, path: str = ""):
    """Yield ``(path, rule, value_at_path)`` for every CEL rule that applies to a present value."""
    for entry in schema.get("x-kubernetes-validations", []):
        yield path, entry, value
    if isinstance(value, dict) and is_object(schema):
        for name, sub in schema["properties"].items():
            if name in value:
                yield from iter_rules(sub, value[name], f"{path}.{name}" if path else name)
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            yield from iter_rules(schema["items"], item, f"{path}[{index}]")


def iter_fields(schema: Schema, path: str = ""):
    """Yield ``(path, schema)`` for every declared field; used by the reference and coverage tests."""
    yield path, schema
    if is_object(schema):
        for name, sub in schema["properties"].items():
            yield from iter_fields(sub, f"{path}.{name}" if path else name)
    elif schema.get("type") == "array" and isinstance(schema.get("items"), dict):
        yield from iter_fields(schema["items"], f"{path}[]")

"""The API reference page (docs/reference.md), generated from the same definition as the CRDs.

`kubectl explain finetunejob.spec.training` shows the same descriptions field by field; this page shows
them all at once, with types, defaults, bounds and the validation rules (CEL) with their messages.
"""

from __future__ import annotations

import json

from . import v1alpha1 as api
from .schema import Schema, is_object, iter_fields

HEADER = ("<!-- Generated from operator/kubetune/api/v1alpha1/ by `kubetune generate`. Do not edit. -->\n\n"
          "# API reference: kubetune.io/v1alpha1\n\n"
          "Every field of every kind, as the CRDs define it (`kubectl explain <kind>.<path>` shows the same "
          "descriptions). Types follow OpenAPI; `[]` marks the items of a list. Rules are CEL validations the "
          "API server runs on admission, with the message it answers; `kubetune validate -f FILE` runs the same "
          "rules and the semantic checks before anything reaches a cluster.\n")


def _type(schema: Schema) -> str:
    kind = schema.get("type", "")
    if kind == "array":
        return f"list of {_type(schema.get('items') or {})}"
    if kind == "object" and not is_object(schema):
        if isinstance(schema.get("additionalProperties"), dict):
            return f"map of {_type(schema['additionalProperties'])}"
        return "object (free-form)" if schema.get("x-kubernetes-preserve-unknown-fields") else "object"
    if kind == "string" and schema.get("format"):
        return f"string ({schema['format']})"
    return kind


def _constraints(schema: Schema) -> str:
    parts = []
    if "enum" in schema:
        parts.append("one of " + ", ".join(f"`{v}`" for v in schema["enum"]))
    for key, label in (("minimum", "≥"), ("maximum", "≤"), ("minLength", "min length"),
                       ("maxLength", "max length"), ("minItems", "min items"), ("maxItems", "max items")):
        if key in schema:
            parts.append(f"{label} {schema[key]}")
    if "pattern" in schema:
        parts.append(f"pattern `{schema['pattern']}`")
    return "; ".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(schema: Schema) -> str:
    if "default" not in schema:
        return ""
    value = schema["default"]
    if value == {}:
        return ""  # an object defaulted only so its fields' defaults apply
    return f"`{json.dumps(value)}`"


def _fields(root: Schema, prefix: str) -> list[str]:
    lines = ["| Field | Type | Default | Constraints | Description |", "|---|---|---|---|---|"]
    required_of: dict[str, set] = {}
    for path, schema in iter_fields(root):
        required_of[path] = set(schema.get("required") or [])
        if not path:
            continue
        parent, _, name = path.rpartition(".")
        name = name.removesuffix("[]")
        mark = " (required)" if name in required_of.get(parent, set()) else ""
        lines.append(f"| `{prefix}.{path}`{mark} | {_type(schema)} | {_default(schema)} | "
                     f"{_cell(_constraints(schema))} | {_cell(schema.get('description', ''))} |")
    return lines


def _rules(root: Schema, prefix: str) -> list[str]:
    lines = []
    for path, schema in iter_fields(root):
        for entry in schema.get("x-kubernetes-validations") or []:
            where = f"`{prefix}.{path}`" if path else f"`{prefix}`"
            lines.append(f"- {where}: {_cell(entry['message'])} (`{_cell(entry['rule'])}`)")
    return lines


def reference_markdown() -> str:
    out = [HEADER]
    for kind, info in api.KINDS.items():
        out.append(f"## {kind}\n")
        out.append(f"{info['description']} Short name `{info['shortNames'][0]}`; "
                   f"`kubectl get {info['plural']}` columns: "
                   + ", ".join(c["name"] for c in info["printerColumns"]) + ".\n")
        out.append("### spec\n")
        out += _fields(info["spec"], "spec")
        rules = _rules(info["spec"], "spec")
        if rules:
            out.append("\n#### Validation rules\n")
            out += rules
        out.append("\n### status (written by the operator only)\n")
        out += _fields(info["status"], "status")
        out.append("")
    return "\n".join(out).rstrip() + "\n"

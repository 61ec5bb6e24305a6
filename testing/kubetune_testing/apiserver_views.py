"""What the Kubernetes API server computes for clients such as kubectl, from the project's CRDs:
server-side printing (Tables from additionalPrinterColumns), OpenAPI v3 documents (`kubectl explain`,
client-side validation), field selectors and the kinds' discovery names. The emulator serves them so
the README's and docs' real kubectl commands run against it; the rules follow the API server's
(apiextensions-apiserver's tableconvertor, apimachinery's HumanDuration, the core Events table).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from kubetune_operator.reconcile.finetunejob import status_patch

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "crds"
TABLE_ACCEPT = "as=Table"
PARTIAL_METADATA_ACCEPT = "as=PartialObjectMetadata"


@cache
def crds() -> dict[tuple[str, str, str], dict]:
    """(group, version, plural) → the CRD, for every CRD the project ships."""
    out = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        spec = crd["spec"]
        for version in spec["versions"]:
            out[(spec["group"], version["name"], spec["names"]["plural"])] = crd
    return out


def crd_version(crd: dict, version: str) -> dict:
    return next(v for v in crd["spec"]["versions"] if v["name"] == version)


# --- time -----------------------------------------------------------------------------------------

def human_duration(seconds: float) -> str:
    """k8s.io/apimachinery/pkg/util/duration.HumanDuration, as `kubectl get` shows ages."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 60 * 2:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m" if s % 60 == 0 else f"{minutes}m{s % 60}s"
    if minutes < 60 * 3:
        return f"{minutes}m"
    hours = s // 3600
    if hours < 8:
        return f"{hours}h" if minutes % 60 == 0 else f"{hours}h{minutes % 60}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d" if hours % 24 == 0 else f"{hours // 24}d{hours % 24}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = (hours // 24) % 365
        return f"{hours // 24 // 365}y" if days == 0 else f"{hours // 24 // 365}y{days}d"
    return f"{hours // 24 // 365}y"


def age(timestamp: str | None, now: datetime.datetime | None = None) -> str:
    if not timestamp:
        return "<unknown>"
    when = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    now = now or datetime.datetime.now(datetime.UTC)
    return human_duration((now - when).total_seconds())


# --- JSONPath (the subset printer columns and field selectors use) ---------------------------------

_STEP = re.compile(r"""\.([A-Za-z0-9_-]+)|\[(\d+)\]|\[\?\(@\.([A-Za-z0-9_.-]+)\s*==\s*["']([^"']*)["']\)\]""")


def jsonpath(obj: Any, path: str) -> Any:
    """The first result of a printer column's JSONPath (`.a.b[0].c`, `[?(@.type=="Ready")]`), or
    None when nothing matches (the API server then prints `<none>`)."""
    position, current = 0, obj
    while position < len(path):
        match = _STEP.match(path, position)
        if match is None:
            raise ValueError(f"unsupported JSONPath {path!r} at {path[position:]!r}")
        position = match.end()
        key, index, filter_key, filter_value = match.groups()
        if key is not None:
            current = current.get(key) if isinstance(current, dict) else None
        elif index is not None:
            current = current[int(index)] if isinstance(current, list) and int(index) < len(current) else None
        else:
            current = next((item for item in current or [] if isinstance(item, dict)
                            and str(jsonpath(item, "." + filter_key)) == filter_value), None)
        if current is None:
            return None
    return current


# --- field selectors -------------------------------------------------------------------------------

def field_selector_terms(selector: str | None) -> list[tuple[str, str, bool]]:
    """`a.b=v,c!=w` as (field, value, negated) terms."""
    terms = []
    for term in filter(None, (t.strip() for t in (selector or "").split(","))):
        negate = "!=" in term
        key, value = term.split("!=" if negate else "=", 1)
        terms.append((key.strip(), value.lstrip("=").strip(), negate))
    return terms


def field_selector_equalities(selector: str | None) -> dict[str, str]:
    """The fields a selector pins to one value (the emulator's index narrows a LIST by them)."""
    return {key: value for key, value, negate in field_selector_terms(selector) if not negate}


def field_selector_matches(selector: str | None, obj: dict) -> bool:
    """`a.b=v,c!=w` over the object's fields (metadata.name, involvedObject.uid, ...)."""
    for key, value, negate in field_selector_terms(selector):
        actual = jsonpath(obj, "." + key)
        if (str(actual) if actual is not None else "") == value:
            if negate:
                return False
        elif not negate:
            return False
    return True


# --- server-side printing --------------------------------------------------------------------------

def _column(name: str, type_: str = "string", description: str = "", priority: int = 0, fmt: str = "") -> dict:
    return {"name": name, "type": type_, "format": fmt, "description": description, "priority": priority}


def _cell(column: dict, value: Any) -> Any:
    """apiextensions' cellForJSONValue: dates become ages, numbers stay numbers."""
    if value is None:
        return None
    kind = column["type"]
    if kind == "date" and isinstance(value, str):
        try:
            return age(value)
        except ValueError:
            return value
    if kind == "integer" and isinstance(value, int | float):
        return int(value)
    if kind == "number" and isinstance(value, int | float):
        return value
    if kind == "boolean" and isinstance(value, bool):
        return value
    if kind == "string":
        return value if isinstance(value, str) else json.dumps(value)
    return value


def partial_metadata(obj: dict) -> dict:
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj.get("metadata", {})}


DEFAULT_COLUMNS = [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp",
                    "description": "CreationTimestamp is a timestamp representing the server time when this "
                                   "object was created."}]


def _event_rows(objects: list[dict]) -> tuple[list[dict], list[dict]]:
    """The core Events table (pkg/printers/internalversion: printEvent)."""
    columns = [_column("Last Seen", "string"), _column("Type", "string"), _column("Reason", "string"),
               _column("Object", "string"), _column("Subobject", priority=1), _column("Source", priority=1),
               _column("Message"), _column("First Seen", priority=1), _column("Count", "integer", priority=1),
               _column("Name", priority=1)]
    rows = []
    for event in objects:
        involved = event.get("involvedObject") or {}
        last = event.get("lastTimestamp") or event.get("eventTime") or event["metadata"].get("creationTimestamp")
        first = event.get("firstTimestamp") or event.get("eventTime") or event["metadata"].get("creationTimestamp")
        source = (event.get("source") or {}).get("component") or event.get("reportingComponent") or ""
        rows.append({"cells": [age(last), event.get("type", ""), event.get("reason", ""),
                               f"{(involved.get('kind') or '').lower()}/{involved.get('name', '')}",
                               involved.get("fieldPath", ""), source, event.get("message", ""), age(first),
                               int(event.get("count") or 1), event["metadata"].get("name", "")],
                     "object": partial_metadata(event)})
    return columns, rows


def table(group: str, version: str, plural: str, objects: list[dict], resource_version: str) -> dict:
    """A meta.k8s.io/v1 Table for `kubectl get` (server-side printing)."""
    if (group, plural) == ("", "events"):
        columns, rows = _event_rows(objects)
    else:
        crd = crds().get((group, version, plural))
        printer = crd_version(crd, version).get("additionalPrinterColumns") if crd else None
        printer = printer or DEFAULT_COLUMNS
        columns = [_column("Name", "string", "Name must be unique within a namespace.", fmt="name")]
        columns += [_column(c["name"], c["type"], c.get("description", ""), c.get("priority", 0), c.get("format", ""))
                    for c in printer]
        rows = [{"cells": [obj["metadata"].get("name")]
                 + [_cell(col, jsonpath(obj, spec["jsonPath"]))
                    for col, spec in zip(columns[1:], printer, strict=True)],
                 "object": partial_metadata(obj)}
                for obj in objects]
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": resource_version},
            "columnDefinitions": columns, "rows": rows}


# --- OpenAPI v3 ------------------------------------------------------------------------------------

OBJECT_META = {
    "description": "ObjectMeta is metadata that all persisted resources must have.",
    "type": "object",
    "properties": {
        "name": {"type": "string", "description": "Name must be unique within a namespace."},
        "namespace": {"type": "string", "description": "Namespace defines the space within which each name "
                                                      "must be unique."},
        "labels": {"type": "object", "additionalProperties": {"type": "string"},
                   "description": "Map of string keys and values that can be used to organize and categorize "
                                  "objects."},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"},
                        "description": "Annotations is an unstructured key value map."},
        "generation": {"type": "integer", "format": "int64",
                       "description": "A sequence number representing a specific generation of the desired state."},
        "uid": {"type": "string", "description": "UID is the unique in time and space value for this object."},
    },
}
OBJECT_META_REF = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


def _schema_name(group: str, version: str, kind: str) -> str:
    if not group:
        return f"io.k8s.api.core.{version}.{kind}"
    return ".".join(reversed(group.split("."))) + f".{version}.{kind}"


def openapi_v3_group(group: str, version: str) -> dict | None:
    """The OpenAPI v3 document of one group/version, as the API server publishes it for CRDs."""
    schemas: dict[str, dict] = {OBJECT_META_REF: OBJECT_META}
    for (crd_group, crd_ver, _), crd in crds().items():
        if (crd_group, crd_ver) != (group, version):
            continue
        names = crd["spec"]["names"]
        schema = json.loads(json.dumps(crd_version(crd, version)["schema"]["openAPIV3Schema"]))
        properties = schema.setdefault("properties", {})
        properties["metadata"] = {"allOf": [{"$ref": f"#/components/schemas/{OBJECT_META_REF}"}],
                                  "description": "Standard object's metadata."}
        properties.setdefault("apiVersion", {"type": "string", "description": "APIVersion defines the versioned "
                                             "schema of this representation of an object."})
        properties.setdefault("kind", {"type": "string", "description": "Kind is a string value representing the "
                                       "REST resource this object represents."})
        gvk = {"group": group, "version": version, "kind": names["kind"]}
        schema["x-kubernetes-group-version-kind"] = [gvk]
        schemas[_schema_name(group, version, names["kind"])] = schema
        schemas[_schema_name(group, version, names["listKind"])] = {
            "type": "object", "description": f"{names['listKind']} is a list of {names['kind']}",
            "required": ["items"],
            "properties": {"items": {"type": "array", "items": {
                "$ref": f"#/components/schemas/{_schema_name(group, version, names['kind'])}"}},
                "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"}},
            "x-kubernetes-group-version-kind": [{**gvk, "kind": names["listKind"]}]}
    if len(schemas) == 1:
        return None
    paths: dict[str, dict] = {}
    for (crd_group, crd_ver, plural), crd in crds().items():
        if (crd_group, crd_ver) == (group, version):
            paths.update(_paths(group, version, plural, crd["spec"]["names"]))
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes CRD Swagger", "version": "v0.1.0"},
            "paths": paths, "components": {"schemas": schemas}}


def _paths(group: str, version: str, plural: str, names: dict, namespaced: bool = True) -> dict:
    """The operations of a namespaced custom resource, with the `fieldValidation` parameter (so kubectl
    leaves validation to the server, as with a real API server) and the GVK kubectl explain resolves."""
    gvk = {"group": group, "version": version, "kind": names["kind"]}
    ref = {"$ref": f"#/components/schemas/{_schema_name(group, version, names['kind'])}"}
    list_ref = {"$ref": f"#/components/schemas/{_schema_name(group, version, names['listKind'])}"}
    field_validation = {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": True},
                        "description": "fieldValidation instructs the server on how to handle objects in the request "
                                       "containing unknown or duplicate fields."}

    def operation(action: str, schema: dict, *params: dict) -> dict:
        return {"operationId": f"{action}{names['kind']}", "parameters": list(params),
                "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": schema}}}},
                "x-kubernetes-action": action, "x-kubernetes-group-version-kind": gvk}

    prefix = f"/apis/{group}/{version}" if group else f"/api/{version}"
    base = f"{prefix}/namespaces/{{namespace}}/{plural}" if namespaced else f"{prefix}/{plural}"
    return {
        base: {"get": operation("list", list_ref), "post": operation("post", ref, field_validation)},
        base + "/{name}": {"get": operation("get", ref), "put": operation("put", ref, field_validation),
                           "patch": operation("patch", ref, field_validation), "delete": operation("delete", ref)},
        base + "/{name}/status": {"get": operation("get", ref), "patch": operation("patch", ref, field_validation)},
    }


def openapi_v3_builtin(group: str, version: str, kinds: dict[str, tuple[str, bool]]) -> dict:
    """The document of a built-in group version, reduced to what kubectl and helm read from it: the
    GVKs, and that writes take `fieldValidation` (so they validate on the server instead of
    downloading OpenAPI v2). `kinds`: plural → (kind, namespaced)."""
    schemas: dict[str, dict] = {OBJECT_META_REF: OBJECT_META}
    paths: dict[str, dict] = {}
    for plural, (kind, namespaced) in kinds.items():
        for name in (kind, f"{kind}List"):
            schemas[_schema_name(group, version, name)] = {
                "type": "object", "description": f"{name} ({group or 'core'}/{version}).",
                "x-kubernetes-preserve-unknown-fields": True,
                "properties": {"metadata": {"allOf": [{"$ref": f"#/components/schemas/{OBJECT_META_REF}"}]}},
                "x-kubernetes-group-version-kind": [{"group": group, "version": version, "kind": name}]}
        paths.update(_paths(group, version, plural, {"kind": kind, "listKind": f"{kind}List"}, namespaced))
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.34.0"}, "paths": paths,
            "components": {"schemas": schemas}}


def openapi_v3_index(builtin: set[tuple[str, str]]) -> dict:
    """The index of OpenAPI v3 documents: one per group version (`builtin`: those not from crds/)."""
    paths = {(f"apis/{group}/{version}" if group else f"api/{version}"):
             {"serverRelativeURL": f"/openapi/v3/{'apis/' + group if group else 'api'}/{version}?hash=builtin"}
             for group, version in builtin}
    for group, version in sorted({(g, v) for g, v, _ in crds()}):
        digest = hashlib.sha256(json.dumps(openapi_v3_group(group, version), sort_keys=True).encode()).hexdigest()
        url = f"/openapi/v3/apis/{group}/{version}?hash={digest[:16]}"
        paths[f"apis/{group}/{version}"] = {"serverRelativeURL": url}
    return {"paths": paths}


GROUP = "kubetune.io"


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (what `kubectl apply` sends for custom resources)."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


# --- protobuf request bodies -----------------------------------------------------------------------
# kubectl sends built-in kinds it builds itself (`kubectl create secret generic`, `kubectl create
# namespace`) as Kubernetes protobuf: the magic `k8s\0`, then a runtime.Unknown {typeMeta {apiVersion,
# kind}, raw}, raw being the object's own message. Decoded here for the kinds such commands create.

PROTOBUF = "application/vnd.kubernetes.protobuf"
APPLY_PATCH = "application/apply-patch"
_MAGIC = b"k8s\x00"


def _fields(data: bytes) -> list[tuple[int, Any]]:
    """(field number, value) of a protobuf message: varints as int, length-delimited as bytes."""
    out, position = [], 0

    def varint() -> int:
        nonlocal position
        shift = result = 0
        while True:
            byte = data[position]
            position += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7

    while position < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            out.append((number, varint()))
        elif wire == 2:
            length = varint()
            out.append((number, data[position:position + length]))
            position += length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            out.append((number, data[position:position + size]))
            position += size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    return out


def _string_map(entries: list[bytes], decode_values: bool) -> dict:
    result = {}
    for entry in entries:
        fields = dict(_fields(entry))
        value = fields.get(2, b"")
        result[fields.get(1, b"").decode()] = value.decode() if decode_values else base64.b64encode(value).decode()
    return result


def _object_meta(data: bytes) -> dict:
    meta: dict[str, Any] = {}
    labels, annotations = [], []
    for number, value in _fields(data):
        if number in (1, 2, 3) and value:  # name, generateName, namespace
            meta[{1: "name", 2: "generateName", 3: "namespace"}[number]] = value.decode()
        elif number == 11:
            labels.append(value)
        elif number == 12:
            annotations.append(value)
    if labels:
        meta["labels"] = _string_map(labels, decode_values=True)
    if annotations:
        meta["annotations"] = _string_map(annotations, decode_values=True)
    return meta


def decode_protobuf(body: bytes) -> dict:
    """A Secret, ConfigMap or Namespace sent as protobuf, as the JSON object the API server stores."""
    if not body.startswith(_MAGIC):
        raise ValueError("not a Kubernetes protobuf body")
    unknown = dict(_fields(body[len(_MAGIC):]))
    type_meta = dict(_fields(unknown.get(1, b"")))
    api_version, kind = type_meta.get(1, b"").decode(), type_meta.get(2, b"").decode()
    fields = _fields(unknown.get(2, b""))
    obj: dict[str, Any] = {"apiVersion": api_version, "kind": kind, "metadata": {}}
    data_entries = [v for n, v in fields if n == 2]
    for number, value in fields:
        if number == 1:
            obj["metadata"] = _object_meta(value)
    if kind == "Secret":
        if data_entries:
            obj["data"] = _string_map(data_entries, decode_values=False)
        secret_type = next((v.decode() for n, v in fields if n == 3), "")
        if secret_type:
            obj["type"] = secret_type
    elif kind == "ConfigMap" and data_entries:
        obj["data"] = _string_map(data_entries, decode_values=True)
    elif kind not in ("Namespace",):
        raise ValueError(f"protobuf bodies of {kind} are not decoded by the emulator")
    return obj


def merge_patch_between(old: dict, new: dict) -> dict:
    """The JSON merge patch turning `old` into `new` (reconcile.finetunejob.status_patch), keeping what the
    server manages: status, and metadata other than labels and annotations."""
    managed = ("metadata", "status")
    patch = status_patch({k: v for k, v in old.items() if k not in managed},
                         {k: v for k, v in new.items() if k not in managed})
    user_meta = ("labels", "annotations")
    old_meta, new_meta = old.get("metadata") or {}, new.get("metadata") or {}
    meta = status_patch({k: v for k, v in old_meta.items() if k in user_meta},
                        {k: v for k, v in new_meta.items() if k in user_meta})
    if meta:
        patch["metadata"] = meta
    return patch


def secret_string_data(secret: Any) -> None:
    """The API server's write-only `stringData`: merged into `data` (base64) and never stored."""
    if isinstance(secret, dict) and isinstance(secret.get("stringData"), dict):
        data = secret.setdefault("data", {}) or {}
        for key, value in secret.pop("stringData").items():
            data[key] = base64.b64encode(str(value).encode()).decode()
        secret["data"] = data

"""The API server's checks of every write, as the emulator's `checks` hook: a body over 3 MiB is 413
(apiserver's MaxRequestBodyBytes), duplicate and unknown metadata fields follow `fieldValidation`
(handlers/create.go, patch.go: Strict refuses, Warn (the default) adds a `Warning` header each and drops
unknown fields, Ignore is silent), and the object the write leaves is refused as `object_meta` says
(422, or the Kubeflow workloads' own admission answer).
"""

from __future__ import annotations

import copy
import json
from typing import TYPE_CHECKING, Any

import aiohttp.web
import jsonpatch
import kmock

from kubetune.api import k8s_values as kv
from kubetune_testing import apiserver_views as views
from kubetune_testing import object_meta

if TYPE_CHECKING:
    from kubetune_testing.emulator import K8sEmulator

METADATA_FIELDS = frozenset({
    "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation", "creationTimestamp",
    "deletionTimestamp", "deletionGracePeriodSeconds", "labels", "annotations", "ownerReferences", "finalizers",
    "managedFields"})
JSON_TYPES = ("application/json", "application/merge-patch+json", "application/strategic-merge-patch+json")


class _Pairs(list):
    """A JSON object as its (key, value) pairs, duplicates kept."""


def duplicate_fields(body: bytes) -> list[str]:
    """The paths of fields given twice in a JSON body (`metadata.name`, `spec.containers[0].image`)."""
    try:
        parsed = json.loads(body, object_pairs_hook=_Pairs)
    except (ValueError, RecursionError):
        return []
    found: list[str] = []

    def walk(value: Any, path: str) -> None:
        if isinstance(value, _Pairs):
            seen: set[str] = set()
            for key, item in value:
                where = f"{path}.{key}" if path else key
                if key in seen:
                    found.append(where)
                seen.add(key)
                walk(item, where)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, f"{path}[{i}]")
    walk(parsed, "")
    return list(dict.fromkeys(found))


def unknown_metadata_fields(data: Any) -> list[str]:
    meta = data.get("metadata") if isinstance(data, dict) else None
    # `$patch`, `$setElementOrder/...`: strategic merge patch directives, not fields
    return [f"metadata.{key}" for key in meta if key not in METADATA_FIELDS and not str(key).startswith("$")] \
        if isinstance(meta, dict) else []


def _status(code: int, reason: str, message: str, details: dict | None = None) -> aiohttp.web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, **({"details": details} if details else {}), "code": code}
    return aiohttp.web.json_response(body, status=code)


def _strict_decoding(k8s: K8sEmulator, request: kmock.Request, warnings: list[str]) -> aiohttp.web.Response | None:
    """fieldValidation on duplicate fields and unknown metadata fields of a JSON body."""
    content_type = (request.headers.get("Content-Type") or "").split(";")[0].strip()
    problems = [f'duplicate field "{p}"' for p in duplicate_fields(request.body)] if content_type in JSON_TYPES \
        else []
    unknown = unknown_metadata_fields(request.data)
    problems += [f'unknown field "{p}"' for p in unknown]
    directive = request.params.get("fieldValidation") or "Warn"
    if not problems or directive == "Ignore":
        pass
    elif directive == "Strict":
        message = "strict decoding error: " + ", ".join(problems)
        kind = k8s._kind(request) or request.resource.plural
        if request.action == kmock.action.CREATE or getattr(request._raw_request, "method", "") == "PUT":
            message = f'{kind} in version "{request.resource.version}" cannot be handled as a {kind}: {message}'
        return _status(400, "BadRequest", message)
    else:
        warnings.extend(problems)
    for path in unknown:  # Warn and Ignore drop them, as decoding into ObjectMeta does
        request.data["metadata"].pop(path.removeprefix("metadata."))
    return None


def candidate(k8s: K8sEmulator, request: kmock.Request) -> dict | None:
    """The object a create or main-resource update would store (None: nothing to validate here)."""
    if request.subresource is not None or request.resource is None:
        return None
    if request.action == kmock.action.CREATE and isinstance(request.data, dict):
        meta = request.data.get("metadata") if isinstance(request.data.get("metadata"), dict) else {}
        # the namespace of the URL is the object's before validation (rest.BeforeCreate)
        return {**request.data, "metadata": {"namespace": request.namespace, **meta}} if request.namespace \
            else request.data
    key = (request.resource, request.namespace, request.name)
    if request.action != kmock.action.UPDATE or key not in k8s.objects or k8s.objects[key].deleted:
        return None
    old = copy.deepcopy(k8s.objects[key].raw)
    if isinstance(request.data, dict):
        return views.merge_patch(old, request.data)
    try:
        return jsonpatch.apply_patch(old, request.data) if isinstance(request.data, list) else None
    except jsonpatch.JsonPatchException:
        return None  # the write itself answers 422


def check(k8s: K8sEmulator, request: kmock.Request, warnings: list[str]) -> aiohttp.web.Response | None:
    """The emulator's hook: a refusal for this write, or None (and `warnings` for its response)."""
    if request.resource is None or request.action not in (kmock.action.CREATE, kmock.action.UPDATE):
        return None
    if len(request.body or b"") > kv.MAX_REQUEST_BYTES:
        return _status(413, "RequestEntityTooLarge", f"Request entity too large: limit is {kv.MAX_REQUEST_BYTES}")
    refusal = _strict_decoding(k8s, request, warnings)
    if refusal is not None:
        return refusal
    obj = candidate(k8s, request)
    if obj is None:
        return None
    group, kind = request.resource.group, k8s._kind(request) or ""
    info = k8s.resources[request.resource] if request.resource in k8s.resources else None  # noqa: SIM401
    found = object_meta.errors(group, kind, obj, namespaced=bool(info is None or info.namespaced))
    if found:
        name = (obj.get("metadata") or {}).get("name") or request.name or ""
        body = object_meta.invalid(group, kind, name, found)
        return aiohttp.web.json_response(body, status=422)
    refusal_body = object_meta.workload_refusal(group, kind, obj)
    return None if refusal_body is None else aiohttp.web.json_response(refusal_body, status=refusal_body["code"])

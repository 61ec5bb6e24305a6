"""The API server's validation of any kind's object, as a pure function, in its words: ObjectMeta
(apimachinery/pkg/api/validation/objectmeta.go), the per-kind name rules and the parts of built-in kinds
kubetune fills (pkg/apis/core/validation/validation.go: ConfigMap/Secret keys, pod templates, Services;
apps/validation: Deployment selectors), Kubeflow's PyTorchJob webhook (training-operator pkg/webhooks/
pytorch) and TrainJob CEL name rule (kubeflow/trainer trainjob_types.go). `errors` gives field.Error
texts; `invalid` the 422 errors.NewInvalid answers. Request checks (413, duplicate and unknown fields
with fieldValidation) are in `write_checks`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubetune.api import k8s_values as kv

MAX_SECRET_BYTES = 1024 * 1024   # core.MaxSecretSize: ConfigMaps' and Secrets' data
TRAINJOB_NAME_RULE = r"[a-z]([-a-z0-9]*[a-z0-9])?"   # the TrainJob CRD's CEL rule on metadata.name
REASONS = {"Invalid value": "FieldValueInvalid", "Required value": "FieldValueRequired",
           "Forbidden": "FieldValueForbidden", "Too long": "FieldValueTooLong",
           "Duplicate value": "FieldValueDuplicate"}


@dataclass(frozen=True)
class FieldError:
    """One field.Error: its type ("Invalid value", "Required value", ...), path, bad value, detail."""
    type: str
    field: str
    value: Any = None
    detail: str = ""

    def body(self) -> str:
        """field.Error.ErrorBody: the bad value is shown unless required, forbidden or too long (%q for strings)."""
        text = self.type
        if self.type not in ("Required value", "Forbidden", "Too long"):
            text += f": {_go_value(self.value)}"
        return f"{text}: {self.detail}" if self.detail else text

    def __str__(self) -> str:
        return f"{self.field}: {self.body()}"


def _go_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, dict):  # Go's %#v of a map[string]string
        return "map[string]string{" + ", ".join(f"{json.dumps(str(k))}:{json.dumps(str(v))}"
                                                  for k, v in sorted(value.items())) + "}"
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _invalid(path: str, value: Any, messages: list[str]) -> list[FieldError]:
    return [FieldError("Invalid value", path, value, message) for message in messages]


def _path_segment(value: str) -> list[str]:
    """path.IsValidPathSegmentName: RBAC objects' names."""
    if value in (".", ".."):
        return [f"may not be '{value}'"]
    return [f"may not contain '{c}'" for c in "/%" if c in value]


# (group, kind) -> the name rule; every other kind's names are DNS-1123 subdomains
NAME_RULES: dict[tuple[str, str], Callable[[str], list[str]]] = {
    ("", "Namespace"): kv.dns1123_label,
    ("", "Service"): kv.dns1035_label,
    **{("rbac.authorization.k8s.io", kind): _path_segment
       for kind in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")},
}


def _prefix(value: str) -> str:
    """maskTrailingDash: a generateName may end with '-' (random characters follow it)."""
    return value[:-1] + "a" if len(value) > 1 and value.endswith("-") else value


def labels(mapping: Any, path: str) -> list[FieldError]:
    """v1validation.ValidateLabels: every key a qualified name, every value a label value, all at `path`."""
    if not isinstance(mapping, dict):
        return []
    found = []
    for key, value in mapping.items():
        found += _invalid(path, key, kv.qualified_name(str(key)))
        found += _invalid(path, value, kv.label_value(value) if isinstance(value, str) else ["must be a string"])
    return found


def _annotations(mapping: Any, path: str) -> list[FieldError]:
    if not isinstance(mapping, dict):
        return []
    found = [e for key in mapping for e in _invalid(path, key, kv.qualified_name(str(key).lower()))]
    size = sum(len(str(k).encode()) + len(str(v).encode()) for k, v in mapping.items())
    if size > kv.MAX_ANNOTATIONS_BYTES:
        found.append(FieldError("Too long", path, "", f"must have at most {kv.MAX_ANNOTATIONS_BYTES} bytes"))
    return found


def _owner_references(refs: Any, path: str) -> list[FieldError]:
    found: list[FieldError] = []
    controller = ""
    for ref in refs if isinstance(refs, list) else []:
        ref = ref if isinstance(ref, dict) else {}
        api_version = str(ref.get("apiVersion") or "")
        if not api_version.rpartition("/")[2]:
            found.append(FieldError("Invalid value", f"{path}.apiVersion", api_version, "version must not be empty"))
        for field in ("kind", "name", "uid"):
            if not ref.get(field):
                found.append(FieldError("Invalid value", f"{path}.{field}", str(ref.get(field) or ""),
                                        "must not be empty"))
        if ref.get("controller") is True:
            here = f"{ref.get('kind')}/{ref.get('name')}"
            if controller:
                found.append(FieldError("Invalid value", path, refs, "Only one reference can have Controller set "
                                        f'to true. Found "true" in references for {controller} and {here}'))
            controller = controller or here
    return found


def object_meta(group: str, kind: str, meta: Any, namespaced: bool = True) -> list[FieldError]:
    """ValidateObjectMetaAccessor on a create (before the name is generated from generateName)."""
    meta = meta if isinstance(meta, dict) else {}
    rule = NAME_RULES.get((group, kind), kv.dns1123_subdomain)
    found: list[FieldError] = []
    generate, name = meta.get("generateName") or "", meta.get("name") or ""
    if generate:
        found += _invalid("metadata.generateName", generate, rule(_prefix(generate)))
    if not name and not generate:
        found.append(FieldError("Required value", "metadata.name", "", "name or generateName is required"))
    elif name:
        found += _invalid("metadata.name", name, rule(name))
    namespace = meta.get("namespace")
    if namespace and namespaced:
        found += _invalid("metadata.namespace", namespace, kv.dns1123_label(namespace))
    elif namespace:
        found.append(FieldError("Forbidden", "metadata.namespace", "", "not allowed on this type"))
    found += labels(meta.get("labels"), "metadata.labels")
    found += _annotations(meta.get("annotations"), "metadata.annotations")
    found += _owner_references(meta.get("ownerReferences"), "metadata.ownerReferences")
    for finalizer in meta.get("finalizers") or []:
        found += _invalid("metadata.finalizers", finalizer, kv.qualified_name(str(finalizer)))
    return found


def _data_keys(obj: dict, fields: tuple[str, ...]) -> list[FieldError]:
    found = []
    for field in fields:
        for key in obj.get(field) or {}:
            found += _invalid(f"{field}[{key}]", key, kv.config_map_key(str(key)))
    return found


def config_map(obj: dict) -> list[FieldError]:
    found = _data_keys(obj, ("data", "binaryData"))
    binary = obj.get("binaryData") or {}
    found += [FieldError("Invalid value", f"data[{key}]", key, "duplicate of key present in binaryData")
              for key in obj.get("data") or {} if key in binary]
    size = sum(len(str(v).encode()) for v in (obj.get("data") or {}).values())
    size += sum(len(_decoded(v)) for v in binary.values())
    if size > MAX_SECRET_BYTES:
        found.append(FieldError("Too long", "", "", f"must have at most {MAX_SECRET_BYTES} bytes"))
    return found


def _decoded(value: Any) -> bytes:
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        return str(value).encode()


def secret(obj: dict) -> list[FieldError]:
    found = _data_keys(obj, ("data", "stringData"))
    size = sum(len(_decoded(v)) for v in (obj.get("data") or {}).values())
    if size > MAX_SECRET_BYTES:
        found.append(FieldError("Too long", "data", "", f"must have at most {MAX_SECRET_BYTES} bytes"))
    return found


def _resources(resources: Any, path: str) -> list[FieldError]:
    found = []
    resources = resources if isinstance(resources, dict) else {}
    for part in ("limits", "requests"):
        for name, value in (resources.get(part) or {}).items():
            where = f"{path}.{part}[{name}]"
            found += _invalid(where, name, kv.qualified_name(str(name)))
            found += _invalid(where, str(value), kv.non_negative_quantity(str(value)))
    for name, request in (resources.get("requests") or {}).items():
        limit = (resources.get("limits") or {}).get(name)
        try:
            over = limit is not None and kv.quantity(str(request)) > kv.quantity(str(limit))
        except ValueError:
            continue
        if over:
            found.append(FieldError("Invalid value", f"{path}.requests[{name}]", str(request),
                                    f"must be less than or equal to {name} limit of {limit}"))
    return found


def _container(container: Any, path: str) -> list[FieldError]:
    container = container if isinstance(container, dict) else {}
    name = container.get("name") or ""
    found = ([FieldError("Required value", f"{path}.name")] if not name
             else _invalid(f"{path}.name", name, kv.dns1123_label(name)))
    if not container.get("image"):
        found.append(FieldError("Required value", f"{path}.image"))
    for i, env in enumerate(container.get("env") or []):
        env_name = (env or {}).get("name") or ""
        where = f"{path}.env[{i}].name"
        found += ([FieldError("Required value", where)] if not env_name
                  else _invalid(where, env_name, kv.env_var_name(env_name)))
    for i, port in enumerate(container.get("ports") or []):
        if (port or {}).get("name"):
            found += _invalid(f"{path}.ports[{i}].name", port["name"], kv.port_name(port["name"]))
    return found + _resources(container.get("resources"), f"{path}.resources")


def pod_spec(spec: Any, path: str) -> list[FieldError]:
    """The parts of ValidatePodSpec kubetune's children fill."""
    spec = spec if isinstance(spec, dict) else {}
    found: list[FieldError] = []
    seen: set[str] = set()
    for field in ("initContainers", "containers"):
        for i, container in enumerate(spec.get(field) or []):
            found += _container(container, f"{path}.{field}[{i}]")
            name = (container or {}).get("name")
            if name in seen:
                found.append(FieldError("Duplicate value", f"{path}.{field}[{i}].name", name))
            seen.add(name)
    if not spec.get("containers"):
        found.append(FieldError("Required value", f"{path}.containers"))
    volumes = set()
    for i, volume in enumerate(spec.get("volumes") or []):
        name = (volume or {}).get("name") or ""
        found += _invalid(f"{path}.volumes[{i}].name", name, kv.dns1123_label(name))
        volumes.add(name)
    for field in ("initContainers", "containers"):
        for i, container in enumerate(spec.get(field) or []):
            for j, mount in enumerate((container or {}).get("volumeMounts") or []):
                if (mount or {}).get("name") not in volumes:
                    found.append(FieldError("Not found", f"{path}.{field}[{i}].volumeMounts[{j}].name",
                                            (mount or {}).get("name")))
    found += labels(spec.get("nodeSelector"), f"{path}.nodeSelector")
    for field in ("priorityClassName", "serviceAccountName"):
        if spec.get(field):
            found += _invalid(f"{path}.{field}", spec[field], kv.dns1123_subdomain(str(spec[field])))
    return found


def pod_template(template: Any, path: str) -> list[FieldError]:
    """ValidatePodTemplateSpec: its labels and annotations (at `path`.labels), then its pod spec."""
    template = template if isinstance(template, dict) else {}
    meta = template.get("metadata") or {}
    return (labels(meta.get("labels"), f"{path}.labels") + _annotations(meta.get("annotations"), f"{path}.annotations")
            + pod_spec(template.get("spec"), f"{path}.spec"))


def _selected(obj: dict) -> list[FieldError]:
    """apps/v1 workloads: a selector's matchLabels must select the template's labels."""
    spec = obj.get("spec") or {}
    match = (spec.get("selector") or {}).get("matchLabels") or {}
    found = labels(match, "spec.selector.matchLabels")
    template_labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
    if any(template_labels.get(k) != v for k, v in match.items()):
        found.append(FieldError("Invalid value", "spec.template.metadata.labels", template_labels,
                                "`selector` does not match template `labels`"))
    return found + pod_template(spec.get("template"), "spec.template")


def service(obj: dict) -> list[FieldError]:
    spec = obj.get("spec") or {}
    found = labels(spec.get("selector"), "spec.selector")
    ports = spec.get("ports") or []
    for i, port in enumerate(ports):
        name = (port or {}).get("name")
        if len(ports) > 1 and not name:
            found.append(FieldError("Required value", f"spec.ports[{i}].name"))
        elif name:
            found += _invalid(f"spec.ports[{i}].name", name, kv.port_name(name))
    return found


SPEC_RULES: dict[tuple[str, str], Callable[[dict], list[FieldError]]] = {
    ("", "ConfigMap"): config_map,
    ("", "Secret"): secret,
    ("", "Service"): service,
    ("", "Pod"): lambda obj: pod_spec(obj.get("spec"), "spec"),
    ("batch", "Job"): lambda obj: pod_template((obj.get("spec") or {}).get("template"), "spec.template"),
    ("apps", "Deployment"): _selected,
    ("apps", "StatefulSet"): _selected,
    ("apps", "ReplicaSet"): _selected,
}


def legacy_event(obj: dict) -> list[FieldError]:
    """core/v1 Events skip ObjectMeta validation for backwards compatibility (validation/events.go,
    legacyValidateEvent): kopf and kubetune name theirs `<object>.` + random characters."""
    namespace = (obj.get("metadata") or {}).get("namespace") or ""
    involved = (obj.get("involvedObject") or {}).get("namespace") or ""
    found = ([] if involved == namespace or (not involved and namespace in ("", "default"))
             else [FieldError("Invalid value", "involvedObject.namespace", involved, "does not match event.namespace")])
    return found + _invalid("namespace", namespace, kv.dns1123_subdomain(namespace) if namespace else [])


def errors(group: str, kind: str, obj: dict, namespaced: bool = True) -> list[FieldError]:
    """What the API server's validation of a `kind` object finds (generated names not yet set)."""
    obj = obj if isinstance(obj, dict) else {}
    if (group, kind) == ("", "Event"):
        return legacy_event(obj)
    found = object_meta(group, kind, obj.get("metadata"), namespaced)
    rule = SPEC_RULES.get((group, kind))
    return found + (rule(obj) if rule is not None else [])


def qualified_kind(group: str, kind: str) -> str:
    return f"{kind}.{group}" if group else kind


def invalid(group: str, kind: str, name: str, found: list[FieldError]) -> dict:
    """errors.NewInvalid's Status: `<Kind> "<name>" is invalid: <errors>` (one, or `[a, b]`), a cause each."""
    unique = list(dict.fromkeys(str(e) for e in found))
    text = unique[0] if len(unique) == 1 else "[" + ", ".join(unique) + "]"
    causes = [{"reason": REASONS.get(e.type, "FieldValueNotFound"), "message": e.body(), "field": e.field}
              for e in found]
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "code": 422,
            "reason": "Invalid", "message": f'{qualified_kind(group, kind)} "{name}" is invalid: {text}',
            "details": {"name": name, "group": group, "kind": kind, "causes": causes}}


def workload_refusal(group: str, kind: str, obj: dict) -> dict | None:
    """What Kubeflow's own admission answers for a training workload's name (else None): the PyTorchJob
    webhook's denial (403, as controller-runtime's admission.Denied) or the TrainJob CRD's CEL rule (422)."""
    name = ((obj.get("metadata") or {}).get("name")) or ""
    problems = kv.dns1035_label(name) if name else []
    if not problems:
        return None
    if (group, kind) == ("kubeflow.org", "PyTorchJob"):
        cause = f'metadata.name: Invalid value: "{name}": should match: {",".join(problems)}'
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "code": 403,
                "reason": "Forbidden", "message": 'admission webhook "validator.pytorchjob.training-operator.'
                f'kubeflow.org" denied the request: {cause}', "details": {}}
    if (group, kind) == ("trainer.kubeflow.org", "TrainJob"):
        rules = [rule for rule, broken in (("metadata.name must match RFC 1035 DNS label format",
                                            re.fullmatch(TRAINJOB_NAME_RULE, name) is None),
                                           ("metadata.name must be no more than 63 characters", len(name) > 63))
                 if broken]
        return invalid(group, kind, name, [FieldError("Invalid value", "<nil>", "object", r) for r in rules])
    return None

"""Validation of kubetune objects as the API server would do it, plus checks it cannot do.

Three layers, each reporting ``FieldError(path, message)``: structural (the generated OpenAPI schema,
unknown fields included), CEL (every ``x-kubernetes-validations`` rule on the defaulted object) and
semantic (arithmetic across sections, engine limits). `kubetune validate`, the operator and the tests
all call `validate`.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any

import cel
import jsonschema

from . import v1alpha1 as api
from .child_values import child_value_errors, cluster_uri_errors
from .crd import custom_resource_definition
from .documents import shape_errors
from .methods import facts as method_facts
from .object_rules import (
    OBJECT_META,
    decoded,
    json_value_errors,
    list_type_errors,
    object_meta_errors,
    request_size_errors,
)
from .schema import apply_defaults, iter_rules, strict_json_schema
from .v1alpha1.dataset import DATASET_FORMATS
from .v1alpha1.finetunejob import FREEZE_THAW, LORA


@dataclass(frozen=True)
class FieldError:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


@dataclass
class ValidationResult:
    errors: list[FieldError] = field(default_factory=list)
    warnings: list[FieldError] = field(default_factory=list)
    defaulted: dict | None = None

    @property
    def ok(self) -> bool:
        return not self.errors


@functools.cache
def root_schema(kind: str) -> dict:
    crd = custom_resource_definition(kind)
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@functools.cache
def _structural_validator(kind: str) -> jsonschema.Draft4Validator:
    schema = strict_json_schema(root_schema(kind))
    # the CRD cannot describe metadata (the API server owns ObjectMeta); status is never written by users
    schema["properties"]["metadata"] = OBJECT_META
    schema["properties"].pop("status", None)
    schema["additionalProperties"] = True
    return jsonschema.Draft4Validator(schema)


@functools.cache
def _compiled(rule: str):
    return cel.compile(rule)


def _coerce_numbers(schema: dict, value: Any) -> Any:
    """Kubernetes CEL sees every `type: number` field as a double, even when written as 0 or 3."""
    kind = schema.get("type")
    if kind == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        return {
            k: _coerce_numbers(props.get(k, extra if isinstance(extra, dict) else {}), v) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_coerce_numbers(schema.get("items", {}), v) for v in value]
    return value


def _json_path(parts) -> str:
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _readable(instance: Any, message: str) -> str:
    """jsonschema starts its messages with the value's Python repr: keep it where it reads as what the
    user wrote ('csv', [4], 1024), describe it where it would show Python (None, True) or run long."""
    shown = repr(instance)
    if not message.startswith(shown) or (len(shown) <= 80 and not re.search(r"\bNone\b|\bTrue\b|\bFalse\b|\\", shown)):
        return message
    described = {type(None): "null", bool: str(instance).lower(), str: f"a string of {len(str(instance))} characters",
                 list: f"a list of {len(instance) if isinstance(instance, list) else 0} items",
                 dict: "an object"}.get(type(instance), "a value")
    return described + message[len(shown):]


def structural_errors(kind: str, document: dict) -> list[FieldError]:
    """What stops the API server before CEL: the request (size, JSON values), then the structural
    schema with strict fields (ObjectMeta's included)."""
    early = json_value_errors(document) or request_size_errors(document)
    if early:
        return [FieldError(path, message) for path, message in early]
    return _schema_errors(kind, document)


def object_errors(kind: str, document: dict) -> list[FieldError]:
    """ObjectMeta's value rules and list-type uniqueness on a structurally valid object: the API server
    reports them together with the CEL rules' errors (they do not stop CEL)."""
    found = object_meta_errors(document.get("metadata") or {}) + list_type_errors(root_schema(kind), document)
    return [FieldError(path, message) for path, message in found]


def shown(value: Any) -> str:
    """A value in an error: strings and numbers as before ('abc', 3), anything else as JSON (null, [])."""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return repr(value)
    return json.dumps(value, default=str)


def _schema_errors(kind: str, document: dict) -> list[FieldError]:
    errors = []
    for error in sorted(_structural_validator(kind).iter_errors(document), key=lambda e: list(e.absolute_path)):
        path = _json_path(error.absolute_path)
        message = _readable(error.instance, error.message)
        if error.validator == "additionalProperties":
            known = error.schema.get("properties", {})
            for name in [key for key in error.instance if key not in known]:  # any key, quotes included
                errors.append(FieldError(f"{path}.{name}" if path else name, "unknown field"))
            continue
        if error.validator == "required":
            missing = error.message.split("'")[1]
            path = f"{path}.{missing}" if path else missing
            message = "required field is missing"
        if error.validator == "anyOf":  # an int-or-string (a quantity): say what the string form missed
            message = next((sub.message for sub in error.context if sub.validator == "pattern"),
                           f"{shown(error.instance)} is not a quantity (a string such as 16Gi or 500m, or an integer)")
        if message.startswith(repr(error.instance)):  # the value as the user wrote it, not as Python shows it
            message = shown(error.instance) + message.removeprefix(repr(error.instance))
        if error.validator == "type":  # null is accepted where Go's zero value is (metadata): never name it
            wanted = [t for t in ([error.validator_value] if isinstance(error.validator_value, str)
                                  else error.validator_value) if t != "null"]
            message = f"{shown(error.instance)} is not of type " + " or ".join(repr(t) for t in wanted)
        errors.append(FieldError(path, message))
    return errors


def cel_errors(kind: str, document: dict) -> list[FieldError]:
    """Evaluate every CEL rule on the (defaulted) document, as the API server does on create."""
    root = root_schema(kind)
    coerced = _coerce_numbers(root, document)
    errors = []
    for path, entry, value in iter_rules(root, coerced):
        program = _compiled(entry["rule"])
        if "oldSelf" in program.variables():
            continue  # transition rules apply to updates only
        where = (path + entry.get("fieldPath", "")).lstrip(".")
        try:
            passed = program.execute({"self": value})
        except (KeyError, TypeError, RuntimeError, IndexError, ValueError, ZeroDivisionError) as exc:
            # a user needs the field and the problem, never the rule's source or the engine's internals
            reason = type(exc).__name__.removesuffix("Error").lower() or "error"
            errors.append(FieldError(where, f"could not be checked: a value it needs is missing or of the wrong "
                                            f"type ({reason})"))
            continue
        if passed is not True:
            errors.append(FieldError(where, entry["message"]))
    return errors


def world_size(spec: dict) -> int:
    distributed = spec.get("distributed", {})
    per_node = distributed.get("gpusPerNode", 1) or distributed.get("processesPerNode", 1)
    return distributed.get("nodes", 1) * per_node


def semantic_errors(spec: dict, *, local: bool = False) -> tuple[list[FieldError], list[FieldError]]:
    """Checks that need arithmetic across sections. Expects a defaulted spec.

    `local`: the job runs on this machine (`kubetune local`), where a file:// output is fine.
    """
    errors: list[FieldError] = []
    warnings: list[FieldError] = []
    if not local and spec.get("output", {}).get("uri", "").startswith("file://"):
        errors.append(FieldError("spec.output.uri", "file:// outputs work only with `kubetune local`; in a cluster "
                                 "use s3://BUCKET/PREFIX"))
    training = spec.get("training", {})
    distributed = spec.get("distributed", {})
    method = method_facts(spec)
    deepspeed = distributed.get("deepspeed", {})
    world = world_size(spec)

    per_device = training.get("perDeviceBatchSize", 1)  # unset: derived as a divisor (training_defaults)
    effective = training.get("effectiveBatchSize")
    if effective is not None and effective % (per_device * world):
        errors.append(
            FieldError(
                "spec.training.effectiveBatchSize",
                f"{effective} is not a multiple of perDeviceBatchSize x world size = {per_device} x {world}; "
                f"gradient accumulation must be a whole number (try {per_device * world * max(1, round(effective / (per_device * world)))})",  # noqa: E501
            )
        )
    if method and method.changes_trainable_params and deepspeed.get("enabled", True) and world > 1:
        errors.append(
            FieldError(
                "spec.distributed.deepspeed.enabled",
                "method FreezeThaw unfreezes blocks during the run, which a DeepSpeed engine cannot do after it "
                "is built; set distributed.deepspeed.enabled to false (DDP) or use one process",
            )
        )
    if distributed.get("gpusPerNode", 1) == 0 and training.get("precision") == "FP16":
        errors.append(
            FieldError("spec.training.precision", "FP16 with loss scaling needs GPUs; use FP32 or BF16 on CPU")
        )
    if method and method.quantized and deepspeed.get("enabled", True) and deepspeed.get("offloadParams"):
        errors.append(
            FieldError(
                "spec.distributed.deepspeed.offloadParams",
                "4-bit quantized weights cannot be offloaded by DeepSpeed; turn offloadParams off for QLoRA",
            )
        )
    if training.get("maxSteps") and training.get("checkpointSteps", 500) > training["maxSteps"]:
        warnings.append(
            FieldError(
                "spec.training.checkpointSteps",
                f"{training['checkpointSteps']} > maxSteps {training['maxSteps']}: no intermediate checkpoint, "
                "a restarted run starts over",
            )
        )
    return errors, warnings


SETTINGS_SCHEMAS = {"lora": LORA, "freezeThaw": FREEZE_THAW}  # a method's settings section


def resolve_method_defaults(spec: dict) -> dict:
    """Fill the section of the chosen method with its defaults (`lora` for LoRA/QLoRA, `freezeThaw`
    for FreezeThaw). The CRD cannot default them itself: they are forbidden for the other methods."""
    method = dict(spec.get("method", {}))
    facts = method_facts(spec)
    if facts and facts.settings:
        method[facts.settings] = apply_defaults(SETTINGS_SCHEMAS[facts.settings], method.get(facts.settings, {}))
    return {**spec, "method": method}


RETRAIN_PLACEHOLDER_DATA = "s3://kubetune-placeholder/retrain/train.jsonl"


def retrain_template_errors(adep: dict, *, local: bool = False) -> list[FieldError]:
    """Each adapter's drift.retrain.template must make a valid FineTuneJob once the operator fills in
    the data (found at admission, not when drift strikes months later). Errors point into the template."""
    errors: list[FieldError] = []
    namespace = adep.get("metadata", {}).get("namespace") or "default"
    for index, adapter in enumerate(adep["spec"].get("adapters") or []):
        retrain = (adapter.get("drift") or {}).get("retrain")
        if not retrain:
            continue
        base = f"spec.adapters[{index}].drift.retrain.template.spec"
        spec = dict(retrain["template"].get("spec") or {})
        dataset = spec.get("dataset") or {}
        for owned in ("uri", "validationUri", "validationSplit"):
            if owned in dataset:
                errors.append(FieldError(f"{base}.dataset.{owned}", "is filled in by the operator (the serving "
                                                                    "adapter's data plus the new labelled data)"))
        if "evaluation" in spec:
            errors.append(FieldError(f"{base}.evaluation", "is filled in by the operator (the promotion gate's sets)"))
        if errors:
            continue
        # without a format the operator takes the serving adapter's (from its manifest) at retrain time
        fmt = dataset.get("format") or ("text-label" if spec.get("task") == "SequenceClassification"
                                        else DATASET_FORMATS[0])
        spec["dataset"] = {**dataset, "format": fmt, "uri": RETRAIN_PLACEHOLDER_DATA,
                           "validationUri": RETRAIN_PLACEHOLDER_DATA}
        job = {"apiVersion": api.API_VERSION, "kind": "FineTuneJob",
               "metadata": {"name": "retrain-template", "namespace": namespace}, "spec": spec}
        for error in validate(job, local=local).errors:
            path = error.path.removeprefix("spec")
            errors.append(FieldError(base + path, error.message))
    return errors


def validate(document: dict, *, local: bool = False) -> ValidationResult:
    """Validate a kubetune object; on success `defaulted` holds it with schema defaults applied.

    `local`: validate for `kubetune local` (file:// outputs allowed) instead of a cluster."""
    result = ValidationResult()
    if not isinstance(document, dict):
        got = "nothing" if document is None else type(document).__name__.replace("str", "a string")
        result.errors.append(FieldError("", f"must be an object (a mapping of fields), got {got}"))
        return result
    result.errors.extend(FieldError(path, message) for path, message in shape_errors(document))
    if result.errors:
        return result  # nothing below can read a top level of the wrong shape
    api_version, kind = document.get("apiVersion"), document.get("kind")
    if api_version != api.API_VERSION:
        got = "nothing" if api_version is None else shown(api_version)
        result.errors.append(FieldError("apiVersion", f"must be {api.API_VERSION}, got {got}"))
        return result
    if not isinstance(kind, str) or kind not in api.KINDS:
        got = "nothing" if kind is None else shown(kind)
        result.errors.append(FieldError("kind", f"must be one of {sorted(api.KINDS)}, got {got}"))
        return result
    result.errors.extend(structural_errors(kind, document))
    if result.errors:
        return result  # CEL on a structurally broken object only adds noise
    defaulted = apply_defaults(root_schema(kind), decoded(document))
    if kind == "FineTuneJob":
        defaulted = {**defaulted, "spec": resolve_method_defaults(defaulted["spec"])}
    result.errors.extend(object_errors(kind, defaulted))
    result.errors.extend(cel_errors(kind, defaulted))
    if not result.errors:
        found = child_value_errors(kind, defaulted) + cluster_uri_errors(kind, defaulted["spec"], local=local)
        result.errors.extend(FieldError(path, message) for path, message in found)
    if kind == "FineTuneJob" and not result.errors:
        errors, warnings = semantic_errors(defaulted["spec"], local=local)
        result.errors.extend(errors)
        result.warnings.extend(warnings)
    if kind == "AdapterDeployment" and not result.errors:
        sampling = (defaulted["spec"].get("trafficSampling") or {}).get("uri") or ""
        if not local and sampling.startswith("file://"):
            result.errors.append(FieldError("spec.trafficSampling.uri", "file:// samples work only with `kubetune "
                                            "local`; serving pods write to S3 (s3://bucket/prefix)"))
        result.errors.extend(retrain_template_errors(defaulted, local=local))
    if result.ok:
        result.defaulted = defaulted
    return result

"""ValidatingAdmissionPolicies for the emulator, evaluated as the API server's admission plugin does
(k8s.io/apiserver/pkg/admission/plugin/policy/validating): a binding's policy matches the request's
resource and operation, its matchConditions select it, its variables and validations (CEL) see `object`,
`oldObject` (after and before the write) and `request`; a denial is the Status the API server answers
(reason Invalid, 422, unless the validation names another reason: Forbidden is 403)."""

from __future__ import annotations

import functools
from collections.abc import Iterable

import aiohttp.web
import cel
import kmock

from kubetune_testing import rbac
from kubetune_testing.auth import user_of
from kubetune_testing.emulator import K8sEmulator
from kubetune_testing.escalation import objects_of_write

OPERATIONS = {"POST": "CREATE", "PUT": "UPDATE", "PATCH": "UPDATE", "DELETE": "DELETE"}
CODES = {"Forbidden": 403, "Unauthorized": 401, "RequestEntityTooLarge": 413, "Invalid": 422}


@functools.cache
def _program(expression: str):
    return cel.compile(expression)


def _matches(rule: dict, operation: str, attrs: rbac.Attributes, version: str) -> bool:
    def within(values: list, value: str) -> bool:
        return "*" in values or value in values
    return (within(rule.get("operations") or [], operation) and within(rule.get("apiGroups") or [], attrs.group)
            and within(rule.get("apiVersions") or [], version)
            and within(rule.get("resources") or [], attrs.combined))


class AdmissionPolicies:
    """The ValidatingAdmissionPolicies (and bindings) among `documents`, as the emulator's gate;
    `denied` lists every denial's message."""

    def __init__(self, k8s: K8sEmulator, documents: Iterable[dict]):
        documents = list(documents)
        self.k8s = k8s
        self.policies = {d["metadata"]["name"]: d for d in documents if d.get("kind") == "ValidatingAdmissionPolicy"}
        self.bindings = [d for d in documents if d.get("kind") == "ValidatingAdmissionPolicyBinding"]
        self.denied: list[str] = []

    def evaluate(self, policy: dict, context: dict) -> tuple[str, str] | None:
        """(message, reason) of the first validation that fails (or cannot be evaluated), else None."""
        spec = policy["spec"]
        try:
            if not all(_program(c["expression"]).execute(context) is True for c in spec.get("matchConditions") or []):
                return None
            variables = {}
            for variable in spec.get("variables") or []:
                variables[variable["name"]] = _program(variable["expression"]).execute({**context,
                                                                                         "variables": variables})
            context = {**context, "variables": variables}
            for validation in spec.get("validations") or []:
                if _program(validation["expression"]).execute(context) is not True:
                    return (validation.get("message") or f"failed expression: {validation['expression']}",
                            validation.get("reason") or "Invalid")
        except (KeyError, TypeError, RuntimeError, IndexError, ValueError) as exc:
            if spec.get("failurePolicy", "Fail") == "Fail":
                return f"expression could not be evaluated: {exc}", "Invalid"
        return None

    async def gate(self, request: kmock.Request) -> aiohttp.web.StreamResponse | None:
        raw = request._raw_request
        if raw is None or raw.method not in OPERATIONS or request.resource is None:
            return None
        attrs = rbac.attributes(raw.method, raw.path, dict(raw.query))
        operation = OPERATIONS[raw.method]
        old, new = objects_of_write(self.k8s, request) if operation != "DELETE" else (None, None)
        if operation != "DELETE" and new is None:
            return None
        user = user_of(request)
        context = {"object": new, "oldObject": old, "params": None, "request": {
            "operation": operation, "name": attrs.name or ((new or {}).get("metadata") or {}).get("name", ""),
            "namespace": attrs.namespace, "userInfo": {"username": user.username, "groups": list(user.groups),
                                                       "extra": user.extra_map}}}
        for binding in self.bindings:
            policy = self.policies.get(binding["spec"]["policyName"])
            if policy is None or "Deny" not in binding["spec"].get("validationActions", []):
                continue
            rules = policy["spec"]["matchConstraints"]["resourceRules"]
            if not any(_matches(r, operation, attrs, request.resource.version) for r in rules):
                continue
            denial = self.evaluate(policy, context)
            if denial is not None:
                return self._deny(policy, binding, attrs, context, *denial)
        return None

    def _deny(self, policy: dict, binding: dict, attrs: rbac.Attributes, context: dict, message: str,
              reason: str) -> aiohttp.web.Response:
        cause = (f"ValidatingAdmissionPolicy '{policy['metadata']['name']}' with binding "
                 f"'{binding['metadata']['name']}' denied request: {message}")
        name = context["request"]["name"]
        self.denied.append(cause)
        target = rbac.Attributes(attrs.verb, attrs.path, attrs.resource, attrs.group, "", attrs.namespace, name)
        message = f'{rbac.qualified(target)} "{name}" is forbidden: {cause}'
        body = rbac.status_body(CODES.get(reason, 422), reason, message, target, [{"message": cause}])
        return aiohttp.web.json_response(body, status=body["code"])

"""The API server's checks on a write that need an authorization decision: RBAC's escalation check on
Roles and bindings (pkg/registry/rbac/validation/rule.go ConfirmNoEscalation, role/policybased,
rolebinding/policybased: grant only what you hold, or hold escalate/bind), and blockOwnerDeletion's
`update` on the owner's finalizers (plugin/pkg/admission/gc, OwnerReferencesPermissionEnforcement)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import aiohttp.web
import jsonpatch
import kmock

from kubetune_testing import apiserver_views as views
from kubetune_testing import rbac
from kubetune_testing.auth import ADMIN, UserInfo, user_of

if TYPE_CHECKING:
    from kubetune_testing.emulator import K8sEmulator

ROLE_KINDS = {"roles": "Role", "clusterroles": "ClusterRole"}
BINDINGS = ("rolebindings", "clusterrolebindings")


def objects_of_write(k8s: K8sEmulator, request: kmock.Request) -> tuple[dict | None, dict | None]:
    """(old, new) object of a create, replace or patch, as admission sees them; (None, None) for
    anything else or a body this emulator does not decode here (protobuf)."""
    raw = request._raw_request
    if raw is None or request.resource is None or not isinstance(request.data, (dict, list)):
        return None, None
    key = (request.resource, request.namespace, request.name)
    stored = k8s.objects[key] if request.name is not None and key in k8s.objects else None
    old = None if stored is None or stored.deleted else copy.deepcopy(stored.raw)
    if raw.method == "POST" and request.name is None and isinstance(request.data, dict):
        return None, request.data
    if raw.method == "PUT" and isinstance(request.data, dict):
        return old, request.data
    if raw.method == "PATCH" and old is not None:
        if isinstance(request.data, list):
            try:
                return old, jsonpatch.apply_patch(old, request.data)
            except jsonpatch.JsonPatchException:
                return None, None  # the write itself answers 422
        return old, views.merge_patch(copy.deepcopy(old), request.data)
    return None, None


def _rule_text(verb: str, group: str, resource: str, name: str) -> str:
    names = f', ResourceNames:["{name}"]' if name else ""
    return f'{{APIGroups:["{group}"], Resources:["{resource}"]{names}, Verbs:["{verb}"]}}'


def _covers(owner: list[dict], verb: str, group: str, resource: str, name: str) -> bool:
    """One atomic grant is covered by the owner's rules (validation.Covers, rule by rule)."""
    sub = resource.partition("/")[2]
    for rule in owner:
        if not rule.get("resources"):
            continue
        if "*" not in rule.get("verbs", []) and verb not in rule.get("verbs", []):
            continue
        if "*" not in rule.get("apiGroups", []) and group not in rule.get("apiGroups", []):
            continue
        resources = rule["resources"]
        if "*" not in resources and resource not in resources and not (sub and f"*/{sub}" in resources):
            continue
        names = rule.get("resourceNames") or []
        if not names or (name and name in names):
            return True
    return False


def confirm_no_escalation(authorizer: rbac.RbacAuthorizer, user: UserInfo, namespace: str,
                          rules: list[dict]) -> list[str]:
    """The grants of `rules` that `user` does not hold in `namespace` (empty: no escalation); the ones it
    holds are recorded as used, since granting them is what the owner's permission is for."""
    owner, _ = authorizer.rules_for(user, namespace)
    missing = []
    for verb, group, resource, name in rbac.atomic_grants(rules):
        if _covers(owner, verb, group, resource, name):
            authorizer.uses.add(rbac.Use(user.username, verb, group, resource, namespace))
        else:
            missing.append(_rule_text(verb, group, resource, name))
    missing += [f"{{NonResourceURLs:{r['nonResourceURLs']}, Verbs:{r['verbs']}}}"
                for r in rules if r.get("nonResourceURLs")]
    return missing


def _escalation(authorizer: rbac.RbacAuthorizer, user: UserInfo, attrs: rbac.Attributes,
                new: dict) -> str | None:
    """Why writing this Role or binding escalates (None: it does not)."""
    namespace = attrs.namespace
    if attrs.resource in ROLE_KINDS:
        if authorizer.allows(user, rbac.Attributes("escalate", attrs.path, attrs.resource, rbac.RBAC_GROUP,
                                                    namespace=namespace, name=attrs.name))[0]:
            return None
        rules = new.get("rules") or []
    else:
        ref = new.get("roleRef") or {}
        plural = ref.get("kind", "").lower() + "s"
        if authorizer.allows(user, rbac.Attributes("bind", attrs.path, plural, rbac.RBAC_GROUP,
                                                    namespace=namespace, name=ref.get("name", "")))[0]:
            return None
        role = authorizer._role(ref.get("kind", ""), ref.get("name", ""), namespace)
        if role is None:
            return f'{plural}.{rbac.RBAC_GROUP} "{ref.get("name")}" not found'
        rules = role.get("rules") or []
    missing = confirm_no_escalation(authorizer, user, namespace, rules)
    if not missing:
        return None
    groups = ", ".join(f'"{g}"' for g in user.groups)
    return (f'user "{user.username}" (groups=[{groups}]) is attempting to grant RBAC permissions not currently '
            f'held:\n' + "\n".join(missing))


def _owner_finalizers(authorizer: rbac.RbacAuthorizer, user: UserInfo, attrs: rbac.Attributes,
                      old: dict | None, new: dict) -> str | None:
    """Why this write may not set blockOwnerDeletion (None: it may): it needs `update` on each new
    blocking owner's finalizers subresource."""
    before = {r.get("uid") for r in ((old or {}).get("metadata") or {}).get("ownerReferences") or []
              if r.get("blockOwnerDeletion")}
    for ref in (new.get("metadata") or {}).get("ownerReferences") or []:
        if not ref.get("blockOwnerDeletion") or ref.get("uid") in before:
            continue
        plural = rbac.resource_plural(authorizer.k8s, ref.get("apiVersion", ""), ref.get("kind", ""))
        group = ref.get("apiVersion", "").rpartition("/")[0]
        check = rbac.Attributes("update", attrs.path, plural or ref.get("kind", "").lower(), group, "finalizers",
                                attrs.namespace, ref.get("name", ""))
        if authorizer.authorize(user, check) is not None:
            return ("cannot set blockOwnerDeletion if an ownerReference refers to a resource you can't set "
                    f"finalizers on: {rbac.forbidden_message(user, check).split(': ', 1)[1]}, {ref}")
    return None


async def gate(authorizer: rbac.RbacAuthorizer, request: kmock.Request) -> aiohttp.web.StreamResponse | None:
    """After authorization: refuse a write that escalates or sets blockOwnerDeletion without the right."""
    raw = request._raw_request
    if raw is None or raw.method not in ("POST", "PUT", "PATCH"):
        return None
    user = user_of(request)
    if user == ADMIN or rbac.SUPERUSER_GROUP in user.groups:
        return None
    old, new = objects_of_write(authorizer.k8s, request)
    if new is None:
        return None
    attrs = rbac.attributes(raw.method, raw.path, dict(raw.query))
    if attrs.subresource:
        return None
    why = None
    if attrs.group == rbac.RBAC_GROUP and (attrs.resource in ROLE_KINDS or attrs.resource in BINDINGS):
        why = _escalation(authorizer, user, attrs, new)
    if why is None:
        why = _owner_finalizers(authorizer, user, attrs, old, new)
    if why is None:
        return None
    name = attrs.name or (new.get("metadata") or {}).get("name", "")
    target = rbac.Attributes(attrs.verb, attrs.path, attrs.resource, attrs.group, "", attrs.namespace, name)
    message = f'{rbac.qualified(target)} "{name}" is forbidden: {why}'
    authorizer.refused.append(message)
    return aiohttp.web.json_response(rbac.status_body(403, "Forbidden", message, target), status=403)

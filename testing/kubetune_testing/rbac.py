"""The API server's RBAC authorizer for the emulator, as kubernetes/kubernetes
plugin/pkg/auth/authorizer/rbac/rbac.go and pkg/registry/rbac/validation/rule.go do it: request attributes
from the URL and method, rules from the chart (`helm template`) and the RBAC objects stored in the emulator,
403 with the API server's Status, the escalation check on Roles and bindings, and blockOwnerDeletion's
finalizers check (plugin/pkg/admission/gc). Every authorized request is recorded for coverage."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

import aiohttp.web
import kmock
import yaml

from kubetune_testing.auth import ADMIN, UserInfo, user_of
from kubetune_testing.emulator import K8sEmulator

RBAC_GROUP = "rbac.authorization.k8s.io"
CHART = Path(__file__).resolve().parents[2] / "charts" / "kubetune"
RELEASE, RELEASE_NAMESPACE = "kubetune", "kubetune-system"
OPERATOR = f"system:serviceaccount:{RELEASE_NAMESPACE}:kubetune"  # the chart's ServiceAccount, as rendered
SUPERUSER_GROUP = "system:masters"
# the API server's bootstrap policy for every authenticated user (system:discovery, system:basic-user,
# system:public-info-viewer in plugin/pkg/auth/authorizer/rbac/bootstrappolicy/policy.go)
DISCOVERY_URLS = ("/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/readyz", "/version", "/version/",
                  "/openapi", "/openapi/*")
BOOTSTRAP_RULES = (
    {"nonResourceURLs": list(DISCOVERY_URLS), "verbs": ["get"]},
    {"apiGroups": ["authorization.k8s.io"], "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"],
     "verbs": ["create"]},
)


@dataclasses.dataclass(frozen=True)
class Attributes:
    """What the authorizer sees of a request (k8s.io/apiserver/pkg/endpoints/request/requestinfo.go)."""

    verb: str
    path: str
    resource: str = ""        # "" for a non-resource request
    group: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""

    @property
    def is_resource(self) -> bool:
        return bool(self.resource)

    @property
    def combined(self) -> str:
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource


def attributes(method: str, path: str, query: dict[str, str]) -> Attributes:
    """The verb and resource of a request, as the API server's RequestInfoFactory derives them."""
    parts = [p for p in path.strip("/").split("/") if p]
    verbs = {"POST": "create", "GET": "get", "HEAD": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
    verb = verbs.get(method.upper(), method.lower())
    if parts[:1] == ["api"] and len(parts) >= 3:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 4:
        group, rest = parts[1], parts[3:]
    else:
        return Attributes(verb, "/" + "/".join(parts))
    if rest[:1] == ["watch"]:  # the deprecated /watch/ path prefix
        verb, rest = "watch", rest[1:]
    namespace = ""
    if rest[0] == "namespaces" and len(rest) >= 2:
        namespace = rest[1]
        rest = rest[2:] if len(rest) > 2 else ["namespaces", rest[1]]
    resource, name, subresource = [*rest, "", ""][:3]
    if not name and verb == "get":
        verb = "watch" if query.get("watch") in ("1", "true") else "list"
        # a list or watch of one object by `fieldSelector=metadata.name=X` is authorized as a request for X,
        # so a Role's resourceNames can allow it (requestinfo.go: RequiresExactMatch("metadata.name"))
        name = _exact_name(query.get("fieldSelector") or "")
    elif not name and verb == "delete":
        verb = "deletecollection"
    return Attributes(verb, "/" + "/".join(parts), resource, group, subresource, namespace, name)


def _exact_name(field_selector: str) -> str:
    terms = [t.strip() for t in field_selector.split(",") if t.strip()]
    names = [t.split("=", 1)[1].lstrip("=") for t in terms if t.startswith(("metadata.name=", "metadata.name=="))]
    return names[0] if len(names) == 1 else ""


# --- rules (rule.go / rbac.go RuleAllows) ----------------------------------------------------------------------


def rule_allows(rule: dict, attrs: Attributes) -> bool:
    verbs = rule.get("verbs") or []
    if "*" not in verbs and attrs.verb not in verbs:
        return False
    if not attrs.is_resource:
        return any(url == "*" or url == attrs.path or (url.endswith("*") and attrs.path.startswith(url[:-1]))
                   for url in rule.get("nonResourceURLs") or [])
    groups = rule.get("apiGroups") or []
    if "*" not in groups and attrs.group not in groups:
        return False
    resources = rule.get("resources") or []
    if not any(r in ("*", attrs.combined) or (attrs.subresource and r == f"*/{attrs.subresource}")
               for r in resources):
        return False
    names = rule.get("resourceNames") or []
    return not names or attrs.name in names


def subject_matches(subject: dict, user: UserInfo, binding_namespace: str) -> bool:
    kind, name = subject.get("kind"), subject.get("name")
    if kind == "User":
        return name == user.username
    if kind == "Group":
        return name in user.groups
    if kind == "ServiceAccount":
        return user.username == f"system:serviceaccount:{subject.get('namespace') or binding_namespace}:{name}"
    return False


def atomic_grants(rules: Iterable[dict]) -> Iterator[tuple[str, str, str, str]]:
    """Each (verb, group, resource, resourceName or '') a list of rules grants, one by one."""
    for rule in rules:
        for verb in rule.get("verbs") or []:
            for group in rule.get("apiGroups") or []:
                for resource in rule.get("resources") or []:
                    for name in rule.get("resourceNames") or [""]:
                        yield verb, group, resource, name


# --- the chart's RBAC --------------------------------------------------------------------------------------


def helm_binary() -> str:
    for candidate in (CHART.parents[1] / ".tools" / "bin" / "helm", shutil.which("helm")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise FileNotFoundError("helm not found: expected .tools/bin/helm (`make setup`) or helm on PATH")


@functools.cache
def _render(values_json: str) -> tuple[dict, ...]:
    values = json.loads(values_json)
    args = [helm_binary(), "template", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE]
    for key, value in values.items():
        args += ["--set-json", f"{key}={json.dumps(value)}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"`helm template` failed: {proc.stderr}")
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def render_chart(**values: object) -> list[dict]:
    """The chart's documents rendered with `values` (e.g. watchNamespaces=["team-a"])."""
    return [json.loads(json.dumps(d)) for d in _render(json.dumps(values, sort_keys=True))]


RBAC_KINDS = ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")


def rbac_objects(documents: Iterable[dict]) -> list[dict]:
    return [d for d in documents if d.get("kind") in RBAC_KINDS and d.get("apiVersion", "").startswith(RBAC_GROUP)]


# --- the authorizer ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Use:
    """One authorized (user, verb, group, resource[/subresource], namespace): what coverage counts."""

    user: str
    verb: str
    group: str
    resource: str
    namespace: str


def status_body(code: int, reason: str, message: str, attrs: Attributes, causes: list | None = None) -> dict:
    details = {"name": attrs.name, "group": attrs.group, "kind": attrs.resource} if attrs.is_resource else {}
    if causes:
        details["causes"] = causes
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "details": {k: v for k, v in details.items() if v}, "code": code}


def qualified(attrs: Attributes) -> str:
    return f"{attrs.resource}.{attrs.group}" if attrs.group else attrs.resource


def forbidden_message(user: UserInfo, attrs: Attributes) -> str:
    """responsewriters.forbiddenMessage, prefixed as apierrors.NewForbidden does."""
    if not attrs.is_resource:
        return f'forbidden: User "{user.username}" cannot {attrs.verb} path "{attrs.path}"'
    scope = (f'in the namespace "{attrs.namespace}"' if attrs.namespace else "at the cluster scope")
    what = f'{qualified(attrs)} "{attrs.name}"' if attrs.name else qualified(attrs)
    return (f'{what} is forbidden: User "{user.username}" cannot {attrs.verb} resource "{attrs.combined}" '
            f'in API group "{attrs.group}" {scope}')


def forbidden(user: UserInfo, attrs: Attributes, reason: str = "") -> aiohttp.web.Response:
    message = forbidden_message(user, attrs) + (f": {reason}" if reason else "")
    return aiohttp.web.json_response(status_body(403, "Forbidden", message, attrs), status=403)


class RbacAuthorizer:
    """Authorizes every request of a non-admin user against `chart` (the RBAC documents of the rendered
    chart) plus the RBAC objects stored in the emulator, read per request. `uses` records every
    authorized request; `refused` every 403 (for the tests' messages)."""

    def __init__(self, k8s: K8sEmulator, chart: Iterable[dict], uses: set[Use] | None = None):
        self.k8s = k8s
        self.chart = rbac_objects(chart)
        self.uses: set[Use] = set() if uses is None else uses
        self.refused: list[str] = []

    # --- what is stored ---
    def _stored(self, plural: str, namespace: str | None = None) -> Iterator[dict]:
        for (resource, ns, _), obj in list(self.k8s.objects.items()):
            if (resource.group == RBAC_GROUP and resource.plural == plural and not obj.deleted
                    and (namespace is None or ns == namespace)):
                yield obj.raw

    def _objects(self, kind: str, namespace: str | None = None) -> Iterator[dict]:
        for doc in self.chart:
            if doc["kind"] == kind and (namespace is None or doc["metadata"].get("namespace") == namespace):
                yield doc
        yield from self._stored(kind.lower() + "s", namespace)

    def _role(self, kind: str, name: str, namespace: str) -> dict | None:
        return next((r for r in self._objects(kind, namespace if kind == "Role" else None)
                     if r["metadata"]["name"] == name), None)

    def rules_for(self, user: UserInfo, namespace: str) -> tuple[list[dict], list[str]]:
        """Every rule that applies to `user` in `namespace` ("" = cluster scope), and the errors met
        (a binding to a missing role), as the rule resolver's VisitRulesFor does."""
        rules, errors = [dict(r) for r in BOOTSTRAP_RULES], []
        bindings = [(b, None) for b in self._objects("ClusterRoleBinding")]
        if namespace:
            bindings += [(b, namespace) for b in self._objects("RoleBinding", namespace)]
        for binding, ns in bindings:
            if not any(subject_matches(s, user, ns or "") for s in binding.get("subjects") or []):
                continue
            ref = binding["roleRef"]
            role = self._role(ref["kind"], ref["name"], ns or "")
            if role is None:
                scope = f'"{ref["name"]}"' + (f' in namespace "{ns}"' if ref["kind"] == "Role" else "")
                errors.append(f'{ref["kind"].lower()}.{RBAC_GROUP} {scope} not found')
                continue
            rules += role.get("rules") or []
        return rules, errors

    def allows(self, user: UserInfo, attrs: Attributes) -> tuple[bool, str]:
        if user == ADMIN or SUPERUSER_GROUP in user.groups:
            return True, ""
        rules, errors = self.rules_for(user, attrs.namespace)
        if any(rule_allows(rule, attrs) for rule in rules):
            return True, ""
        return False, f"RBAC: [{', '.join(errors)}]" if errors else ""

    def authorize(self, user: UserInfo, attrs: Attributes) -> aiohttp.web.Response | None:
        """None (and recorded) if RBAC allows it, else the API server's 403."""
        allowed, reason = self.allows(user, attrs)
        if not allowed:
            self.refused.append(forbidden_message(user, attrs))
            return forbidden(user, attrs, reason)
        if user != ADMIN and attrs.is_resource:
            self.uses.add(Use(user.username, attrs.verb, attrs.group, attrs.combined, attrs.namespace))
        return None

    async def gate(self, request: kmock.Request) -> aiohttp.web.StreamResponse | None:
        raw = request._raw_request
        if raw is None:
            return None
        return self.authorize(user_of(request), attributes(raw.method, raw.path, dict(raw.query)))


def resource_plural(k8s: K8sEmulator, api_version: str, kind: str) -> str | None:
    """The plural of a kind, from the emulator's discovery (for ownerReferences)."""
    group = api_version.rpartition("/")[0]
    for resource in k8s.resources:
        if resource.group == group and k8s.resources[resource].kind == kind:
            return resource.plural
    return None

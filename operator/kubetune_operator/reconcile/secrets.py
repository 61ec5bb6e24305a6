"""Do the Secrets a resource's pods reference exist, with the keys they name? (pure)

References come from the rendered pod environment (`secret_refs`); what is missing becomes a condition
and a Warning Event, and nothing new starts until it is there (a GitOps sync may create it a moment
later). Why, and what is read of each Secret: docs/security.md (Secret values).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from . import conditions as cond

CONDITION = "SecretsFound"
SECRET_NOT_FOUND = "SecretNotFound"
SECRET_KEY_NOT_FOUND = "SecretKeyNotFound"
SECRET_NOT_READABLE = "SecretNotReadable"
FOUND = "SecretsFound"
EXISTS = True  # in `found`: the Secret exists, its keys were not read (metadata only)
NOT_READABLE = "forbidden"  # in `found`: the operator may not read it (403: its namespace did not grant it)


@dataclass(frozen=True)
class SecretRef:
    secret: str
    key: str
    env: str  # the variable that needs it (the message names it: the user knows which credential it is)


@dataclass(frozen=True)
class Problem:
    reason: str  # SECRET_NOT_FOUND | SECRET_NOT_READABLE | SECRET_KEY_NOT_FOUND
    message: str


def secret_refs(env: Iterable[dict]) -> list[SecretRef]:
    """Every `valueFrom.secretKeyRef` of a container environment, in order."""
    refs = []
    for variable in env:
        ref = (variable.get("valueFrom") or {}).get("secretKeyRef")
        if ref and not ref.get("optional"):
            refs.append(SecretRef(secret=ref["name"], key=ref["key"], env=variable["name"]))
    return refs


def named_secrets(spec: object) -> list[str]:
    """Names of every Secret a spec mentions (`...credentials.secretName` anywhere), without
    validating it first: what the operator reads before deciding (cheap, and a wrong-shaped spec
    only means fewer names)."""
    names: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "secretName" and isinstance(value, str) and value and value not in names:
                    names.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(spec)
    return names


def problem(refs: Iterable[SecretRef], found: Mapping[str, frozenset | bool | None], namespace: str
            ) -> Problem | None:
    """What is missing among `refs`, given `found` (Secret name -> its keys; EXISTS when only its
    metadata was read; None when it does not exist; NOT_READABLE when RBAC refused the read). A Secret
    not in `found` was not looked at (`kubetune local`): nothing is reported."""
    absent: dict[str, list[str]] = {}
    unreadable: dict[str, list[str]] = {}
    keys_missing: list[str] = []
    for ref in refs:
        if ref.secret not in found:
            continue
        keys = found[ref.secret]
        if keys is None:
            absent.setdefault(ref.secret, []).append(ref.env)
        elif keys == NOT_READABLE:
            unreadable.setdefault(ref.secret, []).append(ref.env)
        elif keys is not EXISTS and ref.key not in keys:
            keys_missing.append(f'Secret "{ref.secret}" has no key "{ref.key}" (for {ref.env})')
    parts = [f'Secret "{name}" not found in namespace {namespace} (for {", ".join(envs)})'
             for name, envs in absent.items()]
    parts += [f'the operator may not read Secret "{name}" in namespace {namespace} (for {", ".join(envs)}): '
              f'grant it with a RoleBinding of the chart\'s <release>-secrets ClusterRole in {namespace} '
              f'(chart value rbac.secretNamespaces)' for name, envs in unreadable.items()]
    parts += keys_missing
    if not parts:
        return None
    reason = SECRET_NOT_FOUND if absent else SECRET_NOT_READABLE if unreadable else SECRET_KEY_NOT_FOUND
    return Problem(reason, "; ".join(parts) + "; pods cannot start without it, nothing new starts until it exists")


def report(conditions: list[dict] | None, found: Problem | None, subject: str, generation: int,
           now: str) -> tuple[list[dict] | None, Problem | None]:
    """The `SecretsFound` condition for what `problem` found, and the Warning to emit (None: none).

    Set False with the problem; back to True once fixed (only where it was ever False: no noise on
    resources whose Secrets were always there). The Warning is emitted when the problem first appears
    or changes, not on every pass."""
    previous = cond.find(conditions, CONDITION)
    if found is None:
        if previous and previous.get("status") != "True":
            conditions = cond.set_condition(conditions, CONDITION, True, FOUND,
                                            f"every Secret and key the {subject} reference exists", generation, now)
        return conditions, None
    warn = not previous or previous.get("status") != "False" or previous.get("message") != found.message
    conditions = cond.set_condition(conditions, CONDITION, False, found.reason, found.message, generation, now)
    return conditions, found if warn else None

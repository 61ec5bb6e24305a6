"""RBAC coverage: every verb the chart grants the operator, and the operator grants the agents, must
be used by some integration flow (recorded by the emulator's authorizer), unless rbac-rules.yaml
names why no flow can use it (`unexercised`). Least (nothing unused) next to the enforcement's
sufficient (nothing refused). How it runs: docs/security.md."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import yaml

from kubetune_operator.render import serving as serving_render
from kubetune_testing import rbac

RULES_FILE = rbac.CHART / "rbac-rules.yaml"
OPERATOR, AGENT = "operator", "agent"
# the chart's two RBAC layouts, and the Leases sharding adds (tests/integration/test_sharding.py)
MODES = ({"rbac.secretNamespaces": ["team-a"]}, {"watchNamespaces": ["team-a"]}, {"sharding.shards": 4})


@dataclasses.dataclass(frozen=True, order=True)
class Grant:
    subject: str   # OPERATOR or AGENT
    verb: str
    group: str
    resource: str  # resource or resource/subresource

    def __str__(self) -> str:
        return f"{self.subject}: {self.verb} {self.resource}" + (f".{self.group}" if self.group else "")


def subject_of(username: str) -> str | None:
    if username == rbac.OPERATOR:
        return OPERATOR
    if username.startswith("system:serviceaccount:") and username.endswith(f"-{serving_render.AGENT_ACCOUNT_SUFFIX}"):
        return AGENT
    return None


def _grants(subject: str, rules: Iterable[dict]) -> set[Grant]:
    return {Grant(subject, verb, group, resource) for verb, group, resource, _ in rbac.atomic_grants(rules)}


def granted() -> set[Grant]:
    """What the chart grants the operator (both layouts, Secrets included) and the agents' Role."""
    grants: set[Grant] = set()
    for values in MODES:
        for doc in rbac.rbac_objects(rbac.render_chart(**values)):
            if doc["kind"] in ("Role", "ClusterRole"):
                grants |= _grants(OPERATOR, doc.get("rules") or [])
    adep = {"metadata": {"name": "example", "namespace": "team-a", "uid": "u"}}
    for doc in serving_render.render_agent_rbac(adep):
        if doc["kind"] == "Role":
            grants |= _grants(AGENT, doc["rules"])
    return grants


def unexercised() -> dict[Grant, str]:
    """The grants rbac-rules.yaml says no flow can use, with the reason."""
    allowed = {}
    for rule in (rule for rules in yaml.safe_load(RULES_FILE.read_text()).values() for rule in rules):
        if rule.get("unexercised"):
            for grant in _grants(OPERATOR, [rule]):
                allowed[grant] = rule["unexercised"]
    return allowed


def used(uses: Iterable[rbac.Use]) -> set[Grant]:
    return {Grant(subject, u.verb, u.group, u.resource) for u in uses
            if (subject := subject_of(u.user)) is not None}


def problems(grants: set[Grant], uses: set[Grant], allowed: dict[Grant, str]) -> list[str]:
    """Every grant no flow used (and no reason allows), and every allowance a flow did use after all."""
    unused = sorted(g for g in grants - uses if g not in allowed)
    stale = sorted(g for g in allowed if g in uses or g not in grants)
    return ([f"granted but no flow used it: {g} (remove it, or name why in rbac-rules.yaml `unexercised`)"
             for g in unused]
            + [f"`unexercised` but used or not granted: {g} (drop the reason)" for g in stale])

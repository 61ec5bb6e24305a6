"""The API server's access control on the emulator, as a cluster with the chart installed has it:
RBAC from the rendered chart plus the RBAC objects stored in the emulator (rbac.py), the escalation
and blockOwnerDeletion checks (escalation.py), and the chart's ValidatingAdmissionPolicies
(admission_policy.py). Installed after the authenticator (auth.py), whose user it authorizes."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

from kubetune_testing import escalation, rbac
from kubetune_testing.admission_policy import AdmissionPolicies
from kubetune_testing.emulator import K8sEmulator


@dataclasses.dataclass
class Enforcement:
    authorizer: rbac.RbacAuthorizer
    policies: AdmissionPolicies
    chart: list[dict]

    gates: list

    @property
    def uses(self) -> set[rbac.Use]:
        return self.authorizer.uses

    def remove(self) -> None:
        """Stop enforcing (e.g. to enforce the chart rendered with other values instead)."""
        for gate in self.gates:
            self.policies.k8s.gates.remove(gate)


def enforce(k8s: K8sEmulator, *, watch_namespaces: Sequence[str] = (),
            secret_namespaces: Sequence[str] = (), uses: set | None = None,
            values: dict[str, object] | None = None) -> Enforcement:
    """Authorize every request from now on against the chart rendered in ClusterRole mode (no
    `watch_namespaces`, Secrets readable in `secret_namespaces`) or in watchNamespaces mode; authorized
    requests are recorded into `uses` (a session's set) if given; `values`: any other chart values."""
    chart_values: dict[str, object] = {"watchNamespaces": list(watch_namespaces), **(values or {})}
    if not watch_namespaces:
        chart_values["rbac.secretNamespaces"] = list(secret_namespaces)
    chart = rbac.render_chart(**chart_values)
    authorizer = rbac.RbacAuthorizer(k8s, chart, uses)
    policies = AdmissionPolicies(k8s, chart)
    gates = [authorizer.gate, functools.partial(escalation.gate, authorizer), policies.gate]
    k8s.gates.extend(gates)
    return Enforcement(authorizer, policies, chart, gates)

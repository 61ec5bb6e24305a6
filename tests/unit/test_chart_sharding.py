"""The chart with sharding (docs/sharding.md): replicas, the lease flags, the pod's identity from the
downward API, a Role for Leases in the release's namespace only, and no replicas > 1 without shards."""

from __future__ import annotations

import subprocess

import yaml

from tests.unit.test_chart import CHART, KUBE_VERSION, RELEASE, RELEASE_NS, find_helm, operator_container, the

LEASE_RULES = yaml.safe_load((CHART / "rbac-rules.yaml").read_text())["leases"]


def _template(*values: str) -> subprocess.CompletedProcess:
    args = [find_helm(), "template", RELEASE, str(CHART), "--namespace", RELEASE_NS, "--kube-version", KUBE_VERSION]
    for value in values:
        args += ["--set", value]
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def test_sharded_chart_runs_replicas_with_leases():
    proc = _template("replicas=3", "sharding.shards=6", "sharding.leaseDurationSeconds=20")
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    deployment = the(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 3 and "strategy" not in deployment["spec"]  # rolling update
    _, container = operator_container(docs)
    args = container["args"]
    flags = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i] in (
        "--shards", "--lease-duration", "--renew-deadline", "--retry-period")}
    assert flags == {"--shards": "6", "--lease-duration": "20", "--renew-deadline": "10", "--retry-period": "2"}
    env = {e["name"]: e.get("valueFrom") for e in container["env"]}
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    roles = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"].endswith("-leases")]
    assert len(roles) == 1 and roles[0]["metadata"]["namespace"] == RELEASE_NS
    assert roles[0]["rules"] == [{k: r[k] for k in ("apiGroups", "resources", "verbs")} for r in LEASE_RULES]
    binding = next(d for d in docs if d["kind"] == "RoleBinding" and d["metadata"]["name"].endswith("-leases"))
    assert binding["metadata"]["namespace"] == RELEASE_NS and binding["roleRef"]["name"] == roles[0]["metadata"]["name"]


def test_unsharded_chart_has_no_leases_and_refuses_replicas():
    proc = _template()
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert not [d for d in docs if d["metadata"]["name"].endswith("-leases")]
    assert "--shards" not in operator_container(docs)[1]["args"]
    refused = _template("replicas=2")
    assert refused.returncode != 0 and "replicas > 1 needs sharding.shards > 1" in refused.stderr

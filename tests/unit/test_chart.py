"""The Helm chart charts/kubetune: lint, Kubernetes 1.34 schemas, RBAC least privilege, pod security, values schema.

Needs the `helm` binary (the repo's .tools/bin/helm, installed by `make setup`, or one on PATH).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"
KUBE_VERSION = "1.34.0"
RELEASE, RELEASE_NS = "kt", "kubetune-system"
WATCHED = ("team-a", "team-b")

# Every value set the chart is rendered with. "full" touches every optional branch of the templates.
FULL_VALUES = {
    "watchNamespaces": ["team-a"],
    "image": {"tag": "0.2.0-rc1", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "trainer": {"image": {"repository": "registry.local/trainer", "tag": "cu124"}},
    "publishTimeoutSeconds": 120,
    "verbose": True,
    "storage": {
        "endpoint": "http://seaweedfs.storage:8333",
        "region": "eu-west-1",
        "credentialsSecret": "s3-credentials",
    },
    "extraEnv": [{"name": "AWS_MAX_ATTEMPTS", "value": "10"}],
    "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/kubetune"}},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}, "interval": "15s"}},
    "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
    "podAnnotations": {"example.com/team": "ml"},
    "podLabels": {"example.com/tier": "control"},
    "priorityClassName": "system-cluster-critical",
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}
                ]
            }
        }
    },
}
CASES = {
    "default": [],
    "namespaced": ["--set", "watchNamespaces={" + ",".join(WATCHED) + "}"],
    "full": ["--values", "<full>"],  # replaced by the path of FULL_VALUES written to a temp file
}

# The grants, set by set, as charts/kubetune/rbac-rules.yaml lists them with their reasons: (apiGroup, resource)
# -> verbs. That each one is used is the integration suite's RBAC coverage check (docs/security.md).
RBAC_RULES = yaml.safe_load((CHART / "rbac-rules.yaml").read_text())


def rule_set(name: str) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in RBAC_RULES[name]:
        assert rule.get("why"), f"rbac-rules.yaml: a rule of {name} without `why`: {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


NAMESPACED_GRANTS = rule_set("operator")
SECRET_GRANTS = rule_set("secrets")
CLUSTER_GRANTS = {**rule_set("kopf"), **rule_set("clusterwide")}  # cluster-wide in every mode
NAMESPACE_GRANTS = rule_set("namespaces")  # kopf's namespace observer, with watchNamespaces only
ALLOWED_GRANTS = {**NAMESPACED_GRANTS, **CLUSTER_GRANTS, **NAMESPACE_GRANTS, **SECRET_GRANTS}
RECOMMENDED_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
)


# --- helm ----------------------------------------------------------------------------------------


def find_helm() -> str:
    for candidate in (REPO / ".tools" / "bin" / "helm", shutil.which("helm")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail(
        "helm binary not found: expected .tools/bin/helm (run `make setup`) or `helm` on PATH; "
        "the chart tests cannot run without it",
        pytrace=False,
    )


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., subprocess.CompletedProcess]:
    binary = find_helm()
    home = tmp_path_factory.mktemp("helm-home")
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([binary, *args], capture_output=True, text=True, env=env, timeout=60, check=False)
        if check and proc.returncode != 0:
            pytest.fail(f"`helm {' '.join(args)}` failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    return run


@pytest.fixture(scope="module")
def case_args(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    full = tmp_path_factory.mktemp("values") / "full.yaml"
    full.write_text(yaml.safe_dump(FULL_VALUES))
    return {name: [str(full) if a == "<full>" else a for a in args] for name, args in CASES.items()}


@pytest.fixture(scope="module")
def rendered(helm, case_args) -> dict[str, list[dict]]:
    out = {}
    for name, args in case_args.items():
        text = helm(
            "template",
            RELEASE,
            str(CHART),
            "--namespace",
            RELEASE_NS,
            "--kube-version",
            KUBE_VERSION,
            "--include-crds",
            *args,
        ).stdout
        out[name] = [doc for doc in yaml.safe_load_all(text) if doc]
    return out


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def the(docs: list[dict], kind: str) -> dict:
    found = of_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


# --- Kubernetes schemas (kubernetes_validate's strict 1.34 schemas, validators cached per kind) --------


def _schema_dir():
    major_minor = ".".join(KUBE_VERSION.split(".")[:2])
    return resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{major_minor}.0-local-strict"


@functools.cache
def _definitions() -> Registry:
    defs = json.loads((_schema_dir() / "_definitions.json").read_text())
    return Resource.from_contents(defs) @ Registry()


@functools.cache
def k8s_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    group, _, version = api_version.rpartition("/")
    prefix = f"{group.split('.')[0]}-" if group else ""
    path = _schema_dir() / f"{kind.lower()}-{prefix}{version}.json"
    assert path.is_file(), f"no Kubernetes {KUBE_VERSION} schema for {api_version} {kind}"
    return jsonschema.Draft202012Validator(json.loads(path.read_text()), registry=_definitions())


def k8s_errors(doc: dict) -> list[str]:
    validator = k8s_validator(doc["apiVersion"], doc["kind"])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


# --- 1. lint -------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["default", "namespaced", "full"])
def test_helm_lint_strict(helm, case_args, case):
    helm("lint", "--strict", str(CHART), *case_args[case])


# --- 2. Kubernetes 1.34 schemas ------------------------------------------------------------------


def test_validator_is_strict():
    """The cached validator rejects unknown fields and wrong types (it is not vacuous)."""
    bad = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {"replicas": "one", "selector": {}, "template": {}, "bogus": True},
    }
    errors = " ".join(k8s_errors(bad))
    assert "bogus" in errors
    assert "one" in errors


@pytest.mark.parametrize("case", ["default", "namespaced", "full"])
def test_rendered_documents_validate_against_kubernetes_schemas(rendered, case):
    docs = rendered[case]
    failures = {}
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":  # not a core kind; its shape is checked below
            continue
        errors = k8s_errors(doc)
        if errors:
            failures[f"{doc['kind']}/{doc['metadata']['name']}"] = errors
    assert not failures, json.dumps(failures, indent=2)

    kinds = sorted(d["kind"] for d in docs)
    expected = [
        "ClusterRole",
        "ClusterRoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "CustomResourceDefinition",
        "CustomResourceDefinition",
        "Deployment",
        "Service",
        "ServiceAccount",
    ]
    expected += ["Role", "RoleBinding"] * len(WATCHED if case == "namespaced" else [])
    expected += ["ClusterRole"] if case == "default" else []  # the Secrets ClusterRole, bound per namespace
    if case == "full":
        expected += ["Role", "RoleBinding", "ServiceMonitor"]
    assert kinds == sorted(expected)


@pytest.mark.parametrize("case", ["default", "namespaced", "full"])
def test_recommended_labels_and_namespaces(rendered, case):
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    for doc in rendered[case]:
        if doc["kind"] == "CustomResourceDefinition":
            continue
        labels = doc["metadata"]["labels"]
        assert all(key in labels for key in RECOMMENDED_LABELS), (doc["kind"], labels)
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/version"] == chart["appVersion"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/part-of"] == "kubetune"
        if doc["kind"] in ("ServiceAccount", "Deployment", "Service", "ServiceMonitor"):
            assert doc["metadata"]["namespace"] == RELEASE_NS


def test_service_monitor_shape(rendered):
    docs = rendered["full"]
    monitor, service = the(docs, "ServiceMonitor"), the(docs, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [RELEASE_NS]}
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "scheme": "http", "interval": "15s", "scrapeTimeout": "10s"}
    ]
    assert not of_kind(rendered["default"], "ServiceMonitor"), "ServiceMonitor must be off by default"


def test_metrics_service(rendered):
    docs = rendered["default"]
    service, deployment = the(docs, "Service"), the(docs, "Deployment")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


# --- 3. RBAC -------------------------------------------------------------------------------------


def grants(rules: list[dict]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


@pytest.mark.parametrize("case", ["default", "namespaced", "full"])
def test_rbac_is_least_privilege(rendered, case):
    roles = [d for d in rendered[case] if d["kind"] in ("Role", "ClusterRole")]
    assert roles
    for role in roles:
        for rule in role["rules"]:
            where = f"{role['kind']}/{role['metadata']['name']}: {rule}"
            assert set(rule) <= {"apiGroups", "resources", "verbs"}, f"unexpected rule fields in {where}"
            for field in ("apiGroups", "resources", "verbs"):
                assert not any("*" in item for item in rule[field]), f"wildcard in {where}"
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    allowed = ALLOWED_GRANTS.get((group, resource))
                    assert allowed is not None, f"{group or 'core'}/{resource} is not needed: {where}"
                    assert set(rule["verbs"]) <= allowed, f"verbs beyond {sorted(allowed)}: {where}"
                    if resource == "secrets":
                        assert rule["verbs"] == ["get"], f"Secrets must be get-only: {where}"


def test_rbac_all_namespaces_uses_one_cluster_role_and_no_secrets(rendered):
    docs = rendered["default"]
    assert not of_kind(docs, "Role") and not of_kind(docs, "RoleBinding")
    fullname = the(docs, "ServiceAccount")["metadata"]["name"]
    roles = {r["metadata"]["name"]: grants(r["rules"]) for r in of_kind(docs, "ClusterRole")}
    assert roles == {fullname: {**NAMESPACED_GRANTS, **CLUSTER_GRANTS}, f"{fullname}-secrets": SECRET_GRANTS}
    # the Secrets ClusterRole is never bound cluster-wide
    assert [b["roleRef"]["name"] for b in of_kind(docs, "ClusterRoleBinding")] == [fullname]


def test_rbac_secrets_are_granted_per_opted_in_namespace(helm):
    docs = [d for d in yaml.safe_load_all(helm("template", RELEASE, str(CHART), "--namespace", RELEASE_NS,
                                                 "--set", "rbac.secretNamespaces={team-a,team-b}").stdout) if d]
    bindings = of_kind(docs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    fullname = the(docs, "ServiceAccount")["metadata"]["name"]
    assert {(b["roleRef"]["kind"], b["roleRef"]["name"]) for b in bindings} == {("ClusterRole", f"{fullname}-secrets")}


@pytest.mark.parametrize("case", ["namespaced", "full"])
def test_rbac_watch_namespaces_uses_roles(rendered, case):
    docs = rendered[case]
    watched = WATCHED if case == "namespaced" else tuple(FULL_VALUES["watchNamespaces"])
    # Cluster-wide only what kopf needs: no Secrets, Pods, ConfigMaps, ... outside the watched namespaces.
    assert grants(the(docs, "ClusterRole")["rules"]) == {**CLUSTER_GRANTS, **NAMESPACE_GRANTS}
    roles = of_kind(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(watched)
    for role in roles:
        assert grants(role["rules"]) == {**NAMESPACED_GRANTS, **SECRET_GRANTS}
    assert sorted(b["metadata"]["namespace"] for b in of_kind(docs, "RoleBinding")) == sorted(watched)


@pytest.mark.parametrize("case", ["default", "namespaced", "full"])
def test_rbac_bindings_point_at_the_operator(rendered, case):
    docs = rendered[case]
    account = the(docs, "ServiceAccount")
    deployment = the(docs, "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    roles = {
        (r["kind"], r["metadata"].get("namespace"), r["metadata"]["name"])
        for r in docs
        if r["kind"] in ("Role", "ClusterRole")
    }
    for binding in (d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        ref = binding["roleRef"]
        namespace = binding["metadata"].get("namespace") if ref["kind"] == "Role" else None
        assert (ref["kind"], namespace, ref["name"]) in roles, f"dangling roleRef in {binding}"
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": RELEASE_NS}
        ]


# --- 4. Deployment -------------------------------------------------------------------------------


def operator_container(docs: list[dict]) -> tuple[dict, dict]:
    pod = the(docs, "Deployment")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["operator"]
    return pod, pod["containers"][0]


@pytest.mark.parametrize("case", ["default", "namespaced", "full"])
def test_deployment_security_context_is_restricted(rendered, case):
    deployment = the(rendered[case], "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod, container = operator_container(rendered[case])
    assert pod["automountServiceAccountToken"] is True
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")

    pod_sc = pod["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert pod_sc["runAsUser"] == 65532
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}

    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == 65532
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not sc.get("privileged")

    # Writable /tmp on an otherwise read-only root filesystem.
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert "emptyDir" in volumes["tmp"]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]


@pytest.mark.parametrize("case", ["default", "full"])
def test_deployment_probes_ports_and_image(rendered, case):
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    _, container = operator_container(rendered[case])
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"health": 8080, "metrics": 9090}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}, probe
    assert container["command"] == ["kubetune", "operator"]
    if case == "default":
        assert container["image"] == f"ghcr.io/kubetune/operator:{chart['appVersion']}"
        assert container["imagePullPolicy"] == "IfNotPresent"
        assert "env" not in container
    else:
        assert container["image"] == "ghcr.io/kubetune/operator:0.2.0-rc1"
        assert container["imagePullPolicy"] == "Always"


def flags(args: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Boolean flags, and valued flags -> their values (in order)."""
    booleans, valued = [], {}
    i = 0
    while i < len(args):
        assert args[i].startswith("--"), f"stray argument {args[i]!r} in {args}"
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            valued.setdefault(args[i], []).append(args[i + 1])
            i += 2
        else:
            booleans.append(args[i])
            i += 1
    return booleans, valued


@pytest.mark.parametrize(
    ("case", "namespaces"),
    [("default", []), ("namespaced", list(WATCHED)), ("full", FULL_VALUES["watchNamespaces"])],
)
def test_deployment_args_follow_watch_namespaces(rendered, case, namespaces):
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    _, container = operator_container(rendered[case])
    booleans, valued = flags(container["args"])
    if namespaces:
        assert "--all-namespaces" not in booleans
        assert valued["--namespace"] == namespaces
    else:
        assert "--all-namespaces" in booleans
        assert "--namespace" not in valued
    assert valued["--health-port"] == ["8080"]
    assert valued["--metrics-port"] == ["9090"]
    if case == "full":
        assert valued["--trainer-image"] == ["registry.local/trainer:cu124"]
        assert valued["--publish-timeout"] == ["120"]
        assert "--verbose" in booleans
    else:
        assert valued["--trainer-image"] == [f"ghcr.io/kubetune/trainer:{chart['appVersion']}"]
        assert "--verbose" not in booleans


def test_deployment_storage_env_and_scheduling(rendered):
    pod, container = operator_container(rendered["full"])
    env = {e["name"]: e for e in container["env"]}
    assert env["KUBETUNE_S3_ENDPOINT"]["value"] == "http://seaweedfs.storage:8333"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"] == {"secretKeyRef": {"name": "s3-credentials", "key": key}}
    assert env["AWS_REGION"]["value"] == "eu-west-1"
    assert env["AWS_MAX_ATTEMPTS"]["value"] == "10"
    assert pod["nodeSelector"] == FULL_VALUES["nodeSelector"]
    assert pod["tolerations"] == FULL_VALUES["tolerations"]
    assert pod["affinity"] == FULL_VALUES["affinity"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["priorityClassName"] == "system-cluster-critical"
    template_meta = the(rendered["full"], "Deployment")["spec"]["template"]["metadata"]
    assert template_meta["annotations"] == FULL_VALUES["podAnnotations"]
    assert template_meta["labels"]["example.com/tier"] == "control"


def test_the_charts_storage_setting_reaches_every_pod_the_operator_renders(rendered, monkeypatch):
    """storage.endpoint/region as the operator process takes them (its container's env and args), and
    the trainer, agent and engine containers it then renders for specs that name no endpoint or region."""
    from kubetune.api import serving
    from kubetune_operator import backends, cli
    from kubetune_operator.render import serving as serving_render
    from kubetune_operator.render import training as render
    from tests.unit.test_storage_location import containers, managed_adep, silent_job, values

    _, container = operator_container(rendered["full"])
    for name in ("KUBETUNE_S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    for variable in container["env"]:
        if "value" in variable:
            monkeypatch.setenv(variable["name"], variable["value"])
    args = cli.build_parser().parse_args(container["command"][1:] + container["args"])
    setting = cli.storage_setting(args)
    assert (setting.endpoint, setting.region) == ("http://seaweedfs.storage:8333", "eu-west-1")
    pods = containers(backends.render_children(silent_job(), render.RenderSettings(storage=setting)))
    pods += containers(serving_render.render_children(
        managed_adep(), serving_render.ServingSettings(storage=setting), serving.DesiredState(generation=1), 16))
    assert len(pods) == 4  # the master and worker trainers, the engine, the agent
    for pod in pods:
        assert (values(pod)["AWS_ENDPOINT_URL"], values(pod)["AWS_REGION"]) == (setting.endpoint, setting.region)


# --- 5. values.schema.json ---------------------------------------------------------------------


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        both_dicts = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = deep_merge(out[key], value) if both_dicts else value
    return out


def _resolve(schema: dict, node: dict) -> dict:
    while "$ref" in node:
        target = schema
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def test_values_schema_is_valid_and_covers_every_value():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator(schema).validate(values)
    jsonschema.Draft7Validator(schema).validate(deep_merge(values, FULL_VALUES))

    def walk(value, node: dict, path: str) -> None:
        node = _resolve(schema, node)
        assert "type" in node, f"{path}: no type in values.schema.json"
        if isinstance(value, dict) and node.get("additionalProperties") is False:
            for key, sub in value.items():
                assert key in node.get("properties", {}), f"{path}.{key}: not in values.schema.json"
                walk(sub, node["properties"][key], f"{path}.{key}")

    walk(values, schema, "")
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize(
    "bad",
    [
        ["--set", "replicaCount=abc"],  # unknown top-level key
        ["--set", "image.pullPolicy=Sometimes"],  # not in the enum
        ["--set", "publishTimeoutSeconds=abc"],  # wrong type
        ["--set", "watchNamespaces={Team_A}"],  # not a namespace name
        ["--set", "metrics.serviceMonitor.enabled=maybe"],  # not a boolean
        ["--set", "storage.bucket=x"],  # unknown nested key
    ],
    ids=lambda args: args[-1],
)
def test_values_schema_rejects_bad_values(helm, bad):
    proc = helm("template", RELEASE, str(CHART), *bad, check=False)
    assert proc.returncode != 0, f"helm template accepted {bad}"
    assert "schema" in proc.stderr, proc.stderr


# --- 6. CRDs --------------------------------------------------------------------------------------


def test_chart_crds_equal_generated_crds():
    top = {p.name: p.read_bytes() for p in sorted((REPO / "crds").glob("*.yaml"))}
    chart = {p.name: p.read_bytes() for p in sorted((CHART / "crds").glob("*.yaml"))}
    assert top, "no CRDs in crds/"
    assert sorted(chart) == sorted(top), "charts/kubetune/crds/ and crds/ hold different files"
    for name, content in top.items():
        assert chart[name] == content, f"charts/kubetune/crds/{name} differs from crds/{name} (run `kubetune generate`)"

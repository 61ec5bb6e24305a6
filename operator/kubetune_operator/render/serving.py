"""Children of an AdapterDeployment (pure): the desired-state ConfigMap and the agent's RBAC, and for
a managed runtime the Deployment (the runtime's engine container + the agent sidecar) and its Service.
Names are deterministic (`<adep>-desired`, `<adep>-serving`, `<adep>`, `<adep>-agent`); selected pods
get only the ConfigMap and RBAC (docs/serving-runtimes.md).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from kubetune import runtimes
from kubetune.api import serving, storage_location
from kubetune.api import v1alpha1 as api
from kubetune.runtimes.base_model import base_model_env

ENGINE_PORT = 8000
AGENT_PORT = 8080
MODEL_CACHE = "/models"
ADAPTER_CACHE = "/var/cache/kubetune-adapters"
RUN_AS_USER = 1000
ANNOTATION_TEMPLATE_HASH = "kubetune.io/template-hash"
AGENT_ACCOUNT_SUFFIX = "kubetune-agent"  # the chart's agent-policy.yaml matches it


@dataclass(frozen=True)
class ServingSettings:
    engine_images: Mapping[str, str] = field(  # runtime name -> engine image (runtime.managed.image overrides)
        default_factory=lambda: {name: runtime.default_image for name, runtime in runtimes.RUNTIMES.items()})
    agent_image: str = "ghcr.io/kubetune/operator:0.1.0"  # the agent ships in the operator's image
    image_pull_policy: str = "IfNotPresent"
    # The operator's storage setting (chart storage.endpoint/region): where a spec names none
    storage: storage_location.StorageLocation = storage_location.AWS

    def with_engine_image(self, engine: str, image: str) -> ServingSettings:
        return replace(self, engine_images={**self.engine_images, engine: image})


def serving_name(adep_name: str) -> str:
    return f"{adep_name}-serving"


def agent_account_name(adep_name: str, home: str | None = None) -> str:
    """`<adep>-kubetune-agent`; `<home>.<adep>-kubetune-agent` in a namespace reached cluster-wide (see
    desired_config_map_name). The chart's ValidatingAdmissionPolicy recognizes agents by the suffix."""
    return f"{home}.{adep_name}-{AGENT_ACCOUNT_SUFFIX}" if home else f"{adep_name}-{AGENT_ACCOUNT_SUFFIX}"


def labels(adep_name: str, component: str) -> dict[str, str]:
    """Recommended labels, less `app.kubernetes.io/instance` (Argo CD's default tracking label; see
    render.gitops). The AdapterDeployment's own labels are not copied."""
    return {
        "app.kubernetes.io/name": "kubetune-serving",
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "kubetune",
        "app.kubernetes.io/managed-by": "kubetune-operator",
        serving.LABEL_ADAPTERDEPLOYMENT: adep_name,
    }


def pod_selector(adep: dict) -> dict[str, str]:
    """Labels that select the serving pods: the managed Deployment's, or the user's selector."""
    runtime = adep["spec"]["runtime"]
    if runtime.get("selector"):
        return dict(runtime["selector"]["matchLabels"])
    return {serving.LABEL_ADAPTERDEPLOYMENT: adep["metadata"]["name"], "app.kubernetes.io/component": "engine"}


def owner_reference(adep: dict) -> dict:
    return {"apiVersion": api.API_VERSION, "kind": "AdapterDeployment", "name": adep["metadata"]["name"],
            "uid": adep["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


def remote_labels(adep: dict) -> dict[str, str]:
    """What marks the children written into another namespace as this AdapterDeployment's (ownerReferences
    cannot cross namespaces: the clean-up finds them by these labels)."""
    return {serving.LABEL_ADAPTERDEPLOYMENT: adep["metadata"]["name"],
            serving.LABEL_HOME_NAMESPACE: adep["metadata"]["namespace"]}


def _home(adep: dict, target: str | None) -> str | None:
    """The home namespace when `target` is another namespace (names are qualified with it), else None."""
    home = adep["metadata"]["namespace"]
    return home if target and target != home else None


def _meta(adep: dict, name: str, component: str, target: str | None = None) -> dict:
    if _home(adep, target):
        return {"name": name, "namespace": target,
                "labels": {**labels(adep["metadata"]["name"], component), **remote_labels(adep)}}
    return {"name": name, "namespace": adep["metadata"]["namespace"],
            "labels": labels(adep["metadata"]["name"], component), "ownerReferences": [owner_reference(adep)]}


def render_desired_config_map(adep: dict, desired: serving.DesiredState, target: str | None = None) -> dict:
    """The agents' desired state in the AdapterDeployment's namespace, or in `target` (cluster-wide)."""
    name = serving.desired_config_map_name(adep["metadata"]["name"], _home(adep, target))
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(adep, name, "desired-state", target),
            "data": {serving.DESIRED_KEY: desired.to_json()}}


def render_agent_rbac(adep: dict, target: str | None = None) -> list[dict]:
    """The agent reads and watches one ConfigMap and writes its report on its own Pod; nothing else. In `target`
    (cluster-wide) the same, under names qualified with the AdapterDeployment's namespace. RBAC cannot
    name "its own Pod": the chart's ValidatingAdmissionPolicy (templates/agent-policy.yaml) limits the
    `patch` to the Pod the agent's token is bound to and to the report annotation."""
    home = _home(adep, target)
    name = agent_account_name(adep["metadata"]["name"], home)
    desired = serving.desired_config_map_name(adep["metadata"]["name"], home)
    namespace = target or adep["metadata"]["namespace"]
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(adep, name, "agent", target),
         "automountServiceAccountToken": True},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(adep, name, "agent", target),
         "rules": [
             # list and watch by `fieldSelector=metadata.name=...`, which resourceNames allows
             {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [desired],
              "verbs": ["get", "list", "watch"]},
             {"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": _meta(adep, name, "agent", target),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]},
    ]


def render_remote_children(adep: dict, target: str, desired: serving.DesiredState) -> list[dict]:
    """What a namespace reached cluster-wide holds: the desired state and the agents' RBAC, labelled, not owned."""
    return [render_desired_config_map(adep, desired, target), *render_agent_rbac(adep, target)]


def _storage_env(spec: dict, fallback: storage_location.StorageLocation = storage_location.AWS) -> list[dict]:
    """The agent's storage: spec.storage's endpoint and region, else the operator's setting (`fallback`)."""
    storage = spec.get("storage") or {}
    env = storage_location.location_env(storage_location.resolve(storage, fallback=fallback))
    credentials = storage.get("credentials")
    if credentials:
        for var, key in (("AWS_ACCESS_KEY_ID", credentials["accessKeyIdKey"]),
                         ("AWS_SECRET_ACCESS_KEY", credentials["secretAccessKeyKey"])):
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": credentials["secretName"], "key": key}}})
    return env


def secret_env(spec: dict) -> list[dict]:
    """The managed serving pods' variables that come from Secrets: the agent's storage access and the
    engine's base model access (none without a managed runtime: the user's own pods are not ours to check)."""
    if not spec["runtime"].get("managed"):
        return []
    env = [*_storage_env(spec), *base_model_env(spec["baseModel"])]
    return [variable for variable in env if "valueFrom" in variable]


_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
             "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def render_deployment(adep: dict, settings: ServingSettings, max_lora_rank: int) -> dict:
    meta, spec = adep["metadata"], adep["spec"]
    managed = spec["runtime"]["managed"]
    runtime = runtimes.runtime_of(spec)
    layout = runtimes.PodLayout(image=managed.get("image") or settings.engine_images[runtime.name],
                                image_pull_policy=settings.image_pull_policy, port=ENGINE_PORT,
                                model_cache=MODEL_CACHE, adapter_cache=ADAPTER_CACHE, security_context=_SECURITY,
                                storage=settings.storage)
    engine = runtime.engine_container(spec, layout, max_lora_rank)
    agent = {
        "name": "agent",
        "image": settings.agent_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["python", "-m", "kubetune_agent", "--engine-url", f"http://127.0.0.1:{ENGINE_PORT}",
                    "--port", str(AGENT_PORT), "--runtime", runtime.name, "--desired-configmap",
                    serving.desired_config_map_name(meta["name"]), "--cache-dir", ADAPTER_CACHE],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            *_storage_env(spec, settings.storage),
        ],
        "ports": [{"name": "http", "containerPort": AGENT_PORT}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": AGENT_PORT}, "periodSeconds": 5},
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        "volumeMounts": [{"name": "adapters", "mountPath": ADAPTER_CACHE}, {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": _SECURITY,
    }
    pod_labels = {**labels(meta["name"], "engine"), **pod_selector(adep)}
    deployment_meta = _meta(adep, serving_name(meta["name"]), "engine")
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": deployment_meta,
        "spec": {
            "replicas": int(managed.get("replicas", 1)),
            "selector": {"matchLabels": pod_selector(adep)},
            # adapters change at runtime through the agent; only base model or engine changes roll pods
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "serviceAccountName": agent_account_name(meta["name"]),
                    "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER,
                                        "fsGroup": RUN_AS_USER, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [engine, agent],
                    "volumes": [
                        {"name": "models", "emptyDir": {}},
                        {"name": "adapters", "emptyDir": {}},
                        {"name": "tmp", "emptyDir": {}},
                        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}},
                    ],
                },
            },
        },
    }
    # The API server adds defaults to what it stores: compare this hash, not the templates, to know
    # whether the pods must change (an engine image or --max-lora-rank change; never an adapter change).
    template = json.dumps(deployment["spec"]["template"], sort_keys=True).encode()
    deployment_meta["annotations"] = {ANNOTATION_TEMPLATE_HASH: hashlib.sha256(template).hexdigest()[:16]}
    return deployment


def render_service(adep: dict) -> dict:
    """Clients reach the agents (which route aliases to versions), never the engines directly."""
    meta = adep["metadata"]
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(adep, meta["name"], "engine"),
            "spec": {"selector": pod_selector(adep),
                     "ports": [{"name": "http", "port": 80, "targetPort": AGENT_PORT, "protocol": "TCP"}]}}


def render_children(adep: dict, settings: ServingSettings, desired: serving.DesiredState,
                    max_lora_rank: int | None) -> list[dict]:
    """Every child in creation order (the ConfigMap and RBAC before the pods that use them)."""
    children = [render_desired_config_map(adep, desired), *render_agent_rbac(adep)]
    if adep["spec"]["runtime"].get("managed") and max_lora_rank:
        children += [render_deployment(adep, settings, max_lora_rank), render_service(adep)]
    return children

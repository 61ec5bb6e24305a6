"""Serving pods as a cluster runs them, for `kubetune_agent` processes in cluster mode against the
emulator (behind its TLS front, `tls_front.py`): the agents' RBAC and desired-state ConfigMap as the
operator renders them, the Pod object, the pod-bound ServiceAccount token projected with the API
server's CA (as kubelet mounts it), and the agent's command line and environment."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from urllib.parse import urlsplit

from kubetune.api import serving
from kubetune.clients import kube
from kubetune_operator.render import serving as serving_render
from kubetune_testing import auth

RESOURCES = {"ServiceAccount": kube.Resource("", "v1", "serviceaccounts"),
             "Role": kube.Resource("rbac.authorization.k8s.io", "v1", "roles"),
             "RoleBinding": kube.Resource("rbac.authorization.k8s.io", "v1", "rolebindings"),
             "ConfigMap": kube.CONFIGMAPS, "Pod": kube.Resource("", "v1", "pods")}


def adapter_deployment(namespace: str, name: str) -> dict:
    """As much of an AdapterDeployment as the rendering of its agents' objects reads."""
    return {"metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}"}}


async def create_agent_objects(client: kube.KubeClient, adep: dict, desired: serving.DesiredState) -> None:
    """The ServiceAccount, Role, RoleBinding and desired-state ConfigMap the operator creates."""
    for doc in [*serving_render.render_agent_rbac(adep), serving_render.render_desired_config_map(adep, desired)]:
        await client.create(RESOURCES[doc["kind"]], doc)


async def set_desired(client: kube.KubeClient, adep: dict, desired: serving.DesiredState) -> None:
    """The operator's write of a new desired state (a merge patch of the ConfigMap's data)."""
    doc = serving_render.render_desired_config_map(adep, desired)
    await client.patch(kube.CONFIGMAPS, doc["metadata"]["namespace"], doc["metadata"]["name"], {"data": doc["data"]})


async def create_pod(client: kube.KubeClient, adep: dict, pod: str) -> None:
    meta = adep["metadata"]
    await client.create(RESOURCES["Pod"], {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod, "namespace": meta["namespace"]},
        "spec": {"serviceAccountName": serving_render.agent_account_name(meta["name"]),
                 "containers": [{"name": "engine", "image": "engine"}, {"name": "agent", "image": "agent"}]},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}})


async def report_of(client: kube.KubeClient, namespace: str, pod: str) -> serving.AgentReport | None:
    found = await client.get(RESOURCES["Pod"], namespace, pod)
    text = ((found or {}).get("metadata", {}).get("annotations") or {}).get(serving.ANNOTATION_REPORT)
    return serving.AgentReport.from_json(text) if text else None


def project_account(authenticator: auth.TokenAuthenticator, directory: Path, adep: dict, pod: str,
                    ca_path: Path) -> Path:
    """The pod's service account directory: a token bound to `pod`, the CA and the namespace."""
    namespace = adep["metadata"]["namespace"]
    account = serving_render.agent_account_name(adep["metadata"]["name"])
    directory.mkdir(parents=True, exist_ok=True)
    authenticator.issue(auth.service_account(namespace, account, pod=pod), directory / "token")
    shutil.copyfile(ca_path, directory / "ca.crt")
    (directory / "namespace").write_text(namespace)
    return directory


def agent_command(*, adep: dict, pod: str, account_dir: Path, engine_url: str, port: int, cache_dir: Path,
                  sync_seconds: float, runtime: str = "vllm", report_seconds: float = 1.0) -> list[str]:
    meta = adep["metadata"]
    return [sys.executable, "-m", "kubetune_agent", "--engine-url", engine_url, "--runtime", runtime,
            "--host", "127.0.0.1", "--port", str(port), "--namespace", meta["namespace"], "--pod-name", pod,
            "--desired-configmap", serving.desired_config_map_name(meta["name"]),
            "--service-account-dir", str(account_dir), "--cache-dir", str(cache_dir),
            "--sync-seconds", str(sync_seconds), "--report-seconds", str(report_seconds)]


def agent_env(base: dict[str, str], front_url: str) -> dict[str, str]:
    """What kubelet sets in a pod: the API server's service address (here: the TLS front)."""
    where = urlsplit(front_url)
    return {**base, "KUBERNETES_SERVICE_HOST": where.hostname or "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(where.port), "PYTHONUNBUFFERED": "1"}

"""The agent's Kubernetes I/O in a cluster: the service account client, the desired-state ConfigMap and
the report annotation on its own Pod; and their file twins for local runs (`--desired-file`,
`--report-file`).
"""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path

from kubetune.api import serving
from kubetune.clients import credentials, kube

PODS = kube.Resource("", "v1", "pods")
SERVICE_ACCOUNT_DIR = credentials.SERVICE_ACCOUNT_DIR


class NotInCluster(RuntimeError):
    pass


class InClusterKube:
    """A `KubeClient` with the Pod's service account. kubelet rewrites the projected token as it
    rotates: the file is re-read within a minute, and at once when the API server answers 401
    (then the request is retried once), through the token file login the in-cluster operator shares."""

    def __init__(self, root: Path = SERVICE_ACCOUNT_DIR, host: str | None = None, port: str | None = None):
        host = host or os.environ.get("KUBERNETES_SERVICE_HOST")
        port = port or os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise NotInCluster("KUBERNETES_SERVICE_HOST is not set: not in a cluster "
                               "(use --desired-file and --report-file)")
        self.server = server = credentials.in_cluster_server_of(host, port)
        self.root = root
        try:
            ssl_context = ssl.create_default_context(cafile=str(root / "ca.crt"))
        except OSError as exc:
            raise NotInCluster(f"no service account CA at {root / 'ca.crt'}: {exc}") from exc
        self.credentials = credentials.Refreshing(credentials.token_file_login(server, root),
                                                  max_age=credentials.TOKEN_FILE_MAX_AGE_SECONDS)
        self._client = kube.KubeClient(credentials=self.credentials, ssl_context=ssl_context, timeout=15.0)

    async def client(self) -> kube.KubeClient:
        return self._client

    async def close(self) -> None:
        await self._client.close()


class DesiredFile:
    def __init__(self, path: Path):
        self.path = Path(path)

    def __str__(self) -> str:
        return f"file {self.path}"

    async def read(self) -> str | None:
        try:
            return self.path.read_text()
        except FileNotFoundError:
            return None

    async def close(self) -> None:
        pass


class DesiredConfigMap:
    def __init__(self, kubernetes: InClusterKube, namespace: str, name: str):
        self.kubernetes, self.namespace, self.name = kubernetes, namespace, name

    def __str__(self) -> str:
        return f"ConfigMap {self.namespace}/{self.name}"

    async def read(self) -> str | None:
        config_map = await (await self.kubernetes.client()).get(kube.CONFIGMAPS, self.namespace, self.name)
        if config_map is None:
            return None
        return (config_map.get("data") or {}).get(serving.DESIRED_KEY)

    async def close(self) -> None:
        await self.kubernetes.close()


class ReportFile:
    def __init__(self, path: Path):
        self.path = Path(path)

    def __str__(self) -> str:
        return f"file {self.path}"

    async def write(self, text: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False, suffix=".tmp") as handle:
            handle.write(text)
        os.replace(handle.name, self.path)

    async def close(self) -> None:
        pass


class PodAnnotation:
    """The report in the agent's own Pod's annotation (JSON merge patch on metadata.annotations)."""

    def __init__(self, kubernetes: InClusterKube, namespace: str, pod: str):
        self.kubernetes, self.namespace, self.pod = kubernetes, namespace, pod

    def __str__(self) -> str:
        return f"Pod {self.namespace}/{self.pod} annotation {serving.ANNOTATION_REPORT}"

    async def write(self, text: str) -> None:
        patch = {"metadata": {"annotations": {serving.ANNOTATION_REPORT: text}}}
        await (await self.kubernetes.client()).patch(PODS, self.namespace, self.pod, patch)

    async def close(self) -> None:
        await self.kubernetes.close()

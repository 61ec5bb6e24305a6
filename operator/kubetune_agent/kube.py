"""The agent's Kubernetes I/O in a cluster: the service account client, the desired-state ConfigMap
(read, and watched: the decisions are watch.py's) and the report annotation on its own Pod; and their
file twins for local runs (`--desired-file`, `--report-file`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp

from kubetune.api import serving
from kubetune.clients import credentials, kube
from kubetune_agent import watch

log = logging.getLogger(__name__)

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
        self._ssl_context = ssl_context
        self._streams: aiohttp.ClientSession | None = None  # list and watch: no total timeout

    async def client(self) -> kube.KubeClient:
        return self._client

    @contextlib.asynccontextmanager
    async def stream(self, path: str, params: dict[str, str], read_timeout: float
                     ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A GET whose answer is read as it arrives (a watch), with the service account's token (renewed
        once on a 401). Raises kube.ApiError for an error status."""
        if self._streams is None:
            self._streams = aiohttp.ClientSession()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=15.0, sock_read=read_timeout)
        info = await self.credentials.current()
        for attempt in (1, 2):
            response = await self._streams.get(self.server + path, params=params, ssl=self._ssl_context,
                                               timeout=timeout, headers={"Accept": "application/json",
                                                                         "Authorization": f"Bearer {info.token}"})
            if response.status == 401 and attempt == 1:
                response.release()
                info = await self.credentials.refreshed(info)
                continue
            try:
                if response.status >= 400:
                    raise kube.ApiError(response.status, (await response.text())[:500])
                yield response
            finally:
                response.release()
            return

    async def close(self) -> None:
        await self._client.close()
        if self._streams is not None:
            await self._streams.close()


Changed = Callable[[str], None]  # the sync loop's inbox: a desired state's text, new

# local mode: how often the desired file's stat is compared; a change reaches the sync loop within this
# (plus its read), where the sync tick alone took up to --sync-seconds
FILE_POLL_SECONDS = 0.05


class DesiredFile:
    # a local file is read on every sync tick as before (it costs nothing); the stat polling only wakes
    # the loop early, so a change the stat cannot see (same size, same mtime tick) still arrives
    watching = False

    def __init__(self, path: Path):
        self.path = Path(path)

    def __str__(self) -> str:
        return f"file {self.path}"

    async def read(self) -> str | None:
        try:
            return self.path.read_text()
        except FileNotFoundError:
            return None

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    async def watch(self, changed: Changed) -> None:
        """Stat polling (mtime, size, inode) every FILE_POLL_SECONDS; a changed file is read and handed on."""
        seen = self._stat()
        while True:
            await asyncio.sleep(FILE_POLL_SECONDS)
            now = self._stat()
            if now != seen:
                seen = now
                text = await self.read()
                if text is not None:
                    changed(text)

    async def close(self) -> None:
        pass


class DesiredConfigMap:
    def __init__(self, kubernetes: InClusterKube, namespace: str, name: str):
        self.kubernetes, self.namespace, self.name = kubernetes, namespace, name
        self.watching = False  # a watch stream is open: changes arrive without reading
        self.rng = random.Random()

    def __str__(self) -> str:
        return f"ConfigMap {self.namespace}/{self.name}"

    async def read(self) -> str | None:
        config_map = await (await self.kubernetes.client()).get(kube.CONFIGMAPS, self.namespace, self.name)
        if config_map is None:
            return None
        return (config_map.get("data") or {}).get(serving.DESIRED_KEY)

    async def watch(self, changed: Changed) -> None:
        """LIST then WATCH the ConfigMap (by `metadata.name` field selector), each change handed on as it
        arrives; relist, re-watch and back off as watch.py decides. Never returns."""
        cursor = watch.Cursor()
        path = kube.CONFIGMAPS.path(self.namespace)
        while True:
            if cursor.resource_version is None:
                step = await self._list(cursor, path)
            else:
                step = await self._watch_once(cursor, path, changed)
            if step.deliver:
                changed(step.text)
            cursor = step.cursor
            if step.delay:
                await asyncio.sleep(step.delay)

    async def _list(self, cursor: watch.Cursor, path: str) -> watch.Step:
        try:
            async with self.kubernetes.stream(path, watch.list_params(self.name), 30.0) as response:
                return watch.after_list(await response.json(), self.name)
        except (kube.ApiError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
            step = watch.on_list_failed(cursor, self.rng.random())
            self._failed("list", exc, step)
            return step

    async def _watch_once(self, cursor: watch.Cursor, path: str, changed: Changed) -> watch.Step:
        params = watch.watch_params(cursor, self.name, self.rng.random())
        began, events = time.monotonic(), 0
        try:
            async with self.kubernetes.stream(path, params, float(params["timeoutSeconds"]) + 30) as response:
                self.watching = True
                buffer = b""
                async for chunk in response.content.iter_any():
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in filter(None, (raw.strip() for raw in lines)):
                        events += 1
                        event = json.loads(line)
                        step = watch.on_event(cursor, event, self.name, self.rng.random())
                        if step.deliver:
                            changed(step.text)
                        cursor = step.cursor
                        if step.restart:  # an ERROR event: its Status says why (410 Expired, ...)
                            status = event.get("object") or {}
                            self._failed("watch", f"{status.get('code')} {status.get('message')}", step)
                            return step
            # a stream the server closes at once, again and again, is a failure, not a timeout
            return watch.on_stream_end(cursor, dropped=not events and time.monotonic() - began < 1.0,
                                       jitter=self.rng.random())
        except kube.ApiError as exc:
            step = watch.on_stream_end(cursor, status=exc.status, jitter=self.rng.random())
            self._failed("watch", exc, step)
            return step
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            step = watch.on_stream_end(cursor, dropped=True, jitter=self.rng.random())
            self._failed("watch", exc, step)
            return step
        finally:
            self.watching = False

    def _failed(self, what: str, error: object, step: watch.Step) -> None:
        # the first failure of a streak is a warning; the retries of a lasting one (a Role without
        # `watch`: the sync tick reads instead meanwhile) are debug, not a line every 30 s
        level = logging.WARNING if step.cursor.failures <= 1 else logging.DEBUG
        log.log(level, f"desired-state {what} failed", extra={
            "source": str(self),
            "error": (f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error))[:300],
            "relist": step.cursor.resource_version is None, "retry_in_seconds": round(step.delay, 2)})

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

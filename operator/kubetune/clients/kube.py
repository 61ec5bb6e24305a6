"""A small asyncio Kubernetes REST client over aiohttp.

kopf watches and calls our handlers; the handlers read and write child objects through this client.
Each request takes the current credentials from a provider (`credentials`: the same login as kopf's),
and a 401 renews them once and retries. It covers what the operator needs (get, create, merge-patch,
status patch, delete, list, events) and nothing more.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
import ssl
import tempfile
from dataclasses import dataclass
from typing import Any

import aiohttp

from kubetune.clients import credentials as creds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None, subresource: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
        if subresource:
            base += f"/{subresource}"
        return base


FINETUNEJOBS = Resource("kubetune.io", "v1alpha1", "finetunejobs")
PYTORCHJOBS = Resource("kubeflow.org", "v1", "pytorchjobs")
CONFIGMAPS = Resource("", "v1", "configmaps")
SECRETS = Resource("", "v1", "secrets")
EVENTS = Resource("", "v1", "events")
LEASES = Resource("coordination.k8s.io", "v1", "leases")


class ApiError(Exception):
    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.retry_after = retry_after  # seconds, from a 429/503's Retry-After header


# The API server's metadata-only view of an object (what `kubectl get --show-kind -o name` style clients use):
# a Secret read this way transfers its name, labels and annotations, never its data.
PARTIAL_METADATA_ACCEPT = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json"

# answers worth the same request again after a pause: throttling (429, with Retry-After) and the API
# server's transient errors. Anything else (404, 409, 422...) is for the caller to decide.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:  # an HTTP date: not worth parsing, the backoff applies
        return None


class KubeClient:
    def __init__(self, server: str | None = None, *, token: str | None = None,
                 credentials: creds.CredentialsProvider | None = None, headers: dict[str, str] | None = None,
                 ssl_context: ssl.SSLContext | bool | None = None, timeout: float = 30.0, retries: int = 3,
                 backoff: float = 0.2, max_delay: float = 10.0):
        if credentials is None:
            if not server:
                raise ValueError("KubeClient needs a server (and token) or a credentials provider")
            credentials = creds.Static(creds.Login(server=server, token=token))
        self.credentials = credentials
        # a request that was throttled, hit a transient server error or lost its connection is tried
        # again `retries` times after backoff * 2^n s (or the server's Retry-After), at most max_delay s
        # apart: one refused request no longer fails a whole reconcile pass
        self.retries, self.backoff, self.max_delay = retries, backoff, max_delay
        self._headers = {"Accept": "application/json", **(headers or {})}
        self._ssl_override = ssl_context
        self._ssl_of: tuple[Any, ssl.SSLContext | bool | None] | None = None  # (credentials, their context)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_credentials(cls, provider: creds.CredentialsProvider) -> KubeClient:
        """Credentials that refresh: the provider is asked on every request, and again after a 401."""
        return cls(credentials=provider)

    async def _request(self, method: str, path: str, **kw: Any) -> Any:
        info = await self.credentials.current()
        try:
            return await self._with_retries(info, method, path, **kw)
        except ApiError as exc:
            if exc.status != 401:
                raise
            # the token expired or was rotated (a bound ServiceAccount token, an exec plugin's): log in
            # again, once for all the requests that saw it, and retry once; a second 401 is an error
            fresh = await self.credentials.refreshed(info)
            if fresh is info:
                raise
            log.info("API credentials refreshed after a 401", extra={"method": method, "path": path})
            return await self._with_retries(fresh, method, path, **kw)

    async def _with_retries(self, info: Any, method: str, path: str, **kw: Any) -> Any:
        for attempt in range(self.retries + 1):
            try:
                return await self._request_once(info, method, path, **kw)
            except ApiError as exc:
                if exc.status not in RETRY_STATUSES or attempt == self.retries:
                    raise
                delay = exc.retry_after if exc.retry_after is not None else self.backoff * 2 ** attempt
                log.debug("API request retried", extra={"method": method, "path": path, "status": exc.status})
            except (TimeoutError, aiohttp.ClientConnectionError) as exc:
                if attempt == self.retries:
                    raise
                delay = self.backoff * 2 ** attempt
                log.debug("API request retried", extra={"method": method, "path": path, "error": str(exc)})
            await asyncio.sleep(min(delay, self.max_delay))
        raise AssertionError("unreachable")

    async def _request_once(self, info: Any, method: str, path: str, *, json: Any = None,
                            content_type: str | None = None, params: dict | None = None,
                            accept: str | None = None) -> Any:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        headers = dict(self._headers)
        if info.token:
            headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
        basic = aiohttp.BasicAuth(info.username, info.password) if not info.token and info.username else None
        if content_type:
            headers["Content-Type"] = content_type
        if accept:
            headers["Accept"] = accept
        async with self._session.request(method, info.server.rstrip("/") + path, json=json, headers=headers,
                                         params=params, auth=basic, ssl=self._ssl_for(info)) as response:
            if response.status >= 400:
                text = await response.text()
                raise ApiError(response.status, text[:500], _retry_after(response.headers.get("Retry-After")))
            if response.content_type == "application/json":
                return await response.json()
            return await response.text()

    def _ssl_for(self, info: Any) -> ssl.SSLContext | bool | None:
        if self._ssl_override is not None:
            return self._ssl_override
        if self._ssl_of is None or self._ssl_of[0] is not info:  # built once per login
            self._ssl_of = (info, _ssl_context(info))
        return self._ssl_of[1]

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    # --- verbs ---------------------------------------------------------------------------------------

    async def get(self, resource: Resource, namespace: str, name: str) -> dict | None:
        try:
            return await self._request("GET", resource.path(namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def get_metadata(self, resource: Resource, namespace: str, name: str) -> dict | None:
        """Only the object's metadata (a PartialObjectMetadata: no spec, no status, no Secret data), or None."""
        try:
            return await self._request("GET", resource.path(namespace, name), accept=PARTIAL_METADATA_ACCEPT)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(self, resource: Resource, namespace: str | None = None, label_selector: str | None = None
                   ) -> list[dict]:
        params = {"labelSelector": label_selector} if label_selector else None
        result = await self._request("GET", resource.path(namespace), params=params)
        return list(result.get("items") or [])

    async def create(self, resource: Resource, body: dict, *, adopt: bool = True) -> tuple[dict, bool]:
        """Create; on 409 return the existing object (`adopt=False`: raise the 409). Returns (object, created)."""
        namespace = body["metadata"].get("namespace")
        try:
            return await self._request("POST", resource.path(namespace), json=body), True
        except ApiError as exc:
            if exc.status != 409 or not adopt:
                raise
        existing = await self.get(resource, namespace, body["metadata"]["name"])
        if existing is None:
            raise ApiError(409, f"{body['metadata']['name']} conflicts but cannot be read")
        return existing, False

    async def patch(self, resource: Resource, namespace: str, name: str, patch: dict,
                    subresource: str | None = None) -> dict:
        return await self._request("PATCH", resource.path(namespace, name, subresource), json=patch,
                                   content_type="application/merge-patch+json")

    async def json_patch(self, resource: Resource, namespace: str, name: str, operations: list[dict]) -> dict:
        """An RFC 6902 patch: with a `test` of metadata.resourceVersion first, a write that fails (422) when
        anyone wrote the object since it was read (optimistic concurrency, as kopf patches its finalizer)."""
        return await self._request("PATCH", resource.path(namespace, name), json=operations,
                                   content_type="application/json-patch+json")

    async def delete(self, resource: Resource, namespace: str, name: str) -> bool:
        try:
            await self._request("DELETE", resource.path(namespace, name),
                                json={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"})
            return True
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise

    async def post_event(self, involved: dict, event_type: str, reason: str, message: str,
                         component: str = "kubetune-operator") -> None:
        meta = involved["metadata"]
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion"),
                "kind": involved.get("kind"),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "type": event_type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": component},
            "reportingComponent": component,
            "reportingInstance": component,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self._request("POST", EVENTS.path(meta["namespace"]), json=body)
        except (ApiError, aiohttp.ClientError) as exc:  # events are best-effort, never fail a reconcile
            log.warning("could not post event", extra={"reason": reason, "error": str(exc)})


def _ssl_context(info: Any) -> ssl.SSLContext | bool | None:
    """The TLS settings of a `kopf.ConnectionInfo`-like login: its CA and client certificate."""
    if info.insecure:
        return False
    if not (info.ca_path or info.ca_data or info.certificate_path or info.certificate_data):
        return None
    context = ssl.create_default_context(cafile=info.ca_path)
    if info.ca_data:
        context.load_verify_locations(cadata=_pem(info.ca_data))
    if info.certificate_path or info.certificate_data:
        cert = info.certificate_path or _to_file(info.certificate_data)
        key = info.private_key_path or _to_file(info.private_key_data)
        context.load_cert_chain(cert, key)
    return context


def _pem(data: bytes | str) -> str:
    text = data.decode() if isinstance(data, bytes) else data
    if "BEGIN CERTIFICATE" in text:
        return text
    return base64.b64decode(text).decode()


def _to_file(data: bytes | str | None) -> str:
    with tempfile.NamedTemporaryFile(delete=False, suffix=".pem") as handle:
        handle.write(data if isinstance(data, bytes) else data.encode())
    return handle.name

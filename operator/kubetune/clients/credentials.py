"""API credentials that follow rotation: a provider that `KubeClient` consults on every request, which
logs in again before the credentials expire and, once, after a 401 (single-flight); and the service
account token file login that the agent and the in-cluster operator share. Why and how:
docs/operations.md "API credentials".
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# client-go re-reads a projected token file at most once a minute (transport.NewCachedFileTokenSource);
# kubelet writes the new token at 80% of its lifetime, so the old one is still valid meanwhile
TOKEN_FILE_MAX_AGE_SECONDS = 60.0
# refresh this long before an announced expiry (an exec plugin's expirationTimestamp), so that no
# request leaves with a token that expires on its way
EXPIRY_SKEW_SECONDS = 30.0


@dataclasses.dataclass(frozen=True)
class Login:
    """The fields of `kopf.ConnectionInfo` that `KubeClient` reads (kopf's own type is accepted too)."""

    server: str
    token: str | None = None
    scheme: str | None = None
    ca_path: str | None = None
    ca_data: bytes | str | None = None
    insecure: bool | None = None
    username: str | None = None
    password: str | None = None
    certificate_path: str | None = None
    certificate_data: bytes | str | None = None
    private_key_path: str | None = None
    private_key_data: bytes | str | None = None
    default_namespace: str | None = None
    expiration: dt.datetime | None = None

    def __repr__(self) -> str:  # never the token or the password, whatever logs it
        return f"Login(server={self.server!r}, token={'<set>' if self.token else None})"


class CredentialsProvider(Protocol):
    async def current(self) -> Any: ...

    async def refreshed(self, stale: Any) -> Any: ...


def due(expiration: dt.datetime | None, logged_in_at: float, now_monotonic: float, now_utc: dt.datetime,
        max_age: float | None, skew: float = EXPIRY_SKEW_SECONDS) -> bool:
    """Whether credentials must be renewed before the next request: they announced an expiry that is
    less than `skew` seconds away, or they are older than `max_age` (a file that may have been rewritten)."""
    if expiration is not None:
        if expiration.tzinfo is None:  # kopf: a naive expiration is UTC
            expiration = expiration.replace(tzinfo=dt.UTC)
        if (expiration - now_utc).total_seconds() <= skew:
            return True
    return max_age is not None and now_monotonic - logged_in_at >= max_age


class Static:
    """Credentials that never change (a fixed token, the tests' admin client): nothing to refresh."""

    def __init__(self, login: Any):
        self._login = login

    async def current(self) -> Any:
        return self._login

    async def refreshed(self, stale: Any) -> Any:
        return self._login


class Refreshing:
    """The current credentials from `login` (a coroutine function: the operator's kopf login, a token
    file read), renewed when `due`, and after a 401 through `refreshed(stale)`: concurrent callers that
    saw the same stale credentials cause one login, and the others get its result."""

    def __init__(self, login: Callable[[], Awaitable[Any]], *, max_age: float | None = None):
        self._login_fn, self.max_age = login, max_age
        self._info: Any = None
        self._logged_in_at = 0.0
        self._lock: asyncio.Lock | None = None
        self.logins = 0  # how many times it logged in: a figure for logs and tests

    def accept(self, info: Any) -> Any:
        """Adopt credentials obtained elsewhere (kopf's own re-login after its watch saw a 401)."""
        self._info, self._logged_in_at = info, time.monotonic()
        return info

    async def login(self) -> Any:
        """Log in now, whatever the current credentials (kopf's login handler: kopf asks when it needs)."""
        async with self._locked():
            return await self._login()

    async def current(self) -> Any:
        info = self._info
        if info is None or due(getattr(info, "expiration", None), self._logged_in_at, time.monotonic(),
                               dt.datetime.now(dt.UTC), self.max_age):
            async with self._locked():
                if self._info is info:  # nobody renewed them while this caller waited
                    return await self._login()
        return self._info

    async def refreshed(self, stale: Any) -> Any:
        async with self._locked():
            if self._info is stale:
                return await self._login()
            return self._info  # another request already logged in again after the same 401

    async def _login(self) -> Any:
        info = await self._login_fn()
        if info is None:
            raise RuntimeError("the API login found no credentials")
        self.logins += 1
        log.info("API credentials loaded", extra={"server": info.server, "logins": self.logins,
                                                  "expiration": str(getattr(info, "expiration", None))})
        return self.accept(info)

    def _locked(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock


def in_cluster_server() -> str | None:
    """The API server as a pod sees it (KUBERNETES_SERVICE_HOST/PORT), or None outside a cluster."""
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    return in_cluster_server_of(host, os.environ.get("KUBERNETES_SERVICE_PORT", "443")) if host else None


def in_cluster_server_of(host: str, port: str) -> str:
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def token_file_login(server: str, root: Path = SERVICE_ACCOUNT_DIR) -> Callable[[], Awaitable[Login]]:
    """A login that reads the service account's projected token (kubelet rewrites it as it rotates),
    with the account's CA and namespace, each time it is called."""

    async def login() -> Login:
        token = (root / "token").read_text().strip()
        if not token:
            raise RuntimeError(f"the service account token file {root / 'token'} is empty")
        namespace = root / "namespace"
        ca = root / "ca.crt"
        return Login(server=server, token=token, ca_path=str(ca) if ca.exists() else None,
                     default_namespace=namespace.read_text().strip() if namespace.exists() else None)

    return login

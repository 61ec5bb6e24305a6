"""The API server's authentication for the emulator: bearer tokens mapped to users, as service
account tokens are, and their rotation (kubelet rewrites a projected token file; the old token is
refused with 401 once it expires). Installed as the emulator's first gate."""

from __future__ import annotations

import collections
import dataclasses
import secrets
from pathlib import Path

import aiohttp.web
import kmock

from kubetune_testing.emulator import EXEMPT_HEADER, K8sEmulator
from kubetune_testing.emulator_faults import USER_KEY

POD_NAME, POD_UID = "authentication.kubernetes.io/pod-name", "authentication.kubernetes.io/pod-uid"


@dataclasses.dataclass(frozen=True)
class UserInfo:
    """Who a request comes from, as authenticators hand it to authorization and admission
    (`request.userInfo`: username, groups, extra)."""

    username: str
    groups: tuple[str, ...] = ("system:authenticated",)
    extra: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def extra_map(self) -> dict[str, list[str]]:
        return {key: list(values) for key, values in self.extra}


# the test's own client (X-Emulator-Exempt): a cluster admin, as `kubectl` with an admin kubeconfig
ADMIN = UserInfo("kubernetes-admin", ("system:masters", "system:authenticated"))


def service_account(namespace: str, name: str, *, pod: str | None = None, pod_uid: str = "") -> UserInfo:
    """The user of a ServiceAccount token; a token bound to a pod (projected, as kubelet mounts it)
    also names the pod in `extra`, as the API server does since Kubernetes 1.30."""
    extra = ((POD_NAME, (pod,)), (POD_UID, (pod_uid,))) if pod else ()
    return UserInfo(f"system:serviceaccount:{namespace}:{name}",
                    ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"),
                    extra)


def user_of(request: kmock.Request) -> UserInfo:
    """The user the gate authenticated (ADMIN where no authenticator is installed)."""
    raw = request._raw_request
    return raw.get(USER_KEY, ADMIN) if raw is not None else ADMIN


def _unauthorized(message: str) -> aiohttp.web.Response:
    return aiohttp.web.json_response({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                      "message": message, "reason": "Unauthorized", "code": 401}, status=401)


class TokenAuthenticator:
    """Bearer tokens -> users. `issue` a token (optionally into a file, as kubelet projects it),
    `rotate` it (the file gets the new one, the old one is refused), `refused` counts 401s by user."""

    def __init__(self) -> None:
        self._users: dict[str, UserInfo] = {}
        self._files: dict[str, Path] = {}
        self.refused: collections.Counter = collections.Counter()

    def install(self, k8s: K8sEmulator) -> TokenAuthenticator:
        k8s.gates.insert(0, self.gate)
        return self

    def issue(self, user: UserInfo, path: Path | None = None) -> str:
        token = secrets.token_urlsafe(24)
        self._users[token] = user
        if path is not None:
            self._files[token] = path
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(token)
        return token

    def rotate(self, token: str) -> str:
        """A new token for the same user (into the same file); the old one is refused from now on."""
        user = self._users.pop(token)
        return self.issue(user, self._files.pop(token, None))

    def rotate_all(self) -> None:
        for token in list(self._users):
            self.rotate(token)

    async def gate(self, request: kmock.Request) -> aiohttp.web.StreamResponse | None:
        raw = request._raw_request
        if raw is None:
            return None
        if raw.headers.get(EXEMPT_HEADER) is not None:
            raw[USER_KEY] = ADMIN
            return None
        scheme, _, token = (raw.headers.get("Authorization") or "").partition(" ")
        user = self._users.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            self.refused["anonymous" if not token else "unknown or expired token"] += 1
            return _unauthorized("Unauthorized")
        raw[USER_KEY] = user
        return None

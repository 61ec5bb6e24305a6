"""Credentials that follow rotation: when they are due, single-flight re-login, one retry after a 401,
the token file and kubeconfig (exec plugin) logins, and no token in any log record."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sys
from collections.abc import AsyncIterator

import aiohttp.web
import kopf
import pytest
import pytest_asyncio
import yaml

from kubetune.clients import credentials, kube
from kubetune_operator.controllers import login as operator_login

NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(("expiration", "age", "max_age", "expected"), [
    (None, 10_000.0, None, False),                    # a fixed kubeconfig token: only a 401 renews it
    (NOW + dt.timedelta(hours=1), 0.0, None, False),
    (NOW + dt.timedelta(seconds=10), 0.0, None, True),  # within the skew: renewed before it expires
    (NOW - dt.timedelta(seconds=1), 0.0, None, True),
    (dt.datetime(2026, 1, 1, 12, 0, 5), 0.0, None, True),  # naive means UTC, as in kopf
    (None, 59.0, 60.0, False),
    (None, 60.0, 60.0, True),                         # a token file: re-read once a minute
])
def test_credentials_are_due_before_their_expiry_or_when_old(expiration, age, max_age, expected):
    assert credentials.due(expiration, 100.0, 100.0 + age, NOW, max_age) is expected


class Logins:
    """A login that hands out token-1, token-2... (a rotating source), slowly enough to overlap."""

    def __init__(self, server: str = "http://api", delay: float = 0.05, rotate: bool = True):
        self.server, self.delay, self.rotate, self.calls = server, delay, rotate, 0

    async def __call__(self) -> credentials.Login:
        self.calls += 1
        await asyncio.sleep(self.delay)
        return credentials.Login(server=self.server, token=f"token-{self.calls if self.rotate else 1}")


async def test_concurrent_refreshes_after_one_401_log_in_once():
    provider = credentials.Refreshing(Logins())
    stale = await provider.current()
    fresh = await asyncio.gather(*(provider.refreshed(stale) for _ in range(20)))
    assert {info.token for info in fresh} == {"token-2"} and provider.logins == 2
    assert await provider.current() is fresh[0]  # not due: no further login
    assert await provider.refreshed(stale) is fresh[0]  # a late caller with the old one: no new login


class ApiServer:
    """An API server that accepts one bearer token at a time, as after a rotation."""

    def __init__(self) -> None:
        self.valid = "token-1"
        self.seen: list[str] = []

    async def handle(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        self.seen.append(token)
        if token != self.valid:
            return aiohttp.web.json_response({"kind": "Status", "code": 401, "reason": "Unauthorized"}, status=401)
        return aiohttp.web.json_response({"items": [{"metadata": {"name": "cm"}}]})


@pytest_asyncio.fixture()
async def api_server() -> AsyncIterator[tuple[ApiServer, str]]:
    server = ApiServer()
    app = aiohttp.web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield server, f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def test_a_401_logs_in_again_once_and_retries_every_request_once(api_server, caplog):
    server, url = api_server
    logins = Logins(url)
    client = kube.KubeClient.from_credentials(credentials.Refreshing(logins))
    caplog.set_level(logging.DEBUG)
    try:
        assert await client.list(kube.CONFIGMAPS, "ns")
        server.valid = "token-2"  # rotated: token-1 is refused from now on
        results = await asyncio.gather(*(client.list(kube.CONFIGMAPS, "ns") for _ in range(10)))
        assert all(results) and logins.calls == 2  # ten 401s, one re-login
        assert server.seen.count("token-1") == 11 and server.seen.count("token-2") == 10
    finally:
        await client.close()
    records = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "API credentials refreshed after a 401" in records
    assert "token-1" not in records and "token-2" not in records  # tokens are never logged


async def test_a_second_401_is_an_error(api_server):
    server, url = api_server
    server.valid = "never"
    for provider in (credentials.Refreshing(Logins(url, rotate=False)),  # a login that brings nothing new
                     credentials.Refreshing(Logins(url))):                # a new token, refused as well
        client = kube.KubeClient.from_credentials(provider)
        with pytest.raises(kube.ApiError) as refused:
            await client.list(kube.CONFIGMAPS, "ns")
        assert refused.value.status == 401 and provider.logins == 2
        await client.close()
    fixed = kube.KubeClient(url, token="token-1", retries=0)  # nothing to refresh: no retry
    seen = len(server.seen)
    with pytest.raises(kube.ApiError):
        await fixed.list(kube.CONFIGMAPS, "ns")
    assert len(server.seen) == seen + 1
    await fixed.close()


async def test_the_token_file_is_re_read_when_due(tmp_path, api_server):
    server, url = api_server
    (tmp_path / "token").write_text("token-1\n")
    (tmp_path / "namespace").write_text("kubetune-system")
    provider = credentials.Refreshing(credentials.token_file_login(url, tmp_path), max_age=0.2)
    client = kube.KubeClient.from_credentials(provider)
    try:
        first = await provider.current()
        assert first.token == "token-1" and first.default_namespace == "kubetune-system"
        assert "token-1" not in repr(first)
        (tmp_path / "token").write_text("token-2\n")
        server.valid = "token-2"
        await asyncio.sleep(0.25)
        assert await client.list(kube.CONFIGMAPS, "ns")
        assert server.seen == ["token-2"]  # re-read before the request: no 401 at all
    finally:
        await client.close()


async def test_in_cluster_the_operator_reads_its_service_account(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    (tmp_path / "token").write_text("sa-token")
    info = await operator_login.login(operator_login.Source(service_account=tmp_path))
    assert (info.server, info.token, info.ca_path) == ("https://10.0.0.1:6443", "sa-token", None)
    assert info.expiration is not None  # kopf and our client re-read the file within a minute


EXEC_PLUGIN = """
import json, sys
token, runs = open(sys.argv[1]).read().strip(), sys.argv[2]
open(runs, "a").write("run\\n")
print(json.dumps({"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
                  "status": {"token": token, "expirationTimestamp": sys.argv[3]}}))
"""


def exec_kubeconfig(tmp_path, server: str, expiry: str) -> str:
    """A kubeconfig whose user is an exec plugin printing the token in `token` (as EKS's and GKE's)."""
    plugin = tmp_path / "plugin.py"
    plugin.write_text(EXEC_PLUGIN)
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u", "namespace": "team-a"}}],
        "users": [{"name": "u", "user": {"exec": {
            "apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable, "interactiveMode": "Never",
            "args": [str(plugin), str(tmp_path / "token"), str(tmp_path / "runs"), expiry]}}}]}))
    return str(path)


async def test_an_exec_plugin_runs_on_every_login_and_its_expiry_is_kept(tmp_path):
    (tmp_path / "token").write_text("exec-1")
    source = operator_login.Source(kubeconfig=exec_kubeconfig(tmp_path, "https://api.example:6443",
                                                              "2030-01-01T00:00:00Z"))
    info = await operator_login.login(source)
    assert (info.server, info.token, info.default_namespace) == ("https://api.example:6443", "exec-1", "team-a")
    assert info.expiration == dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    (tmp_path / "token").write_text("exec-2")
    assert (await operator_login.login(source)).token == "exec-2"
    assert (tmp_path / "runs").read_text().count("run") == 2


async def test_a_missing_kubeconfig_is_a_clear_login_error(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBECONFIG", raising=False)
    source = operator_login.Source(kubeconfig=str(tmp_path / "absent"), service_account=tmp_path)
    with pytest.raises(kopf.LoginError, match=r"no API credentials.*absent"):
        await operator_login.login(source)

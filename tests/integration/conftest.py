"""Integration harness: kopf runs our operator in-process against a KMock Kubernetes emulator over
real HTTP, and the operator verifies adapters in a real S3 server (SeaweedFS) started here. The emulator
authenticates every request: the operator logs in with its ServiceAccount's token through a kubeconfig,
as the product does; the test's own client is the cluster admin."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import os
import tempfile
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import kopf
import pytest
import pytest_asyncio
import yaml

from kubetune.clients import kube, storage
from kubetune_operator.clients import drift_storage
from kubetune_operator.controllers import adapterdeployment as adep_controller
from kubetune_operator.controllers import finetunejob as ftj_controller
from kubetune_operator.controllers import login as operator_login
from kubetune_operator.controllers import main as operator_main
from kubetune_operator.reconcile import adapterdeployment as adp
from kubetune_operator.reconcile import finetunejob as ftj
from kubetune_operator.render import serving as serving_render
from kubetune_testing import auth, enforcement, rbac_coverage, seaweedfs
from kubetune_testing.emulator import EXEMPT_HEADER, K8sEmulator, declare_resources
from kubetune_testing.seaweedfs import S3Server
from kubetune_testing.served_requests import ForgetfulEmulator

pytestmark = pytest.mark.integration

NS = "team-a"
# the chart's ServiceAccount (charts/kubetune): the user the RBAC that the chart renders is bound to
OPERATOR_USER = auth.service_account("kubetune-system", "kubetune")
SECRET_NAMESPACES = ("team-a", "team-b", "ml-platform")  # the chart's rbac.secretNamespaces (ClusterRole mode)
RBAC_USES: set = set()  # every authorized request of the session's flows (rbac_coverage, at the session's end)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    """A real S3 server (SeaweedFS on loopback) for the whole session."""
    try:
        weed = seaweedfs.start(tmp_path_factory.mktemp("seaweedfs"))
    except seaweedfs.SeaweedFSError as exc:
        pytest.fail(str(exc))
    yield weed.server
    weed.stop()


@pytest_asyncio.fixture()
async def k8s(request) -> AsyncIterator[K8sEmulator]:
    """The emulator as a cluster with the chart installed sees requests: bearer tokens authenticated
    (`k8s.authenticator`), RBAC of the chart in ClusterRole mode enforced (`k8s.enforcement`; see
    `enforce_watch_namespaces` for the other mode), every authorized use recorded for the coverage check.
    A test marked `forget_served_requests` (it reads no request history) gets the O(1)-routing emulator."""
    forgetful = request.node.get_closest_marker("forget_served_requests") is not None
    async with (ForgetfulEmulator if forgetful else K8sEmulator)() as emulator, kmock.Server(emulator):
        declare_resources(emulator)
        emulator.authenticator = auth.TokenAuthenticator().install(emulator)
        emulator.enforcement = enforcement.enforce(emulator, secret_namespaces=SECRET_NAMESPACES,
                                                   uses=RBAC_USES)
        yield emulator


def write_kubeconfig(path: Path, server: str, user: dict, namespace: str | None = None,
                     ca_path: Path | None = None) -> Path:
    """A kubeconfig for the emulator with `user` (`{"token": ...}`, `{"tokenFile": ...}`, `{"exec": ...}`)."""
    context = {"cluster": "emulator", "user": "user", **({"namespace": namespace} if namespace else {})}
    cluster = {"server": server.rstrip("/"), **({"certificate-authority": str(ca_path)} if ca_path else {})}
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": cluster}],
        "users": [{"name": "user", "user": user}],
        "contexts": [{"name": "emulator", "context": context}]}))
    return path


def admin_client(k8s: K8sEmulator, **kw: Any) -> kube.KubeClient:
    """The test's own client, a cluster admin (as kubectl with an admin kubeconfig), spared the faults."""
    return kube.KubeClient(str(k8s.url), headers={EXEMPT_HEADER: "1"}, **kw)


def enforce_watch_namespaces(k8s: K8sEmulator, namespaces: tuple[str, ...], uses: set | None = None) -> None:
    """Authorize against the chart rendered with `watchNamespaces` instead (Roles per namespace)."""
    k8s.enforcement.remove()
    k8s.enforcement = enforcement.enforce(k8s, watch_namespaces=namespaces,
                                          uses=RBAC_USES if uses is None else uses)


class Operator:
    """kopf running kubetune's handlers in its own thread and event loop, against the emulator over
    HTTP, as a deployed operator would; stop() and start() simulate an operator restart.

    kopf treats every asyncio task created after its start-up as its own and cancels it at exit,
    so it must not share the test's event loop."""

    def __init__(self, k8s: K8sEmulator, s3: S3Server, settings: ftj.Settings,
                 adep_settings: adp.Settings | None = None, namespaces: tuple[str, ...] = ()):
        self.k8s, self.s3, self.settings = k8s, s3, settings
        self.namespaces = namespaces  # empty: the whole cluster (--all-namespaces), else --namespace each
        self.adep_settings = adep_settings or adp.Settings(resync_seconds=0.5)
        self.thread: threading.Thread | None = None
        self.stop_flag: threading.Event | None = None
        self.error: BaseException | None = None
        # the ServiceAccount token in a file that a kubeconfig names (`tokenFile`), read by the operator's
        # own login (controllers/login.py): `rotate_token` rewrites it and the old token is refused
        self._home = tempfile.TemporaryDirectory(prefix="kubetune-operator-")
        self.token_file = Path(self._home.name) / "token"
        self.token = k8s.authenticator.issue(OPERATOR_USER, self.token_file)
        self.kubeconfig = write_kubeconfig(Path(self._home.name) / "kubeconfig", str(k8s.url),
                                           {"tokenFile": str(self.token_file)})
        self.credentials = None  # the operator's credentials provider, once started

    def rotate_token(self) -> str:
        """Rotate the operator's token as kubelet does (a new one in the file; the old one refused)."""
        self.token = self.k8s.authenticator.rotate(self.token)
        return self.token

    async def start(self) -> None:
        runtime = ftj_controller.RUNTIME
        runtime.settings = self.settings
        runtime.default_s3 = storage.S3Settings(endpoint=self.s3.endpoint)
        runtime.locks.clear()
        serving_runtime = adep_controller.RUNTIME
        serving_runtime.settings = self.adep_settings
        serving_runtime.resync_seconds = self.adep_settings.resync_seconds
        serving_runtime.watch_namespaces = self.namespaces
        serving_runtime.default_s3 = runtime.default_s3
        serving_runtime.locks.clear()
        serving_runtime.verified.clear()
        serving_runtime.base_identities.clear()
        # drift caches and settings: fresh per operator start, samples analysed on every pass
        serving_runtime.analyzer = drift_storage.Analyzer(drift_seconds=0.2)
        registry = kopf.OperatorRegistry()
        operator_main.register_all(registry)
        self.credentials = operator_login.register(registry, operator_login.Source(kubeconfig=str(self.kubeconfig)))
        settings = kopf.OperatorSettings()
        operator_main.configure(settings)
        settings.watching.reconnect_backoff = 0.1
        settings.networking.error_backoffs = [0.1, 0.2, 0.5]
        self.stop_flag, ready = threading.Event(), threading.Event()

        def run() -> None:
            try:
                asyncio.run(kopf.operator(
                    registry=registry, settings=settings, clusterwide=not self.namespaces,
                    namespaces=self.namespaces, standalone=True,
                    memo=kopf.Memo(), stop_flag=self.stop_flag, ready_flag=ready))
            except BaseException as exc:  # surfaced by stop()
                self.error = exc

        self.thread = threading.Thread(target=run, name="kubetune-operator", daemon=True)
        self.thread.start()
        if not await asyncio.to_thread(ready.wait, 15):
            raise TimeoutError(f"operator did not start: {self.error!r}")

    async def stop(self) -> None:
        if self.thread is None:
            return
        self.stop_flag.set()
        await asyncio.to_thread(self.thread.join, 60)
        assert not self.thread.is_alive(), "operator did not stop within 60s"
        self.thread = None
        if self.error is not None and not isinstance(self.error, asyncio.CancelledError):
            raise self.error


@pytest_asyncio.fixture()
async def operator(k8s, s3_server) -> AsyncIterator[Operator]:
    logging.getLogger("kopf").setLevel(logging.INFO)
    handle = Operator(k8s, s3_server, ftj.Settings(publish_timeout_seconds=5, resync_seconds=0.5, progress_seconds=0.5))
    await handle.start()
    yield handle
    await handle.stop()
    assert not operator_refusals(k8s)


def operator_refusals(k8s: K8sEmulator) -> list[str]:
    """What RBAC refused the operator in this test: nothing, as the chart's RBAC must be sufficient,
    but what the test expects (`k8s.expected_refusals`: parts of the messages, e.g. a namespace's Secrets)."""
    expected = getattr(k8s, "expected_refusals", ())
    return [m for m in k8s.enforcement.authorizer.refused
            if f'"{OPERATOR_USER.username}"' in m and not any(part in m for part in expected)]


@pytest_asyncio.fixture()
async def namespaced_operator(k8s, s3_server) -> AsyncIterator[Operator]:
    """The operator scoped to NS (the chart's `watchNamespaces: [NS]`), under that layout's RBAC."""
    enforce_watch_namespaces(k8s, (NS,))
    # kopf's namespace observer lists them (KMock's HTTP side cannot create cluster-scoped objects)
    k8s.objects[kmock.resource("", "v1", "namespaces"), None, NS] = {
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}
    handle = Operator(k8s, s3_server, ftj.Settings(publish_timeout_seconds=5, resync_seconds=0.5, progress_seconds=0.5),
                      namespaces=(NS,))
    await handle.start()
    yield handle
    await handle.stop()
    assert not operator_refusals(k8s)


class Api:
    """The test's own view of the cluster over HTTP, like kubectl with an admin's kubeconfig (and the
    training operator); `agent` is the client of one serving pod's agent (its pod-bound token)."""

    def __init__(self, k8s: K8sEmulator):
        self.k8s = k8s
        self.client = admin_client(k8s)
        self._agents: dict[str, kube.KubeClient] = {}

    def agent(self, adapterdeployment: str, pod: str) -> kube.KubeClient:
        if pod not in self._agents:
            account = serving_render.agent_account_name(adapterdeployment)
            token = self.k8s.authenticator.issue(auth.service_account(NS, account, pod=pod))
            self._agents[pod] = kube.KubeClient(str(self.k8s.url), token=token)
        return self._agents[pod]

    async def create_secret(self, name: str, data: dict[str, str]) -> None:
        await self.client.create(kube.SECRETS, {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}})

    async def get(self, resource: kube.Resource, name: str) -> dict | None:
        return await self.client.get(resource, NS, name)

    async def list(self, resource: kube.Resource) -> list[dict]:
        return await self.client.list(resource, NS)

    async def set_pytorchjob_conditions(self, name: str, *conditions: tuple[str, str, str], **extra) -> None:
        """Play the Kubeflow training operator: write the PyTorchJob's status."""
        now = ftj_controller.now_rfc3339()
        status = {"conditions": [{"type": t, "status": "True", "reason": r, "message": m,
                                  "lastUpdateTime": now, "lastTransitionTime": now} for t, r, m in conditions]}
        status.update(extra)
        await self.client.patch(kube.PYTORCHJOBS, NS, name, {"status": status}, subresource="status")

    async def close(self) -> None:
        for client in [self.client, *self._agents.values()]:
            await client.close()


@pytest_asyncio.fixture()
async def api(k8s) -> AsyncIterator[Api]:
    handle = Api(k8s)
    yield handle
    await handle.close()


async def eventually(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Await `check()` (sync or async) until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return result
        except (KeyError, AssertionError, TypeError, aiohttp.ClientError) as exc:
            last_error = exc
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"condition not met in {timeout}s: {check} (last error: {last_error!r})")
        await asyncio.sleep(interval)


# --- RBAC coverage, once the whole integration suite ran ------------------------------------------------


def _ran_every_flow(session: pytest.Session) -> bool:
    """The coverage check needs every flow: the session's arguments include all of tests/integration
    and nothing was deselected or filtered by -k/-m."""
    here = Path(__file__).resolve().parent
    options = session.config.option
    if getattr(options, "keyword", "") or getattr(options, "markexpr", "") or session.config.getoption("deselect"):
        return False
    arguments = [Path(str(a).split("::")[0]).resolve() for a in session.config.args]
    return any(here == a or a in here.parents for a in arguments)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    record = os.environ.get("KUBETUNE_RBAC_USES")  # a file to collect the uses of partial runs into
    if record:
        with open(record, "a") as out:
            out.writelines(json.dumps(dataclasses.asdict(u)) + "\n" for u in sorted(RBAC_USES, key=str))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if exitstatus != 0 or not _ran_every_flow(session):
        if reporter is not None and RBAC_USES:
            reporter.write_line("RBAC coverage: not checked (it needs every integration flow, passing)")
        return
    found = rbac_coverage.problems(rbac_coverage.granted(), rbac_coverage.used(RBAC_USES),
                                   rbac_coverage.unexercised())
    if reporter is not None:
        reporter.write_line("RBAC coverage: " + ("every granted verb was used" if not found else "FAILED"))
        for line in found:
            reporter.write_line(f"  {line}")
    if found:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

"""The agent's cluster side: the desired ConfigMap read and the Pod annotation patched through the
Kubernetes API over TLS, with the service account's token (re-read when kubelet rotates it)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import ssl

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kubetune import runtimes
from kubetune.api import serving
from kubetune.clients.storage import ObjectStore
from kubetune_agent import __main__ as agent_main
from kubetune_agent import kube, sync
from kubetune_agent.proxy import serve
from tests.agent.conftest import NS, desired_state, eventually, publish


def _self_signed(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "server.crt", tmp_path / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class FakeApiServer:
    def __init__(self):
        self.token = "token-1"
        self.config_maps: dict[str, dict] = {}
        self.pod = {"metadata": {"name": "serve-0", "namespace": NS, "annotations": {"other": "kept"}}}
        self.patches: list[tuple[str, dict]] = []
        self.unauthorized = 0

    def _authorized(self, request) -> bool:
        ok = request.headers.get("Authorization") == f"Bearer {self.token}"
        self.unauthorized += not ok
        return ok

    async def get_config_map(self, request):
        if not self._authorized(request):
            return web.json_response({"kind": "Status", "code": 401}, status=401)
        found = self.config_maps.get(request.match_info["name"])
        if request.match_info["ns"] != NS or found is None:
            return web.json_response({"kind": "Status", "code": 404, "reason": "NotFound"}, status=404)
        return web.json_response(found)

    async def patch_pod(self, request):
        if not self._authorized(request):
            return web.json_response({"kind": "Status", "code": 401}, status=401)
        assert request.match_info["ns"] == NS and request.match_info["name"] == "serve-0"
        patch = await request.json()
        self.patches.append((request.content_type, patch))
        self.pod["metadata"]["annotations"].update(patch["metadata"]["annotations"])
        return web.json_response(self.pod)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/configmaps/{name}", self.get_config_map)
        app.router.add_patch("/api/v1/namespaces/{ns}/pods/{name}", self.patch_pod)
        return app


@pytest.fixture
async def api_server(tmp_path):
    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    fake = FakeApiServer()
    runner = web.AppRunner(fake.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "ca.crt").write_bytes(cert.read_bytes())
    (account / "token").write_text(fake.token + "\n")
    fake.port = runner.addresses[0][1]
    fake.account = account
    yield fake
    await runner.cleanup()


async def test_desired_configmap_in_and_pod_annotation_out(api_server, engine, tmp_path, monkeypatch):
    version = publish(tmp_path, "intents", b"\x01" * 256)
    api_server.config_maps[serving.desired_config_map_name("intents")] = {
        "data": {serving.DESIRED_KEY: desired_state(5, {f"{NS}/intents": [version]}).to_json()}}
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(api_server.port))
    kubernetes = kube.InClusterKube(root=api_server.account)
    config = sync.AgentConfig(engine_url=engine.url, namespace=NS, pod="serve-0", cache_dir=tmp_path / "cache",
                              sync_seconds=0.1, report_seconds=0.2)
    agent = sync.Agent(config, kube.DesiredConfigMap(kubernetes, NS, "intents-desired"),
                       kube.PodAnnotation(kubernetes, NS, "serve-0"), ObjectStore())

    def annotated():
        text = api_server.pod["metadata"]["annotations"].get(serving.ANNOTATION_REPORT)
        report = serving.AgentReport.from_json(text) if text else None
        return report if report and report.generation == 5 and report.loaded else None

    async with serve(agent, "127.0.0.1", 0):
        report = await eventually(annotated, message="report annotation")
        assert report.loaded == {version.name: version.digest}
        assert version.name in engine.loaded
        assert api_server.pod["metadata"]["annotations"]["other"] == "kept"
        assert api_server.patches[0][0] == "application/merge-patch+json"
        assert set(api_server.patches[0][1]["metadata"]) == {"annotations"}
        # kubelet rotates the token: the next calls carry the new one
        api_server.token = "token-2"
        (api_server.account / "token").write_text("token-2\n")
        patches = len(api_server.patches)
        await eventually(lambda: len(api_server.patches) > patches + 1, message="patches with the new token")
        # the ConfigMap goes away: the last desired state stays, nothing is unloaded
        api_server.config_maps.clear()
        await eventually(lambda: len(api_server.patches) > patches + 4, message="more reports")
        assert version.name in engine.loaded
    assert api_server.unauthorized <= 2  # at most the calls in flight while the token changed
    final = serving.AgentReport.from_json(api_server.pod["metadata"]["annotations"][serving.ANNOTATION_REPORT])
    assert json.loads(final.to_json())["api"] == serving.REPORT_API


def test_outside_a_cluster_the_in_cluster_client_refuses(monkeypatch, tmp_path):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(kube.NotInCluster):
        kube.InClusterKube(root=tmp_path)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    with pytest.raises(kube.NotInCluster):
        kube.InClusterKube(root=tmp_path)  # no ca.crt


def test_the_agent_speaks_the_control_api_of_the_runtime_it_is_told(monkeypatch, tmp_path):
    monkeypatch.delenv("KUBETUNE_RUNTIME", raising=False)
    common = ["--namespace", NS, "--desired-file", str(tmp_path / "d.json"), "--report-file", str(tmp_path / "r")]
    assert agent_main.parse_args(common).runtime == runtimes.DEFAULT_ENGINE
    args = agent_main.parse_args([*common, "--runtime", "kubetune-cpu", "--cache-dir", str(tmp_path / "cache")])
    assert agent_main.build(args).config.runtime == "kubetune-cpu"
    with pytest.raises(SystemExit):
        agent_main.parse_args([*common, "--runtime", "no-such-engine"])

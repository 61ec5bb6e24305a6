"""The operator reads simple kubeconfigs itself (controllers.login.static_kubeconfig) and leaves the rest,
and its errors, to kubernetes_asyncio."""

from __future__ import annotations

import subprocess
import sys

import yaml

from kubetune_operator.controllers.login import static_kubeconfig


def _kubeconfig(tmp_path, user, cluster=None, context="emu", namespace=None):
    path = tmp_path / "config"
    ctx = {"cluster": "c", "user": "u", **({"namespace": namespace} if namespace else {})}
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": context,
        "clusters": [{"name": "c", "cluster": cluster or {"server": "https://api:6443"}}],
        "users": [{"name": "u", "user": user}], "contexts": [{"name": "emu", "context": ctx}]}))
    return str(path)


def test_a_token_a_ca_file_and_a_namespace(tmp_path):
    path = _kubeconfig(tmp_path, {"token": "t0k"}, {"server": "https://api:6443", "certificate-authority": "ca.crt"},
                       namespace="team-a")
    info = static_kubeconfig(path, None)
    assert info["server"] == "https://api:6443" and info["token"] == "t0k" and not info["insecure"]
    assert info["ca_path"] == str(tmp_path / "ca.crt")  # relative to the kubeconfig, as client-go resolves it
    assert info["default_namespace"] == "team-a"


def test_a_token_file_is_read_on_every_login(tmp_path):
    (tmp_path / "token").write_text("first\n")
    path = _kubeconfig(tmp_path, {"tokenFile": "token"})
    assert static_kubeconfig(path, None)["token"] == "first"
    (tmp_path / "token").write_text("rotated\n")
    assert static_kubeconfig(path, None)["token"] == "rotated"


def test_client_certificates_and_basic_auth(tmp_path):
    info = static_kubeconfig(_kubeconfig(tmp_path, {"client-certificate": "/pki/u.crt", "client-key": "/pki/u.key"}),
                             "emu")
    assert info["certificate_path"] == "/pki/u.crt" and info["private_key_path"] == "/pki/u.key"
    assert info["token"] is None
    assert static_kubeconfig(_kubeconfig(tmp_path, {"username": "a", "password": "b"}), None)["username"] == "a"


def test_plugins_inline_data_and_broken_files_go_to_kubernetes_asyncio(tmp_path):
    exec_user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "get-token"}}
    assert static_kubeconfig(_kubeconfig(tmp_path, exec_user), None) is None
    assert static_kubeconfig(_kubeconfig(tmp_path, {"auth-provider": {"name": "oidc"}}), None) is None
    assert static_kubeconfig(_kubeconfig(tmp_path, {"client-certificate-data": "LS0t"}), None) is None
    inline_ca = {"server": "https://api", "certificate-authority-data": "LS0t"}
    assert static_kubeconfig(_kubeconfig(tmp_path, {"token": "t"}, inline_ca), None) is None
    assert static_kubeconfig(_kubeconfig(tmp_path, {"token": "t"}), "no-such-context") is None
    assert static_kubeconfig(_kubeconfig(tmp_path, {"tokenFile": "missing"}), None) is None
    assert static_kubeconfig(str(tmp_path / "absent"), None) is None
    (tmp_path / "bad").write_text("{ not yaml")
    assert static_kubeconfig(str(tmp_path / "bad"), None) is None


def test_the_operator_starts_without_kubernetes_asyncio_in_memory():
    code = ("import sys, kubetune_operator.controllers.main; "
            "assert 'kubernetes_asyncio' not in sys.modules; "
            "from kubernetes_asyncio import config")  # and a login that needs it still imports it
    subprocess.run([sys.executable, "-c", code], check=True)

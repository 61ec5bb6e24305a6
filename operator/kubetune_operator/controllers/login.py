"""The operator's API login, one function for kopf's `@kopf.on.login` and for our `KubeClient`'s
credentials provider, so both follow rotated tokens: in a cluster the projected ServiceAccount token
re-read, outside it a kubeconfig: read here when it names only a server, a CA file, a token (file) or a
client certificate; through kubernetes_asyncio otherwise (exec plugins, OIDC, inline data).
docs/operations.md "API credentials".
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import os
from pathlib import Path

import kopf
import yaml

from kubetune.clients import credentials, kube

from . import adapterdeployment, finetunejob


@dataclasses.dataclass(frozen=True)
class Source:
    """Where the credentials come from. As controller-runtime's config.GetConfig: an explicit kubeconfig
    (`kubeconfig`, else $KUBECONFIG), else the pod's service account, else ~/.kube/config."""

    kubeconfig: str | None = None  # one path or several joined by os.pathsep, as $KUBECONFIG
    context: str | None = None
    service_account: Path = credentials.SERVICE_ACCOUNT_DIR

    def explicit_kubeconfig(self) -> str | None:
        return self.kubeconfig or os.environ.get("KUBECONFIG") or None


async def login(source: Source) -> kopf.ConnectionInfo:
    kubeconfig = source.explicit_kubeconfig()
    if kubeconfig is None and (source.service_account / "token").exists():
        server = credentials.in_cluster_server() or "https://kubernetes.default.svc"
        account = await credentials.token_file_login(server, source.service_account)()
        # kubelet rewrites the file as the token rotates: re-read it within a minute, as client-go does
        # (kopf also logs in again once this passes)
        renew_by = dt.datetime.now(dt.UTC) + dt.timedelta(
            seconds=credentials.TOKEN_FILE_MAX_AGE_SECONDS + credentials.EXPIRY_SKEW_SECONDS)
        return kopf.ConnectionInfo(server=account.server, token=account.token, ca_path=account.ca_path,
                                   default_namespace=account.default_namespace, expiration=renew_by)
    return await _kubeconfig_login(kubeconfig or os.path.expanduser("~/.kube/config"), source.context)


# What a kubeconfig may hold for this module to read it itself; anything else goes to kubernetes_asyncio,
# whose client package alone is ~40 MiB of memory (all the API's models) that such logins never need.
_STATIC_USER = {"token", "tokenFile", "client-certificate", "client-key", "username", "password"}
_STATIC_CLUSTER = {"server", "certificate-authority", "insecure-skip-tls-verify"}


def _named(entries: object, name: object) -> dict | None:
    found = [e for e in entries or [] if isinstance(e, dict) and e.get("name") == name] if isinstance(
        entries, list) else []
    return found[0] if found and isinstance(found[0], dict) else None


def static_kubeconfig(path: str, context: str | None) -> dict | None:
    """kopf.ConnectionInfo's fields from one kubeconfig file that needs no plugin, inline data or merge;
    None: leave it to kubernetes_asyncio (which also gives the errors). Paths in it are relative to its
    directory, as client-go resolves them; a token file is re-read on every login (rotation)."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
        ctx = (_named(doc.get("contexts"), context or doc.get("current-context")) or {}).get("context") or {}
        cluster = (_named(doc.get("clusters"), ctx.get("cluster")) or {}).get("cluster")
        user = (_named(doc.get("users"), ctx.get("user")) or {}).get("user")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    if not isinstance(cluster, dict) or not isinstance(user, dict) or not cluster.get("server") \
            or set(cluster) - _STATIC_CLUSTER or set(user) - _STATIC_USER:
        return None
    base = Path(path).parent

    def local(value: object) -> str | None:
        return str(base / value) if isinstance(value, str) and value else None

    try:
        token = user.get("token") or (Path(local(user["tokenFile"])).read_text().strip() if "tokenFile" in user
                                      else None)
    except OSError:
        return None
    return {"server": cluster["server"], "ca_path": local(cluster.get("certificate-authority")),
            "insecure": bool(cluster.get("insecure-skip-tls-verify")), "token": token or None,
            "certificate_path": local(user.get("client-certificate")),
            "private_key_path": local(user.get("client-key")), "username": user.get("username"),
            "password": user.get("password"), "default_namespace": ctx.get("namespace")}


async def _kubeconfig_login(paths: str, context: str | None) -> kopf.ConnectionInfo:
    """Each call loads the kubeconfig anew, so an exec plugin runs again (kopf's own
    `login_via_async_client` does the same through the global configuration; this keeps the plugin's
    expirationTimestamp, which it drops)."""
    static = None if os.pathsep in paths else static_kubeconfig(paths, context)
    if static is not None:
        return kopf.ConnectionInfo(**static)
    try:
        from kubernetes_asyncio import client as k8s_client
        from kubernetes_asyncio import config as k8s_config
    except ImportError as exc:  # a dependency of kubetune[operator]
        raise kopf.LoginError(f"a kubeconfig login needs kubernetes_asyncio (pip install 'kubetune[operator]'): {exc}"
                              ) from exc

    configuration = k8s_client.Configuration()
    try:
        loader = await k8s_config.load_kube_config(config_file=paths, context=context,
                                                   client_configuration=configuration, persist_config=False)
    except (k8s_config.ConfigException, OSError) as exc:
        raise kopf.LoginError(f"no API credentials: not in a cluster, and the kubeconfig {paths}: {exc}") from exc
    header = configuration.api_key.get("BearerToken") or ""
    scheme, _, token = header.partition(" ") if " " in header else ("", "", header)
    expiry = getattr(loader, "exec_plugin_expiry", None)  # set by an exec plugin's expirationTimestamp only
    namespace = ((loader.current_context or {}).get("context") or {}).get("namespace")
    return kopf.ConnectionInfo(
        server=configuration.host, ca_path=configuration.ssl_ca_cert, insecure=not configuration.verify_ssl,
        scheme=scheme or None, token=token or None, certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file, default_namespace=namespace,
        expiration=expiry if isinstance(expiry, dt.datetime) else None)


def register(registry: kopf.OperatorRegistry | None = None, source: Source | None = None
             ) -> credentials.Refreshing:
    """kopf's login handler and the reconcilers' client, on one credentials provider: whichever meets
    the expired token first logs in again, and the other uses the result."""
    provider = credentials.Refreshing(functools.partial(login, source or Source()))
    client = kube.KubeClient.from_credentials(provider)
    finetunejob.RUNTIME.client = client
    adapterdeployment.RUNTIME.client = client
    kw = {"registry": registry} if registry is not None else {}

    @kopf.on.login(**kw)
    async def api_login(**_):
        return await provider.login()

    return provider

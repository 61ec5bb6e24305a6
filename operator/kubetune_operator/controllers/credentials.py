"""Object-storage access for a resource, with the credentials its spec names (one Secret, read by key)."""

from __future__ import annotations

import base64
import logging
from collections import OrderedDict

from kubetune.api import storage_location
from kubetune.clients import kube, storage
from kubetune_operator.reconcile import secrets as secret_rules

log = logging.getLogger("kubetune.credentials")


class PassSecrets:
    """The Secrets one reconcile pass reads, each GET at most once: the storage credentials are wanted
    both to build the S3 client and to check their keys (reconcile.secrets)."""

    def __init__(self, client: kube.KubeClient, namespace: str):
        self.client, self.namespace = client, namespace
        self._read: dict[str, dict | None] = {}

    async def get(self, name: str) -> dict | None:
        if name not in self._read:
            self._read[name] = await self.client.get(kube.SECRETS, self.namespace, name)
        return self._read[name]


async def secret_keys(secrets: PassSecrets, names: list[str], section: dict | None
                      ) -> dict[str, frozenset | bool | str | None]:
    """For reconcile.secrets: which keys each named Secret has (None: it does not exist).
    Only the Secret of the storage `section`'s credentials (which the operator reads anyway, to reach
    storage) is read whole, and only its key names leave this function; every other one is read as
    metadata only (reconcile.secrets.EXISTS: its values never reach the operator). A Secret the operator
    may not read (403: its namespace did not grant the chart's Secrets role) is NOT_READABLE, reported
    as such in the object's status."""
    credentials = section.get("credentials") if isinstance(section, dict) else None
    own = credentials.get("secretName") if isinstance(credentials, dict) else None
    found: dict[str, frozenset | bool | str | None] = {}
    for name in names:
        try:
            if name == own:
                secret = await secrets.get(name)
                found[name] = None if secret is None else frozenset(secret.get("data") or {})
            else:
                metadata = await secrets.client.get_metadata(kube.SECRETS, secrets.namespace, name)
                found[name] = None if metadata is None else True
        except kube.ApiError as exc:
            if exc.status != 403:
                raise
            log.warning("may not read Secret", extra={"namespace": secrets.namespace, "secret": name})
            found[name] = secret_rules.NOT_READABLE
    return found


class RefusedStore(storage.ObjectStore):
    """The storage of a spec whose credentials Secret RBAC keeps from the operator: every S3 access
    fails with why (never falling back to the operator's own credentials); the SecretsFound condition
    tells the user (reconcile.secrets.SECRET_NOT_READABLE)."""

    def __init__(self, reason: str):
        super().__init__()
        self.reason = reason

    @property
    def s3(self):
        raise PermissionError(self.reason)


async def object_store(secrets: PassSecrets, section: dict | None,
                       defaults: storage.S3Settings) -> storage.ObjectStore:
    """A store for an S3 section of a spec (`{endpoint, region, credentials}`: a FineTuneJob's
    spec.output, an AdapterDeployment's spec.storage); what it leaves out comes from the operator's
    defaults. Secret values stay in memory and are never logged."""
    section = section or {}
    access, secret = defaults.access_key, defaults.secret_key
    credentials = section.get("credentials")
    if credentials:
        try:
            document = await secrets.get(credentials["secretName"])
        except kube.ApiError as exc:
            if exc.status != 403:
                raise
            return RefusedStore(f'the operator may not read Secret "{credentials["secretName"]}" in namespace '
                                f"{secrets.namespace}")
        data = (document or {}).get("data") or {}
        access, secret = (base64.b64decode(data[key]).decode() if key in data else None
                          for key in (credentials.get("accessKeyIdKey", "AWS_ACCESS_KEY_ID"),
                                      credentials.get("secretAccessKeyKey", "AWS_SECRET_ACCESS_KEY")))
    location = storage_location.resolve(
        section, fallback=storage_location.StorageLocation(endpoint=defaults.endpoint, region=defaults.region))
    return shared_store(storage.S3Settings(endpoint=location.endpoint, region=location.region,
                                           access_key=access, secret_key=secret))


# One store (one S3 client, its connection pool) per endpoint, region and credentials, reused by every
# pass: building a client per pass cost ~20 ms of CPU and a new connection each time. Rotated credentials
# are a new key; the least recently used of more than MAX_STORES is dropped.
MAX_STORES = 256
_STORES: OrderedDict[storage.S3Settings, storage.ObjectStore] = OrderedDict()


def shared_store(settings: storage.S3Settings) -> storage.ObjectStore:
    store = _STORES.get(settings)
    if store is None:
        store = _STORES[settings] = storage.ObjectStore(settings)
        while len(_STORES) > MAX_STORES:
            _STORES.popitem(last=False)
    else:
        _STORES.move_to_end(settings)
    return store

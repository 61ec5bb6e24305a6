"""Object-storage access for a resource, with the credentials its spec names (one Secret, read by key)."""

from __future__ import annotations

from kubetune.clients import kube, storage


async def object_store(client: kube.KubeClient, namespace: str, section: dict | None,
                       defaults: storage.S3Settings) -> storage.ObjectStore:
    """A store for an S3 section of a spec (`{endpoint, region, credentials}`: a FineTuneJob's
    spec.output, an AdapterDeployment's spec.storage); what it leaves out comes from the operator's
    defaults. Secret values stay in memory and are never logged."""
    section = section or {}
    access, secret = defaults.access_key, defaults.secret_key
    credentials = section.get("credentials")
    if credentials:
        access, secret = await client.secret_values(
            namespace, credentials["secretName"], credentials.get("accessKeyIdKey", "AWS_ACCESS_KEY_ID"),
            credentials.get("secretAccessKeyKey", "AWS_SECRET_ACCESS_KEY"))
    return storage.ObjectStore(storage.S3Settings(
        endpoint=section.get("endpoint") or defaults.endpoint, region=section.get("region") or defaults.region,
        access_key=access, secret_key=secret))

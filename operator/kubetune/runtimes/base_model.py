"""The base model's access for an engine container (pure): `spec.baseModel` credentials and s3 access as
the environment the engine's loaders read, values from Secrets only through secretKeyRef.
Which loader reads which variable, checked against vLLM v0.11.0: docs/serving-runtimes.md."""

from __future__ import annotations

from kubetune.api import storage_location

HF_TOKEN = "HF_TOKEN"  # huggingface_hub's token variable (gated or private hf:// repositories)
# vLLM's docs (models/extensions/runai_model_streamer.md) for an S3-compatible store: path-style
# addressing and no EC2 metadata lookups; the streamer's C++ client also reads its own endpoint variable.
S3_COMPATIBLE_ENV = (("RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING", "0"), ("AWS_EC2_METADATA_DISABLED", "true"))
STREAMER_ENDPOINT = "RUNAI_STREAMER_S3_ENDPOINT"


def secret_ref(name: str, secret: str, key: str) -> dict:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def base_model_env(base: dict, storage: storage_location.StorageLocation = storage_location.AWS) -> list[dict]:
    """The engine container's variables for `base` (a defaulted spec.baseModel); none when it needs none.
    An s3:// base's endpoint and region: `base.s3`'s, else the operator's `storage` setting."""
    env = []
    if base.get("credentials"):
        env.append(secret_ref(HF_TOKEN, base["credentials"]["secretName"], base["credentials"]["tokenKey"]))
    if not base["uri"].startswith("s3://"):
        return env
    s3 = base.get("s3") or {}
    credentials = s3.get("credentials")
    if credentials:
        env += [secret_ref("AWS_ACCESS_KEY_ID", credentials["secretName"], credentials["accessKeyIdKey"]),
                secret_ref("AWS_SECRET_ACCESS_KEY", credentials["secretName"], credentials["secretAccessKeyKey"])]
    location = storage_location.resolve(s3, fallback=storage)
    env += storage_location.location_env(location)  # AWS_ENDPOINT_URL, AWS_REGION and AWS_DEFAULT_REGION
    if location.endpoint:
        env += [{"name": STREAMER_ENDPOINT, "value": location.endpoint},
                *({"name": name, "value": value} for name, value in S3_COMPATIBLE_ENV)]
    return env

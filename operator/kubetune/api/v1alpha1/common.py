"""Schema pieces both kinds of kubetune.io/v1alpha1 share: the base model, storage credentials and
conditions."""

from __future__ import annotations

from ..k8s_values import CONFIG_KEY_PATTERN, DNS1123_SUBDOMAIN_PATTERN
from ..schema import array, boolean, integer, obj, rule, string
from ..storage_location import ENDPOINT_PATTERN

# S3 bucket names: 3-63 lower-case letters, digits, dots and hyphens, starting and ending alphanumeric.
S3_BUCKET = r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]"
# An object (a file): s3://BUCKET/KEY with a key, or file:///PATH (absolute).
STORAGE_URI = rf"^(s3://{S3_BUCKET}/.+|file:///.+)$"
# A prefix (a directory): the bucket alone is one too.
STORAGE_PREFIX = rf"^(s3://{S3_BUCKET}(/.*)?|file:///.+)$"


def secret_name() -> dict:
    """Secrets are named by DNS-1123 subdomains (dots allowed), like most objects."""
    return string("Name of the Secret.", pattern=DNS1123_SUBDOMAIN_PATTERN, max_length=253)


def secret_key(description: str, default: str) -> dict:
    """A key of a Secret's data: the API server's config-key rule (letters, digits, '-', '_', '.')."""
    return string(description, default=default, pattern=CONFIG_KEY_PATTERN, max_length=253)


def s3_credentials(what: str) -> dict:
    return obj(
        f"Credentials for {what}, read from a Secret in the job's namespace through secretKeyRef "
        "(never copied into ConfigMaps, arguments or logs).",
        {
            "secretName": secret_name(),
            "accessKeyIdKey": secret_key("Key of the access key id in the Secret.", "AWS_ACCESS_KEY_ID"),
            "secretAccessKeyKey": secret_key("Key of the secret access key in the Secret.", "AWS_SECRET_ACCESS_KEY"),
        },
        required=["secretName"],
    )


def s3_endpoint() -> dict:
    return string(
        "Endpoint URL of an S3-compatible store (MinIO, SeaweedFS, Ceph). Empty: the operator's storage "
        "setting (the chart's storage.endpoint), else AWS S3.",
        pattern=ENDPOINT_PATTERN,
    )


def s3_region() -> dict:
    return string("Region of the bucket. Empty: the operator's storage setting (the chart's storage.region), "
                  "else the S3 client's own default.", max_length=64)



def base_model(description: str) -> dict:
    """A FineTuneJob's and an AdapterDeployment's `spec.baseModel`: one definition, so that the one can
    be copied to the other (the access fields are what the trainer and the engine container read)."""
    return obj(
        description,
        {
            "uri": string(
                "Where the weights come from: hf://ORG/NAME (a Hugging Face repository, or a mirror), "
                "s3://BUCKET/PREFIX or file:///PATH (a directory in the image or a mounted volume).",
                pattern=rf"^(hf://.+|s3://{S3_BUCKET}(/.*)?|file:///.+)$",
                max_length=1024,
            ),
            "revision": string(
                "Revision to pin (commit, tag or branch) of an hf:// model, so a rerun uses the same weights.",
                default="main",
                max_length=255,
            ),
            "trustRemoteCode": boolean(
                "Allow custom modelling code shipped with the model. Off by default: it is code execution.",
                default=False,
            ),
            "credentials": obj(
                "Token for a private or gated Hugging Face repository (HF_TOKEN), read from a Secret through "
                "secretKeyRef.",
                {
                    "secretName": secret_name(),
                    "tokenKey": secret_key("Key of the token in the Secret.", "token"),
                },
                required=["secretName"],
            ),
            "s3": obj(
                "Access to the model when uri is s3://.",
                {
                    "endpoint": s3_endpoint(),
                    "region": string("Region of the bucket (unset: a FineTuneJob uses its output's region, "
                                     "then the operator's storage setting; an engine the operator's "
                                     "setting, else its SDK's default).", max_length=64),
                    "credentials": s3_credentials("the model bucket"),
                },
            ),
        },
        required=["uri"],
        rules=[
            rule(
                "!has(self.s3) || self.uri.startsWith('s3://')",
                "baseModel.s3 applies only when baseModel.uri is s3://",
                field_path=".s3",
            ),
        ],
    )

CONDITION = obj(
    "A metav1.Condition.",
    {
        "type": string("Condition type.", max_length=316),
        "status": string("True, False or Unknown.", enum=["True", "False", "Unknown"]),
        "observedGeneration": integer("The .metadata.generation this condition was set against.", minimum=0),
        "lastTransitionTime": string("When the status last changed.", fmt="date-time"),
        "reason": string("CamelCase reason.", max_length=1024),
        "message": string("Human-readable detail.", max_length=32_768),
    },
    required=["type", "status", "lastTransitionTime", "reason", "message"],
)


def conditions() -> dict:
    schema = array("Conditions (metav1.Condition).", CONDITION, list_type="map")
    schema["x-kubernetes-list-map-keys"] = ["type"]
    return schema


LAST_UPDATE_TIME = string(
    "When the operator last wrote this status. Fields that change on every poll (a FineTuneJob's progress, "
    "an AdapterDeployment's open drift window and running canary analysis counts) are written at most every "
    "--status-min-interval seconds; every other change is written at once.", fmt="date-time")


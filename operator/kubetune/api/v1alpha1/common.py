"""Schema pieces both kinds of kubetune.io/v1alpha1 share: storage credentials and conditions."""

from __future__ import annotations

from ..schema import DNS_LABEL_PATTERN, array, integer, obj, string

STORAGE_URI = r"^(s3|file)://.+"


def s3_credentials(what: str) -> dict:
    return obj(
        f"Credentials for {what}, read from a Secret in the job's namespace through secretKeyRef "
        "(never copied into ConfigMaps, arguments or logs).",
        {
            "secretName": string("Name of the Secret holding the keys.", pattern=DNS_LABEL_PATTERN, max_length=253),
            "accessKeyIdKey": string("Key of the access key id in the Secret.", default="AWS_ACCESS_KEY_ID"),
            "secretAccessKeyKey": string(
                "Key of the secret access key in the Secret.", default="AWS_SECRET_ACCESS_KEY"
            ),
        },
        required=["secretName"],
    )


def s3_endpoint() -> dict:
    return string(
        "Endpoint URL of an S3-compatible store (MinIO, SeaweedFS, Ceph). Empty means AWS S3.",
        pattern=r"^https?://.+",
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


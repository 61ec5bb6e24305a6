"""Schema pieces both kinds of kubetune.io/v1alpha1 share: the base model, storage credentials and
conditions."""

from __future__ import annotations

from ..schema import DNS_LABEL_PATTERN, array, boolean, integer, obj, rule, string
from ..storage_location import ENDPOINT_PATTERN

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
                pattern=r"^(hf|s3|file)://.+",
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
                    "secretName": string("Name of the Secret.", pattern=DNS_LABEL_PATTERN, max_length=253),
                    "tokenKey": string("Key of the token in the Secret.", default="token"),
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


"""Where object storage is (endpoint, region) for each process that reaches it, by one precedence rule:
the spec's own section > the operator's setting > the SDK's default (AWS S3). Pure; the rule, the
variables each process reads and why: docs/operations.md "Object storage"."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

# The variables of every container that reaches storage. boto3 (botocore >= 1.31, the `endpoint_url`
# config variable) and the AWS C++ SDK of vLLM's Run:ai streamer read AWS_ENDPOINT_URL; botocore reads
# the region only from AWS_DEFAULT_REGION, the C++ SDK only from AWS_REGION: both are set.
ENV_ENDPOINT = "AWS_ENDPOINT_URL"
ENV_REGION = "AWS_REGION"
ENV_DEFAULT_REGION = "AWS_DEFAULT_REGION"
# The operator's own setting (the chart's storage.endpoint); its region is AWS_REGION.
ENV_OPERATOR_ENDPOINT = "KUBETUNE_S3_ENDPOINT"
ENDPOINT_PATTERN = r"^https?://.+"  # the CRDs' pattern for spec endpoints (api.v1alpha1.common.s3_endpoint)


@dataclass(frozen=True)
class StorageLocation:
    """An S3 endpoint URL and region; None: not set here (the next rule decides)."""

    endpoint: str | None = None
    region: str | None = None


AWS = StorageLocation()  # the SDK's own choice: AWS S3, its region from the SDK's configuration chain


def resolve(*sections: Mapping | None, fallback: StorageLocation = AWS) -> StorageLocation:
    """The location for the spec `sections` (the most specific first, each a dict that may hold
    `endpoint` and `region`: e.g. spec.baseModel.s3, then spec.output), else `fallback` (the operator's
    setting, or in a pod what the operator resolved into its environment). Endpoint and region are
    resolved each on its own: a spec naming only a region keeps the operator's endpoint."""
    present = [section for section in sections if section]
    endpoint = next((section["endpoint"] for section in present if section.get("endpoint")), fallback.endpoint)
    region = next((section["region"] for section in present if section.get("region")), fallback.region)
    return StorageLocation(endpoint=endpoint or None, region=region or None)


def location_env(location: StorageLocation) -> list[dict]:
    """The container variables (Kubernetes EnvVar objects) that carry `location`; none for the SDK default."""
    env = []
    if location.endpoint:
        env.append({"name": ENV_ENDPOINT, "value": location.endpoint})
    if location.region:
        env += [{"name": ENV_REGION, "value": location.region}, {"name": ENV_DEFAULT_REGION, "value": location.region}]
    return env


def from_environment(environ: Mapping[str, str]) -> StorageLocation:
    """What `location_env` put into a container's environment (a region from either variable)."""
    return StorageLocation(endpoint=environ.get(ENV_ENDPOINT) or None,
                           region=environ.get(ENV_REGION) or environ.get(ENV_DEFAULT_REGION) or None)


def operator_setting(environ: Mapping[str, str]) -> StorageLocation:
    """The operator's default from its environment (the chart sets KUBETUNE_S3_ENDPOINT and AWS_REGION);
    the standard variables count too, so an operator run outside the cluster behaves as boto3 would."""
    standard = from_environment(environ)
    return StorageLocation(endpoint=environ.get(ENV_OPERATOR_ENDPOINT) or standard.endpoint,
                           region=standard.region)


def operator_location(endpoint: str | None, region: str | None) -> StorageLocation:
    """The operator's setting from its flags (`--storage-endpoint`, `--storage-region`), checked as the
    CRDs check a spec's: ValueError naming the flag."""
    if endpoint and not re.match(ENDPOINT_PATTERN, endpoint):
        raise ValueError(f"--storage-endpoint {endpoint!r}: an http:// or https:// URL (empty: AWS S3)")
    return StorageLocation(endpoint=endpoint or None, region=region or None)

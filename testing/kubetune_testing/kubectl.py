"""The API server's admission of kubetune objects: the CRD's schema with its defaults, then its CEL
rules (exactly what `kubectl apply` of a bad spec gets from a cluster)."""

from __future__ import annotations

from kubetune.api import validation
from kubetune.api.object_rules import decoded
from kubetune.api.schema import apply_defaults


def admission(kind: str, document: dict) -> tuple[list[str], dict]:
    """What the API server refuses (request size and JSON values, structural schema with strict fields;
    then ObjectMeta, list-type uniqueness and CEL on the defaulted object), and the object as it stores it
    (with the schema's defaults). Mirrors apiextensions-apiserver's customresource strategy Validate."""
    errors = validation.structural_errors(kind, document)
    if errors:
        return [f"{e.path}: {e.message}" for e in errors], document
    defaulted = apply_defaults(validation.root_schema(kind), decoded(document))
    errors = validation.object_errors(kind, defaulted) + validation.cel_errors(kind, defaulted)
    return [f"{e.path}: {e.message}" for e in errors], defaulted

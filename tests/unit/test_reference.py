"""docs/reference.md is generated from the API definition (kept current by test_crds's generated-files check)
and documents every field and rule of every kind."""

from __future__ import annotations

from kubetune.api import v1alpha1 as api
from kubetune.api.reference import reference_markdown
from kubetune.api.schema import iter_fields


def test_every_field_and_rule_is_documented():
    page = reference_markdown()
    for kind, info in api.KINDS.items():
        assert f"## {kind}" in page
        for section in ("spec", "status"):
            for path, _ in iter_fields(info[section]):
                if path:
                    assert f"`{section}.{path}`" in page, f"{kind} {section}.{path} is missing"
            for _, schema in iter_fields(info["spec"]):
                for rule in schema.get("x-kubernetes-validations") or []:
                    assert rule["message"].replace("|", "\\|") in page


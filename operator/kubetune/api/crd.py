"""CustomResourceDefinitions generated from the API schemas in `v1alpha1`."""

from __future__ import annotations

from . import v1alpha1 as api
from .schema import obj, rule, string

# The PyTorchJob, its pods ("<job>-worker-<n>") and headless services are named after the
# FineTuneJob, and Service names must be DNS-1035 labels of at most 63 characters.
MAX_JOB_NAME = 45
NAME_RULES = {
    "FineTuneJob": [
        rule(
            f"!has(self.metadata) || !has(self.metadata.name) || (self.metadata.name.size() <= {MAX_JOB_NAME}"
            " && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$'))",
            f"metadata.name must be a DNS-1035 label of at most {MAX_JOB_NAME} characters (lower case, starting "
            "with a letter): the training pods and services are named after it",
            field_path=".metadata.name",
            reason="FieldValueInvalid",
        ),
        # Stage jobs are named <job>-baseline and <job>-rank-sweep: a FineTuneJob with such a name
        # would own a training PyTorchJob (and ConfigMap) of the same name as another job's stage.
        rule(
            "!has(self.metadata) || !has(self.metadata.name) || (!self.metadata.name.endsWith('-baseline')"
            " && !self.metadata.name.endsWith('-rank-sweep'))",
            "metadata.name must not end in -baseline or -rank-sweep: those are the names of another FineTuneJob's "
            "baseline and rank-sweep jobs",
            field_path=".metadata.name",
            reason="FieldValueInvalid",
        ),
    ],
    # The serving Service is named after the AdapterDeployment (DNS-1035 label) and the name is the
    # value of every child's kubetune.io/adapterdeployment label (at most 63 characters).
    "AdapterDeployment": [
        rule(
            "!has(self.metadata) || !has(self.metadata.name) || (self.metadata.name.size() <= 63"
            " && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$'))",
            "metadata.name must be a DNS-1035 label of at most 63 characters (lower case, starting with a "
            "letter): the serving Service is named after it",
            field_path=".metadata.name",
            reason="FieldValueInvalid",
        ),
    ],
}


def _top_level_schema(kind: str, spec: dict, status: dict, description: str) -> dict:
    return obj(
        description,
        {
            "apiVersion": string("APIVersion of this object (kubetune.io/v1alpha1)."),
            "kind": string(f"Kind of this object ({kind})."),
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        required=["spec"],
        rules=NAME_RULES.get(kind, ()),
    )


def custom_resource_definition(kind: str) -> dict:
    info = api.KINDS[kind]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{info['plural']}.{api.GROUP}",
            "labels": {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/part-of": "kubetune"},
        },
        "spec": {
            "group": api.GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": info["plural"],
                "singular": info["singular"],
                "shortNames": list(info["shortNames"]),
                "categories": [api.CATEGORY],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": list(info["printerColumns"]),
                    "schema": {
                        "openAPIV3Schema": _top_level_schema(
                            kind, info["spec"], info["status"], info["description"]
                        )
                    },
                }
            ],
        },
    }


def all_crds() -> dict[str, dict]:
    """File name -> CRD document, for every kind of the API."""
    return {
        f"{api.GROUP}_{info['plural']}.yaml": custom_resource_definition(kind) for kind, info in api.KINDS.items()
    }


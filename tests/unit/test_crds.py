"""The generated CRDs: shape, documentation, and that the committed files are current."""

from __future__ import annotations

import kubernetes_validate
import yaml

from kubetune.api import crd
from kubetune.api.schema import iter_fields
from kubetune_operator.cli import generated_files
from tests.conftest import REPO_ROOT


def test_committed_generated_files_match_the_api_definition():
    stale = [path for path, content in generated_files().items()
             if not (REPO_ROOT / path).exists() or (REPO_ROOT / path).read_text() != content]
    assert stale == [], "run `kubetune generate`"


def test_crds_are_valid_apiextensions_objects():
    for document in crd.all_crds().values():
        kubernetes_validate.validate(document, "1.34", strict=True)


def test_finetunejob_crd_names_columns_and_status():
    document = crd.custom_resource_definition("FineTuneJob")
    names = document["spec"]["names"]
    assert names["shortNames"] == ["ftj"] and names["categories"] == ["kubetune"]
    version = document["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Phase", "Base Model", "Method", "Queue", "Baseline", "Sweep", "Rank", "Progress", "Eval Loss",
                       "Reason", "Adapter", "Age"]
    adep = crd.custom_resource_definition("AdapterDeployment")["spec"]["names"]
    assert adep["shortNames"] == ["adep"] and adep["categories"] == ["kubetune"]


def test_every_field_is_documented():
    for kind in ("FineTuneJob", "AdapterDeployment"):
        schema = crd.custom_resource_definition(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        undocumented = [path for path, node in iter_fields(schema)
                        if path and path != "metadata" and not node.get("description")]
        assert undocumented == [], (kind, undocumented)


def test_yaml_round_trip_is_stable():
    for path, content in generated_files().items():
        if not path.endswith(".yaml"):
            continue  # docs/reference.md
        assert yaml.safe_load(content)["kind"] == "CustomResourceDefinition", path

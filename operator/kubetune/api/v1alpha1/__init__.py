"""The kubetune.io/v1alpha1 API group-version: its identity and its kinds, defined once.

`crds/`, the chart's CRDs, defaulting, validation, the CEL rule tests and the field reference are
generated from these schemas: edit them, then run `kubetune generate` (CI fails on a difference).
"""

from __future__ import annotations

from .adapterdeployment import (
    ADAPTERDEPLOYMENT_PRINTER_COLUMNS,
    ADAPTERDEPLOYMENT_SPEC,
    ADAPTERDEPLOYMENT_STATUS,
)
from .finetunejob import FINETUNEJOB_SPEC
from .finetunejob_status import FINETUNEJOB_PRINTER_COLUMNS, FINETUNEJOB_STATUS

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "kubetune"

KINDS = {
    "FineTuneJob": {
        "plural": "finetunejobs",
        "singular": "finetunejob",
        "shortNames": ["ftj"],
        "spec": FINETUNEJOB_SPEC,
        "status": FINETUNEJOB_STATUS,
        "printerColumns": FINETUNEJOB_PRINTER_COLUMNS,
        "description": "Fine-tune a base model with LoRA, QLoRA, full or freeze-thaw training and publish "
                       "a checksummed adapter to S3.",
    },
    "AdapterDeployment": {
        "plural": "adapterdeployments",
        "singular": "adapterdeployment",
        "shortNames": ["adep"],
        "spec": ADAPTERDEPLOYMENT_SPEC,
        "status": ADAPTERDEPLOYMENT_STATUS,
        "printerColumns": ADAPTERDEPLOYMENT_PRINTER_COLUMNS,
        "description": "Serve versioned LoRA adapters on a base model, rolled out by canary with "
                       "automatic rollback.",
    },
}

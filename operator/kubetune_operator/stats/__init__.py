"""Drift statistics (pure: numpy, no I/O): sampled records -> observations, a reference from the
adapter's drift profile, calibrated thresholds, and a window's verdict. The method is in docs/drift.md.

The operator's drift loop (`reconcile.driftloop`) only sees the verdicts `analyse` returns.
"""

from kubetune_operator.stats.calibration import CALIBRATION_API, DIAGNOSTICS, Thresholds, calibrate
from kubetune_operator.stats.records import Observation, example_input, observations
from kubetune_operator.stats.reference import (
    CAUSAL_LM,
    CLASSIFICATION,
    MAX_EMBEDDINGS,
    REFERENCE_API,
    WORD,
    build_reference,
    oov_rate,
    words,
)
from kubetune_operator.stats.windows import analyse

__all__ = [
    "CALIBRATION_API", "CAUSAL_LM", "CLASSIFICATION", "DIAGNOSTICS", "MAX_EMBEDDINGS", "REFERENCE_API", "WORD",
    "Observation", "Thresholds", "analyse", "build_reference", "calibrate", "example_input", "observations",
    "oov_rate", "words",
]

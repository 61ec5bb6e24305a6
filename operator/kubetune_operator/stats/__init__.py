"""Drift statistics (pure: numpy, no I/O): sampled records -> observations, a reference from the
adapter's drift profile, calibrated thresholds, and a window's verdict. The method is in docs/drift.md.

The operator's drift loop (`reconcile.driftloop`) only sees the verdicts `analyse` returns.
"""

import importlib

# Loaded on first use (PEP 562): numpy costs the operator ~20 MiB of memory, needed only once an adapter's
# drift is analysed.
_HOMES = {
    "calibration": ("CALIBRATION_API", "DIAGNOSTICS", "Thresholds", "calibrate"),
    "records": ("Observation", "example_input", "observations"),
    "reference": ("CAUSAL_LM", "CLASSIFICATION", "MAX_EMBEDDINGS", "REFERENCE_API", "WORD", "build_reference",
                  "oov_rate", "words"),
    "windows": ("analyse",),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value


__all__ = [
    "CALIBRATION_API", "CAUSAL_LM", "CLASSIFICATION", "DIAGNOSTICS", "MAX_EMBEDDINGS", "REFERENCE_API", "WORD",
    "Observation", "Thresholds", "analyse", "build_reference", "calibrate", "example_input", "observations",
    "oov_rate", "words",
]

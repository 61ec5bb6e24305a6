"""Training progress: what the trainer writes to `progress.json` and what reaches `status.progress`.

The trainer rewrites `<job prefix>/progress.json` at most every few seconds (and at every evaluation
and at the end); the operator and `kubetune local` read it and copy the known fields into
`FineTuneJob.status.progress`. Going through storage, not the Kubernetes API, keeps training pods
free of API credentials: they only need the bucket they already write to.
"""

from __future__ import annotations

import math

PROGRESS_API = "kubetune.io/progress/v1"
WRITE_INTERVAL_SECONDS = 4.0  # trainer side; the operator polls running jobs as often, so status lags < 10 s

# progress.json key -> (status.progress key, type)
_FIELDS = {
    "stage": ("stage", str),
    "step": ("step", int),
    "totalSteps": ("totalSteps", int),
    "epoch": ("epoch", float),
    "trainLoss": ("trainLoss", float),
    "evalLoss": ("evalLoss", float),
    "tokensPerSecond": ("tokensPerSecond", float),
    "etaSeconds": ("etaSeconds", int),
    "updateTime": ("updateTime", str),
}


def to_status(document: object) -> dict:
    """The status.progress fields of a progress.json document; anything malformed is dropped."""
    if not isinstance(document, dict) or document.get("api") != PROGRESS_API:
        return {}
    out: dict = {}
    for key, (target, kind) in _FIELDS.items():
        value = document.get(key)
        if kind is str and isinstance(value, str):
            out[target] = value[:256]
        elif kind in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value) or (kind is int and value < 0):
                continue
            out[target] = int(value) if kind is int else float(value)
    metrics = document.get("evalMetrics")
    if isinstance(metrics, dict):
        for name in ("accuracy", "macro_f1", "perplexity"):
            value = metrics.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out[name.replace("macro_f1", "macroF1")] = float(value)
    if out.get("totalSteps") and "step" in out:
        out["percent"] = max(0, min(100, int(100 * out["step"] / out["totalSteps"])))
    return out

"""A window's verdict: the triggers and diagnostics of docs/drift.md against a calibration (pure)."""

from __future__ import annotations

import math

import numpy as np

from kubetune_operator.stats.calibration import Thresholds, window_limits
from kubetune_operator.stats.kernels import cosine_distance, rbf, squared_distances
from kubetune_operator.stats.records import Observation
from kubetune_operator.stats.reference import oov_rate, words


def analyse(reference: dict, calibration: dict, window: list[Observation],
            window_embeddings: list[list[float]] | None, thresholds: Thresholds) -> dict:
    """Judge one window of observations (and, optionally, its inputs' embeddings, aligned with `window`).

    Result (JSON-serialisable):
    `{"requests", "windowSize", "kind", "triggers": {"confidence", "entropy"}, "diagnostics": {"inputLength",
    "oov", "embedding"}, "drifted", "summary"}`; every test has "fired"; a diagnostic the reference cannot
    compute (no holdout texts or embeddings, or no window embeddings) is absent. `drifted`: any trigger
    fired, or a diagnostic listed in `thresholds.trigger_on_diagnostics`.
    """
    m = len(window)
    result: dict = {"requests": m, "windowSize": calibration["windowSize"], "kind": reference["kind"],
                    "triggers": {}, "diagnostics": {}, "drifted": False, "summary": ""}
    if m == 0:
        result["summary"] = "no scored requests in the window"
        return result
    limits = window_limits(calibration, thresholds, m)
    null = calibration["null"]
    triggers, diagnostics = result["triggers"], result["diagnostics"]

    confidence = np.asarray([o.confidence for o in window], dtype=float)
    value = float(confidence.mean())
    triggers["confidence"] = {"value": value, "reference": null["confidence"]["mean"],
                              "threshold": limits["confidence"], "sigmas": thresholds.sigmas,
                              "fired": bool(value < limits["confidence"])}

    two_sample = reference["twoSample"]
    if two_sample["of"] == "entropy":
        tested = np.asarray([o.entropy for o in window if o.entropy is not None], dtype=float)
    else:
        tested = confidence
    statistic = _ks(np.asarray(two_sample["values"]), tested, two_sample["direction"]) if len(tested) else None
    triggers["entropy"] = {
        "of": two_sample["of"], "test": "ks", "direction": two_sample["direction"], "statistic": statistic,
        "threshold": limits["twoSample"], "pValue": thresholds.p_value,
        "mean": float(tested.mean()) if len(tested) else None,
        "referenceMean": float(np.mean(two_sample["values"])),
        "fired": bool(statistic is not None and statistic > limits["twoSample"]),
    }

    if "inputLength" in null:
        texts = [o.text for o in window]
        lengths = np.asarray([len(words(t)) for t in texts], dtype=float)
        mean, sigma = float(lengths.mean()), limits["inputLengthSigma"]
        reference_mean = null["inputLength"]["mean"]
        z = (mean - reference_mean) / sigma if sigma > 0 else (0.0 if mean == reference_mean else math.inf)
        diagnostics["inputLength"] = {"value": mean, "reference": reference_mean, "z": z,
                                      "threshold": limits["inputLength"], "fired": bool(abs(z) > limits["inputLength"])}
        vocabulary = frozenset(reference["vocabulary"])
        rate = float(np.mean([oov_rate(t, vocabulary) for t in texts]))
        diagnostics["oov"] = {"value": rate, "reference": null["oov"]["mean"], "threshold": limits["oov"],
                              "fired": bool(rate > limits["oov"])}

    embeddings = reference.get("embeddings")
    if embeddings and "embedding" in null and window_embeddings:
        if len(window_embeddings) != m:
            raise ValueError(f"{len(window_embeddings)} window embeddings for {m} observations")
        diagnostics["embedding"] = _embedding_tests(embeddings, np.asarray(window_embeddings, dtype=float),
                                                    limits)

    fired_triggers = [name for name, test in triggers.items() if test["fired"]]
    fired_diagnostics = [name for name, test in diagnostics.items() if test["fired"]]
    result["drifted"] = bool(fired_triggers) or any(d in thresholds.trigger_on_diagnostics for d in fired_diagnostics)
    result["summary"] = _summary(triggers, fired_diagnostics, thresholds)
    return result


def _ks(reference: np.ndarray, window: np.ndarray, direction: str) -> float:
    """One-sided two-sample KS: max over x of F_reference(x) - F_window(x) ("greater": the window lies to
    the right), or the reverse ("less"); 0 when the window is nowhere on that side."""
    reference, window = np.sort(reference), np.sort(window)
    points = np.concatenate([reference, window])
    reference_cdf = np.searchsorted(reference, points, side="right") / len(reference)
    window_cdf = np.searchsorted(window, points, side="right") / len(window)
    gap = reference_cdf - window_cdf if direction == "greater" else window_cdf - reference_cdf
    return float(max(gap.max(), 0.0))


def _embedding_tests(embeddings: dict, window: np.ndarray, limits: dict) -> dict:
    vectors = np.asarray(embeddings["vectors"])
    if window.ndim != 2 or window.shape[1] != vectors.shape[1]:
        raise ValueError(f"window embeddings of dimension {window.shape[-1]}, the reference's are "
                         f"{vectors.shape[1]}")
    m = window.shape[0]
    bandwidth = embeddings["bandwidth"]
    centroid = cosine_distance(window.mean(axis=0), np.asarray(embeddings["centroid"]))
    within = rbf(squared_distances(window, window), bandwidth)
    ww = (within.sum() - np.trace(within)) / (m * (m - 1)) if m > 1 else float(np.trace(within))
    wh = rbf(squared_distances(window, vectors), bandwidth).mean()
    mmd = float(ww + embeddings["holdoutKernelMean"] - 2.0 * wh)
    fired = {"centroid": bool(centroid > limits["centroidCosine"]), "mmd": bool(mmd > limits["mmd"])}
    return {"centroidCosine": float(centroid), "centroidThreshold": limits["centroidCosine"], "mmd": mmd,
            "mmdThreshold": limits["mmd"], "bandwidth": bandwidth,
            "firedTests": sorted(k for k, v in fired.items() if v), "fired": any(fired.values())}


def _summary(triggers: dict, fired_diagnostics: list[str], thresholds: Thresholds) -> str:
    """One line for an Event: each trigger with its threshold, then the diagnostics that fired."""
    confidence, entropy = triggers["confidence"], triggers["entropy"]
    sign = "<" if confidence["fired"] else ">="
    parts = [f"confidence {confidence['value']:.2f} {sign} {confidence['threshold']:.2f} ({thresholds.sigmas:g}σ)"]  # noqa: RUF001
    label = "entropy KS" if entropy["of"] == "entropy" else "token-probability KS"
    if entropy["statistic"] is None:
        parts.append(f"{label} n/a")
    else:
        sign = ">" if entropy["fired"] else "<="
        parts.append(f"{label} {entropy['statistic']:.2f} {sign} {entropy['threshold']:.2f} "
                     f"(p {thresholds.p_value:g})")
    fired = [name for name in ("confidence", "entropy") if triggers[name]["fired"]]
    head = "drift: " if fired else "no trigger: "
    marked = [d + (" (trigger)" if d in thresholds.trigger_on_diagnostics else "") for d in fired_diagnostics]
    tail = f"diagnostics: {', '.join(marked)}" if marked else "no diagnostics"
    return head + "; ".join(parts) + "; " + tail

"""Thresholds and their calibration: bootstrapped null distributions per window size (pure).

Every threshold comes from the adapter's own holdout and the window size; docs/drift.md explains why
both the window and the reference are resampled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kubetune_operator.stats.kernels import cosine_distance, rbf, squared_distances

DIAGNOSTICS = ("inputLength", "oov", "embedding")
CALIBRATION_API = "kubetune.io/drift-calibration/v1"


@dataclass(frozen=True)
class Thresholds:
    """spec.adapters[].drift.thresholds (defaults as in the CRD)."""

    sigmas: float = 3.0  # mean-based tests fire beyond mean +- sigmas x sigma of the bootstrapped differences
    p_value: float = 0.01  # two-sample tests fire above the (1 - p) quantile of bootstrapped null statistics
    bootstraps: int = 500
    trigger_on_diagnostics: tuple[str, ...] = ()  # subset of DIAGNOSTICS that also trigger

    def __post_init__(self):
        unknown = set(self.trigger_on_diagnostics) - set(DIAGNOSTICS)
        if unknown:
            raise ValueError(f"trigger_on_diagnostics: unknown {sorted(unknown)} (known: {', '.join(DIAGNOSTICS)})")
        if self.sigmas <= 0 or not 0 < self.p_value < 1 or self.bootstraps < 10:
            raise ValueError("thresholds need sigmas > 0, 0 < p_value < 1 and bootstraps >= 10")

    @classmethod
    def from_spec(cls, spec: dict | None) -> Thresholds:
        """From the spec's camelCase object (absent fields: the defaults)."""
        spec = spec or {}
        return cls(sigmas=float(spec.get("sigmas", cls.sigmas)), p_value=float(spec.get("pValue", cls.p_value)),
                   bootstraps=int(spec.get("bootstraps", cls.bootstraps)),
                   trigger_on_diagnostics=tuple(spec.get("triggerOnDiagnostics") or ()))


def calibrate(reference: dict, window_size: int, thresholds: Thresholds, seed: int = 0) -> dict:
    """The tests' null distributions for windows of `window_size`, by bootstrapping (docs/drift.md).

    Depends on the reference, the window size, `thresholds.bootstraps` and the seed only: `analyse` applies
    `sigmas` and `p_value` to the stored null distributions (the `thresholds` here are those values at
    calibration time, for reading). JSON-serialisable; cache it per (adapter digest, window size).
    """
    if window_size < 2:
        raise ValueError("window_size must be at least 2")
    rng = np.random.default_rng(seed)
    boots, m = thresholds.bootstraps, window_size
    null: dict = {}

    confidence = np.asarray(reference["confidence"])
    window_counts, holdout_counts = _draws(rng, len(confidence), m, boots)
    null["confidence"] = _mean_null(confidence, window_counts, holdout_counts, m)
    two_sample = reference["twoSample"]
    tested = np.asarray(two_sample["values"])
    if len(tested) != len(confidence):
        window_counts, holdout_counts = _draws(rng, len(tested), m, boots)
    null["twoSample"] = {"ks": sorted(_ks_null(tested, window_counts, holdout_counts, two_sample["direction"]))}

    if reference.get("texts", 0) >= 2:
        lengths, rates = np.asarray(reference["inputLength"], dtype=float), np.asarray(reference["oov"])
        window_counts, holdout_counts = _draws(rng, len(lengths), m, boots)
        null["inputLength"] = _mean_null(lengths, window_counts, holdout_counts, m)
        null["oov"] = _mean_null(rates, window_counts, holdout_counts, m)

    embeddings = reference.get("embeddings")
    if embeddings:
        vectors = np.asarray(embeddings["vectors"])
        window_counts, holdout_counts = _draws(rng, len(vectors), m, boots)
        null["embedding"] = _embedding_null(vectors, embeddings["bandwidth"], window_counts, holdout_counts)

    calibration = {
        "apiVersion": CALIBRATION_API,
        "kind": reference["kind"],
        "windowSize": m,
        "holdoutSize": len(confidence),
        "texts": reference.get("texts", 0),
        "embeddings": len(embeddings["vectors"]) if embeddings else 0,
        "bootstraps": boots,
        "seed": seed,
        "null": null,
    }
    calibration["thresholds"] = window_limits(calibration, thresholds, m)
    return calibration


def _draws(rng: np.random.Generator, n: int, m: int, boots: int) -> tuple[np.ndarray, np.ndarray]:
    """Per bootstrap, how often each holdout example is drawn into a window of m and into a pseudo-holdout
    of n (both with replacement): two (boots, n) count matrices."""
    uniform = np.full(n, 1.0 / n)
    return rng.multinomial(m, uniform, size=boots).astype(float), rng.multinomial(n, uniform, size=boots).astype(float)


def _mean_null(values: np.ndarray, window_counts: np.ndarray, holdout_counts: np.ndarray, m: int) -> dict:
    differences = window_counts @ values / m - holdout_counts @ values / len(values)
    return {"mean": float(values.mean()), "sigma": float(differences.std(ddof=1)), "holdout": len(values)}


def _ks_null(values: np.ndarray, window_counts: np.ndarray, holdout_counts: np.ndarray, direction: str) -> list[float]:
    """One-sided KS statistics of bootstrapped (window, pseudo-holdout) pairs: both live on the holdout's
    values, so their ECDFs are cumulative counts over the sorted distinct values."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    last_of_tie = np.append(ordered[1:] != ordered[:-1], True)  # an ECDF counts every tie of a value
    window_cdf = np.cumsum(window_counts[:, order], axis=1)[:, last_of_tie] / window_counts[0].sum()
    holdout_cdf = np.cumsum(holdout_counts[:, order], axis=1)[:, last_of_tie] / holdout_counts[0].sum()
    gap = holdout_cdf - window_cdf if direction == "greater" else window_cdf - holdout_cdf
    return np.maximum(gap.max(axis=1), 0.0).tolist()


def _embedding_null(vectors: np.ndarray, bandwidth: float, window_counts: np.ndarray,
                    holdout_counts: np.ndarray) -> dict:
    kernel = rbf(squared_distances(vectors, vectors), bandwidth)
    m, n = window_counts[0].sum(), holdout_counts[0].sum()
    kw, kh = window_counts @ kernel, holdout_counts @ kernel
    diagonal = np.diag(kernel)  # 1 for an RBF kernel; kept general
    # kernel means over pairs of draws of *different* holdout examples (see docs/drift.md)
    same_w, same_h = (window_counts ** 2) @ diagonal, (holdout_counts ** 2) @ diagonal
    same_wh = (window_counts * holdout_counts) @ diagonal
    ww = ((kw * window_counts).sum(axis=1) - same_w) / np.maximum(m * m - (window_counts ** 2).sum(axis=1), 1)
    hh = ((kh * holdout_counts).sum(axis=1) - same_h) / np.maximum(n * n - (holdout_counts ** 2).sum(axis=1), 1)
    shared = (window_counts * holdout_counts).sum(axis=1)
    wh = ((kw * holdout_counts).sum(axis=1) - same_wh) / np.maximum(m * n - shared, 1)
    mmd = ww + hh - 2.0 * wh
    # The centroid's direction: the holdout's centroid is the population mean plus the holdout's sampling
    # error, so its squared norm is too large by tr(Σ)/n, and bootstrapped centroids scatter around it:
    # in the bootstrap world every centroid would look longer, hence closer in angle, than real ones.
    # The null's centroids are shifted to an estimate of the population mean with an unbiased squared
    # norm (|c|^2 - tr(Σ)/n), so windows and holdout stand at the same distance from the origin as in reality.
    center = vectors.mean(axis=0)
    spread = ((vectors - center) ** 2).sum() / max(len(vectors) - 1, 1) / len(vectors)
    norm = float(center @ center)
    population = center * math.sqrt(max(norm - spread, 0.0) / norm) if norm > 0 else center
    centroids_w = window_counts @ vectors / m - center + population
    centroids_h = holdout_counts @ vectors / n - center + population
    return {"centroidCosine": sorted(cosine_distance(centroids_w, centroids_h).tolist()),
            "mmd": sorted(mmd.tolist()), "holdout": int(n)}


def _quantile(ordered: list[float], p_value: float) -> float:
    return float(np.quantile(np.asarray(ordered), 1.0 - p_value, method="higher"))


def window_limits(calibration: dict, thresholds: Thresholds, m: int) -> dict:
    """Thresholds for a window of m from the null distributions (rescaled when m is not the calibrated
    size: sqrt(1/m + 1/n) for sigma and KS, (1/m + 1/n) for squared distances)."""
    null, calibrated = calibration["null"], calibration["windowSize"]

    def scale(n: int, power: float) -> float:
        return ((1 / m + 1 / n) / (1 / calibrated + 1 / n)) ** power if m != calibrated else 1.0

    confidence = null["confidence"]
    n = confidence["holdout"]
    limits = {
        "confidence": confidence["mean"] - thresholds.sigmas * confidence["sigma"] * scale(n, 0.5),
        "twoSample": _quantile(null["twoSample"]["ks"], thresholds.p_value) * scale(n, 0.5),
    }
    if "inputLength" in null:
        length, oov = null["inputLength"], null["oov"]
        limits["inputLength"] = thresholds.sigmas  # a |z| bound; z uses the rescaled sigma
        limits["inputLengthSigma"] = length["sigma"] * scale(length["holdout"], 0.5)
        limits["oov"] = oov["mean"] + thresholds.sigmas * oov["sigma"] * scale(oov["holdout"], 0.5)
    if "embedding" in null:
        embedding = null["embedding"]
        squared = scale(embedding["holdout"], 1.0)
        limits["centroidCosine"] = _quantile(embedding["centroidCosine"], thresholds.p_value) * squared
        limits["mmd"] = _quantile(embedding["mmd"], thresholds.p_value) * squared
    return limits


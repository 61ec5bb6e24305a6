"""The reference a window is compared with: built once per adapter from its drift profile (pure).

See docs/drift.md for the method.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from kubetune_operator.stats.kernels import rbf, squared_distances
from kubetune_operator.stats.records import VALUE_DECIMALS, rounded_values

WORD = re.compile(r"[a-z0-9']+")  # kubetune_trainer.metrics.WORD: the profile's vocabulary is made of these
CLASSIFICATION, CAUSAL_LM = "classification", "causal-lm"
REFERENCE_API = "kubetune.io/drift-reference/v1"
MAX_EMBEDDINGS = 2000  # holdout embeddings kept in a reference (kernel matrices are O(n^2))
EMBEDDING_DECIMALS = 5


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def oov_rate(text: str, vocabulary: dict[str, int] | set[str] | frozenset[str], leave_one_out: bool = False) -> float:
    """Share of a text's words not in the training vocabulary (0 for a text without words).

    `leave_one_out` (with a counted vocabulary): the text was itself a training example, so a word counts
    as out of vocabulary when the text holds every occurrence the vocabulary counted, i.e. as if the
    vocabulary had been built without this text."""
    found = words(text)
    if not found:
        return 0.0
    if leave_one_out and isinstance(vocabulary, dict):
        own = Counter(found)
        return sum(1 for w in found if vocabulary.get(w, 0) - own[w] <= 0) / len(found)
    return sum(1 for w in found if w not in vocabulary) / len(found)


def build_reference(profile: dict, holdout_texts: list[str], holdout_embeddings: list[list[float]] | None,
                    *, leave_one_out: bool = False, max_embeddings: int = MAX_EMBEDDINGS, seed: int = 0) -> dict:
    """What windows are compared with, from the adapter's drift profile and its holdout inputs.

    `holdout_texts`: inputs the adapter was not trained on (the dataset's validation set); with
    `leave_one_out` they may be training inputs (no validation set): their out-of-vocabulary rates are
    then measured as if each had been left out of the vocabulary. `holdout_embeddings`: sentence
    embeddings of (a sample of) those texts, or None (no embedding diagnostics); at most
    `max_embeddings` are kept (a seeded sample). JSON-serialisable; build it once per adapter digest.
    """
    kind = profile.get("kind")
    if kind not in (CLASSIFICATION, CAUSAL_LM):
        raise ValueError(f"driftProfile.kind {kind!r} is not {CLASSIFICATION!r} or {CAUSAL_LM!r}")
    confidence = rounded_values((profile.get("confidence") or {}).get("values"))
    if len(confidence) < 2:
        raise ValueError("the drift profile holds fewer than 2 holdout confidence values: nothing to calibrate")
    entropy = rounded_values((profile.get("entropy") or {}).get("values"))
    if kind == CLASSIFICATION or profile.get("decoding"):
        # a causal LM's entropies are comparable with traffic's only when measured on its own generated
        # answers from top logprobs (`decoding` recorded); teacher-forced full-softmax entropies are not
        if len(entropy) < 2:
            raise ValueError("the drift profile holds fewer than 2 holdout entropy values")
        two_sample = {"of": "entropy", "direction": "greater", "values": entropy}
    else:  # a profile of reference-token probabilities: the test runs on confidence
        two_sample = {"of": "confidence", "direction": "less", "values": confidence}
    counted = {str(w): int(c) for w, c in (profile.get("vocabulary") or {}).items()}
    texts = [t for t in holdout_texts if isinstance(t, str)]
    reference = {
        "apiVersion": REFERENCE_API,
        "kind": kind,
        "holdoutSize": len(confidence),
        "confidence": confidence,
        "twoSample": two_sample,
        "texts": len(texts),
        "inputLength": [len(words(t)) for t in texts],
        "oov": [round(oov_rate(t, counted, leave_one_out), VALUE_DECIMALS) for t in texts],
        "leaveOneOut": leave_one_out,
        "vocabulary": sorted(counted),
        "embeddings": None,
    }
    if holdout_embeddings:
        matrix = np.asarray(holdout_embeddings, dtype=np.float64)
        if matrix.ndim != 2 or matrix.shape[0] < 2 or not np.isfinite(matrix).all():
            raise ValueError("holdout_embeddings must be at least 2 finite vectors of one dimension")
        if matrix.shape[0] > max_embeddings:
            keep = np.sort(np.random.default_rng(seed).choice(matrix.shape[0], max_embeddings, replace=False))
            matrix = matrix[keep]
        matrix = np.round(matrix, EMBEDDING_DECIMALS)
        distances = np.sqrt(squared_distances(matrix, matrix))
        upper = distances[np.triu_indices(matrix.shape[0], 1)]
        bandwidth = float(np.median(upper))
        if not bandwidth > 0:
            bandwidth = float(upper.max()) if upper.max() > 0 else 1.0
        kernel = rbf(distances ** 2, bandwidth)
        n = matrix.shape[0]
        reference["embeddings"] = {
            "dimension": int(matrix.shape[1]),
            "vectors": matrix.tolist(),
            "centroid": matrix.mean(axis=0).tolist(),
            "bandwidth": bandwidth,
            # the holdout's own kernel mean (pairs of distinct examples): a constant of every window's MMD^2
            "holdoutKernelMean": float((kernel.sum() - np.trace(kernel)) / (n * (n - 1))),
        }
    return reference


"""Kernel helpers shared by the reference, the calibration and the window tests (pure numpy)."""

from __future__ import annotations

import numpy as np


def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    squared = (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(squared, 0.0)


def rbf(squared: np.ndarray, bandwidth: float) -> np.ndarray:
    return np.exp(-squared / (2.0 * bandwidth * bandwidth))


def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return 1.0 - (a * b).sum(axis=-1) / np.maximum(norms, 1e-12)


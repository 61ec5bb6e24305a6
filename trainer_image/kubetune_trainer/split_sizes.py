"""How many examples a split sends to validation, overall and per stratum: arithmetic on sizes only."""

from __future__ import annotations

import heapq
import math


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)  # round() rounds half to even, which surprises in a size


def validation_size(n: int, fraction: float) -> int:
    if fraction == 0 or n < 2:
        return 0
    # Whoever asks for a validation set gets at least one example, and training keeps at least one.
    return min(max(_round_half_up(fraction * n), 1), n - 1)


def allocate(sizes: dict[str, int], fraction: float, target: int) -> dict[str, int]:
    """Validation examples per stratum: 1..size-1 for strata of >= 2, 0 for singletons (kept for training);
    then the largest remainders move the total towards target (Hamilton's method)."""
    order = sorted(sizes)  # the tie-break, so the allocation depends on nothing but the sizes
    quota = {k: min(max(math.floor(fraction * sizes[k]), 1), sizes[k] - 1) if sizes[k] >= 2 else 0 for k in order}
    total = sum(quota.values())
    # Ties go to the larger stratum, whose proportion moves least by one example.
    if total > target:  # the one-per-stratum minimum overshot: take back from the strata least under their share
        heap = [(fraction * sizes[k] - quota[k], -sizes[k], rank, k) for rank, k in enumerate(order) if quota[k] > 1]
        heapq.heapify(heap)
        while total > target and heap:
            _, _, rank, k = heapq.heappop(heap)
            quota[k] -= 1
            total -= 1
            if quota[k] > 1:
                heapq.heappush(heap, (fraction * sizes[k] - quota[k], -sizes[k], rank, k))
    elif total < target:
        heap = [
            (quota[k] - fraction * sizes[k], -sizes[k], rank, k)
            for rank, k in enumerate(order)
            if quota[k] < sizes[k] - 1
        ]
        heapq.heapify(heap)
        while total < target and heap:
            _, _, rank, k = heapq.heappop(heap)
            quota[k] += 1
            total += 1
            if quota[k] < sizes[k] - 1:
                heapq.heappush(heap, (quota[k] - fraction * sizes[k], -sizes[k], rank, k))
    return quota

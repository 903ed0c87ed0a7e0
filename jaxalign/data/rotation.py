"""Which prompts each round samples when a round uses only ``limit`` of them: a window that moves on every round.

Round 1 takes items ``0 .. limit-1``, round 2 the next ``limit``, and so on, wrapping around the end, so over the
rounds every prompt is sampled and none twice before all have been (SPIN keeps its prompts fixed instead: rounds then
all use round 1's window).
"""
from __future__ import annotations

import numpy as np


def rotating_window(n_items: int, limit: int | None, round_: int) -> np.ndarray:
    """Indices (int64 [min(limit, n_items)]) of the items round ``round_`` (1-based) uses; all items, in order, when
    ``limit`` is ``None`` or covers them."""
    if n_items < 0 or round_ < 1:
        raise ValueError(f"need n_items >= 0 and round_ >= 1, got n_items={n_items}, round_={round_}")
    if limit is None or limit >= n_items:
        return np.arange(n_items)
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    start = (round_ - 1) * limit % n_items
    return (start + np.arange(limit)) % n_items

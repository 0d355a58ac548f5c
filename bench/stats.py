"""Summaries of samples and the ratios between them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``samples``, linearly interpolated.

    Raises ValueError for no samples.
    """
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize_ms(seconds: Sequence[float]) -> dict[str, Any]:
    """Count, p50, p90, p99 and max of durations given in seconds, in milliseconds.

    The figures are None when there are no samples.
    """
    summary: dict[str, Any] = {"samples": len(seconds)}
    for name, q in (("p50_ms", 50.0), ("p90_ms", 90.0), ("p99_ms", 99.0), ("max_ms", 100.0)):
        summary[name] = round(percentile(seconds, q) * 1000, 3) if seconds else None
    return summary


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator`` rounded to 3 decimals, None when either is missing or 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return round(numerator / denominator, 3)

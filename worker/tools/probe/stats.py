"""Pure statistics of the probe: percentiles, rates, comment cuts."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile (0..1) by linear interpolation; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = (len(ordered) - 1) * min(max(fraction, 0.0), 1.0)
    low, high = math.floor(position), math.ceil(position)
    share = position - low
    return ordered[low] + (ordered[high] - ordered[low]) * share


def rate(count: int, total: int) -> float:
    return count / total if total else 0.0


def comment_kept(sent: str, served: str) -> tuple[int, str | None]:
    """(characters of ``sent`` the server kept, what it wrote instead if not a prefix).

    A cut comment is a prefix of the sent one (``'python script op'``); a blank one kept 0;
    anything else is a rewrite: 0 kept, and the rewrite is returned.
    """
    if sent.startswith(served):
        return len(served), None
    return 0, served


def midpoint_ms(before: float, after: float) -> float:
    """When something became visible between a poll that missed it and one that saw it."""
    return (before + after) / 2.0

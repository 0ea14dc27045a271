"""Binomial statistics for accuracies: Wilson score intervals and one summary record per proportion.

Every accuracy raydefense reports is a proportion k / n of test images, and carries n and a
95% Wilson interval (Wilson 1927; recommended over the normal approximation by Brown, Cai &
DasGupta 2001, "Interval Estimation for a Binomial Proportion", because it stays inside
[0, 1] and keeps its coverage for small n and for p near 0 or 1, which is exactly where
robust accuracies under strong attacks live).
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

__all__ = ["wilson", "proportion"]


def wilson(k: float, n: float, *, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` for ``k`` successes in ``n`` trials.

    Args:
        k: successes, ``0 <= k <= n``.
        n: trials; ``n <= 0`` gives the uninformative ``(0.0, 1.0)``.
        z: normal quantile (1.96 for 95%, the default).

    Returns:
        ``(low, high)`` with ``0 <= low <= k / n <= high <= 1``.
    """
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= k <= n:
        raise ValueError(f"wilson: need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    # Clip rounding: the exact interval contains p.
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))


def proportion(ok: Iterable[bool] | np.ndarray, **extra: Any) -> dict[str, Any]:
    """``{"accuracy": k / n, "n": n, "ci95": [low, high], **extra}`` for boolean flags ``ok``.

    ``accuracy`` is 0.0 when ``n == 0`` (and the interval is ``[0, 1]``).
    """
    flags = np.asarray(list(ok) if not isinstance(ok, np.ndarray) else ok, dtype=bool).reshape(-1)
    n, k = int(flags.size), int(flags.sum())
    lo, hi = wilson(k, n)
    return {"accuracy": k / n if n else 0.0, "n": n, "ci95": [lo, hi], **extra}

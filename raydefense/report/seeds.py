"""Summaries over training seeds for ablations (issue 12): :func:`seed_summary` (mean and
Student-t 95% interval over seeds) and :func:`paired_seed_difference` (an ablation against the
full defense, seed by seed, with the paired t-test); :func:`t_quantile` / :func:`t_cdf` from
the regularized incomplete beta function (pure Python; no scipy).

Values are in the unit they come in (e.g. accuracies as fractions).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np


@dataclass(frozen=True)
class SeedSummary:
    """Mean of one metric over ``n`` seeds with a Student-t 95% interval.

    ``sd`` is the sample standard deviation (ddof=1; 0.0 when n == 1), ``t`` the 0.975 quantile
    used (NaN when n == 1), ``degenerate`` is True when n == 1: the interval is then
    ``(mean, mean)`` and says nothing about seed-to-seed spread; ``note`` says so in words.
    """

    mean: float
    ci95: tuple[float, float]
    n: int
    sd: float
    t: float
    degenerate: bool
    method: str
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ci95"] = list(self.ci95)
        return d


@dataclass(frozen=True)
class SeedDifference:
    """Paired difference a - b over seeds: ``summary`` of the per-seed differences and the
    two-sided paired t-test ``p_value`` (None when n == 1)."""

    summary: SeedSummary
    p_value: Optional[float]
    differences: tuple[float, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary.to_dict(), "p_value": self.p_value, "differences": list(self.differences)}


# ----------------------------------------------------------------------------- Student t


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes
    3rd ed., sec. 6.4). Hand-written because numpy has no special functions and scipy is not a
    dependency of the package."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta: no convergence for a={a}, b={b}, x={x}")


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b), 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student-t distribution function P(T <= t) with ``df`` > 0 degrees of freedom:
    1 - I_{df/(df+t^2)}(df/2, 1/2) / 2 for t >= 0 (Abramowitz & Stegun 26.7.1, 26.5.27)."""
    if df <= 0:
        raise ValueError(f"t_cdf: df must be > 0, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(q: float, df: float) -> float:
    """Student-t quantile: the t with P(T <= t) = q, for 0 < q < 1 and ``df`` > 0.

    Inverts :func:`t_cdf` by bisection (monotone; 200 halvings reach float precision), so the
    result agrees with printed tables (e.g. t(0.975, 1) = 12.706, t(0.975, 9) = 2.262).
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"t_quantile: q must be in (0, 1), got {q}")
    if df <= 0:
        raise ValueError(f"t_quantile: df must be > 0, got {df}")
    if q < 0.5:
        return -t_quantile(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# ----------------------------------------------------------------------------- seeds


def _values(x: Any, name: str, fn: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64) if not isinstance(x, np.ndarray) else x.astype(np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{fn}: {name} must be 1-D (one value per seed), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{fn}: {name} is empty")
    if not np.isfinite(arr).all():
        raise ValueError(f"{fn}: {name} contains NaN or infinity")
    return arr


def seed_summary(values: Any) -> SeedSummary:
    """Mean over seeds with a 95% Student-t interval (Student 1908).

    Args:
        values: shape (n_seeds,), finite floats in any unit (e.g. one accuracy per training
            seed, as a fraction); the unit of the result is the unit of ``values``.

    Returns:
        :class:`SeedSummary`: mean +- t(0.975, n-1) * sd / sqrt(n), sd with ddof=1. The interval
        assumes the per-seed values are independent draws of a roughly normal quantity; with
        n of 3 to 5 seeds it is wide by construction (t(0.975, 2) = 4.30). n == 1 gives
        ``ci95 = (mean, mean)``, ``degenerate=True`` and a note saying the spread is unknown.

    Raises:
        ValueError: ``values`` empty, not 1-D, or not finite.
    """
    v = _values(values, "values", "seed_summary")
    n = int(v.size)
    mean = float(v.mean())
    if n == 1:
        return SeedSummary(mean=mean, ci95=(mean, mean), n=1, sd=0.0, t=float("nan"), degenerate=True,
                           method="single seed", note="one seed: no interval (seed-to-seed spread unknown)")
    sd = float(v.std(ddof=1))
    t = t_quantile(0.975, n - 1)
    half = t * sd / math.sqrt(n)
    return SeedSummary(mean=mean, ci95=(mean - half, mean + half), n=n, sd=sd, t=t, degenerate=False,
                       method=f"Student t, df={n - 1}")


def paired_seed_difference(a: Any, b: Any) -> SeedDifference:
    """Paired difference a - b over seeds (an ablation against the full defense).

    Args:
        a, b: shape (n_seeds,), finite; ``a[i]`` and ``b[i]`` come from the same seed (same
            data split and initialisation), e.g. a = ablated variant, b = full defense.

    Returns:
        :class:`SeedDifference`: :func:`seed_summary` of the per-seed differences and the
        two-sided paired t-test p-value 2 (1 - F_t(|mean| / (sd / sqrt(n)), n - 1)) (None when
        n == 1; 1.0 when every difference is 0; 0.0 when all differences are equal and not 0).

    Raises:
        ValueError: (one line, naming the argument) empty / non-finite input, ``b`` of another
            length than ``a``.
    """
    fn = "paired_seed_difference"
    x = _values(a, "a", fn)
    y = _values(b, "b", fn)
    if y.size != x.size:
        raise ValueError(f"{fn}: b has {y.size} seeds, a has {x.size}")
    d = x - y
    s = seed_summary(d)
    if s.degenerate:
        p: Optional[float] = None
    elif s.sd == 0.0:
        p = 1.0 if s.mean == 0.0 else 0.0
    else:
        tstat = abs(s.mean) / (s.sd / math.sqrt(s.n))
        p = min(1.0, 2.0 * (1.0 - t_cdf(tstat, s.n - 1)))
    return SeedDifference(summary=s, p_value=p, differences=tuple(float(v) for v in d))

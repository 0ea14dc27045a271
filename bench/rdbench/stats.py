"""Summaries over repeats and interleaved timing.

Every comparison in the suite is a ratio of two things timed in the same round: the rounds run
the contenders alternately (``A B`` then ``B A``: see :func:`round_order`), so a machine that
slows down or speeds up during the run shifts both sides of a round alike, and the ratio of each
round is kept. The figures reported are the median over rounds with the minimum and maximum.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Summary", "summarize", "round_order", "interleave", "paired_ratios", "timed"]


@dataclass(frozen=True)
class Summary:
    """Median, minimum and maximum of ``n`` values."""

    median: float
    min: float
    max: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(values: Sequence[float]) -> Summary:
    """:class:`Summary` of ``values`` (at least one; NaN is refused: a failed measurement is an
    error, never a number)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("summarize: no values")
    if any(v != v for v in vals):
        raise ValueError(f"summarize: NaN among {vals}")
    return Summary(median=statistics.median(vals), min=min(vals), max=max(vals), n=len(vals))


def round_order(names: Sequence[str], round_index: int) -> list[str]:
    """The order in which round ``round_index`` runs ``names``: as given in even rounds, reversed
    in odd ones (``A B, B A, A B, ...``), so that no contender always runs first or last."""
    return list(names) if round_index % 2 == 0 else list(reversed(names))


def timed(fn: Callable[[], Any], *, sync: Callable[[], None] | None = None) -> float:
    """Wall-clock seconds of one call of ``fn`` (``time.perf_counter``); ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs before the clock starts and before it stops."""
    if sync:
        sync()
    t0 = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - t0


def interleave(fns: Mapping[str, Callable[[], Any]], *, rounds: int, warmup: int = 1,
               sync: Callable[[], None] | None = None,
               measure: Callable[[str, Callable[[], Any]], float] | None = None) -> dict[str, list[float]]:
    """Run every function of ``fns`` once per round, ``warmup + rounds`` rounds, in the order of
    :func:`round_order`; returns ``name -> seconds`` of the last ``rounds`` rounds (index i of
    every list is round i).

    ``measure(name, fn) -> seconds`` replaces wall-clock timing of the call when a contender
    reports its own time (e.g. the per-epoch time of a training run)."""
    if rounds < 1 or warmup < 0:
        raise ValueError(f"interleave: rounds must be >= 1 and warmup >= 0, got {rounds}, {warmup}")
    out: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(warmup + rounds):
        for name in round_order(names, r):
            seconds = measure(name, fns[name]) if measure else timed(fns[name], sync=sync)
            if r >= warmup:
                out[name].append(float(seconds))
    return out


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Round-by-round ``numerator[i] / denominator[i]`` (equal lengths, positive denominators)."""
    if len(numerator) != len(denominator):
        raise ValueError(f"paired_ratios: {len(numerator)} values against {len(denominator)}")
    if any(d <= 0 for d in denominator):
        raise ValueError(f"paired_ratios: a denominator is not positive: {list(denominator)}")
    return [n / d for n, d in zip(numerator, denominator)]

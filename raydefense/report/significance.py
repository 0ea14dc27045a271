"""Intervals and paired tests that respect rows sharing an image, and summaries over seeds.

Why this module exists (issue 12). The white- and black-box test sets hold one row per
(image, attack method): two rows per test image by default. The rows of one image are not
independent (a face the classifier finds hard is hard under FGSM and I-FGSM alike), so a
Wilson interval over rows (:func:`raydefense.report.stats.wilson`) is too narrow, and
"defense A beats defense B" needs a *paired* test, because both defenses see the same rows.

What is here (pure numpy and the standard library; no Ray, no torch, no scipy):

* :func:`clustered_accuracy`: accuracy with a 95% percentile bootstrap interval that resamples
  *images* (clusters), not rows (the cluster bootstrap; Efron & Tibshirani 1993, *An
  Introduction to the Bootstrap*, ch. 6 and 13; Davison & Hinkley 1997, sec. 3.8).
* :func:`paired_test`: the difference in accuracy of two defenses on the same rows, a paired
  cluster-bootstrap 95% interval and an exact sign-flip (randomization) p-value over images,
  which is McNemar's exact test (McNemar 1947) when every image has one row and the exact
  version of the clustered McNemar test of Durkalski et al. (2003) otherwise.
* :func:`paired_comparisons` and :func:`render_paired_table`: every defense against no defense
  and against UDDN + KT, as records for metrics.json and as a markdown table for report.md.

Summaries over training seeds (Student t) are in :mod:`raydefense.report.seeds`.

All randomness comes from ``numpy.random.default_rng(seed)``: a call is deterministic for a
seed. Accuracies and differences are fractions in [0, 1] (resp. [-1, 1]), not percent.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from raydefense.report.stats import wilson

__all__ = [
    "ClusteredAccuracy", "PairedResult", "SeedSummary", "SeedDifference",
    "clustered_accuracy", "paired_test", "paired_comparisons", "render_paired_table",
    "seed_summary", "paired_seed_difference", "t_quantile", "t_cdf", "sign_flip_pvalues",
]

# 2000 resamples: Efron & Tibshirani (1993) advise 1000 or more for percentile intervals (a few
# dozen suffice for a standard error); a pair on 1000 images then takes ~0.15 s on one core.
DEFAULT_BOOT = 2000
# Resampled index matrices are drawn in blocks of at most this many entries (~32 MB of int64),
# so a test set of many thousand images does not allocate n_boot x n_images at once.
_BLOCK = 4_000_000


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ClusteredAccuracy:
    """Accuracy of one defense on one test set, with an interval over images.

    ``accuracy`` (fraction of rows correct), ``ci95`` ``(low, high)`` (fractions), ``n_rows``,
    ``n_clusters`` (distinct images), ``ci95_rows_independent`` (the Wilson interval that treats
    rows as independent, for comparison), ``method`` (how ``ci95`` was made), ``n_boot``, ``seed``.
    """

    accuracy: float
    ci95: tuple[float, float]
    n_rows: int
    n_clusters: int
    ci95_rows_independent: tuple[float, float]
    method: str
    n_boot: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (tuples become lists)."""
        d = asdict(self)
        d["ci95"] = list(self.ci95)
        d["ci95_rows_independent"] = list(self.ci95_rows_independent)
        return d


@dataclass(frozen=True)
class PairedResult:
    """Defense ``a`` against defense ``b`` on the same rows.

    ``difference`` = accuracy(a) - accuracy(b) (fraction), ``ci95`` its interval, ``p_value``
    (two-sided, exact, conservative) and ``p_mid`` (two-sided mid-p), ``accuracy_a``,
    ``accuracy_b``, ``n_rows``, ``n_clusters``, ``a_only`` / ``b_only`` (rows only a / only b gets
    right: McNemar's discordant counts), ``method``, ``n_boot``, ``seed``, and optional labels
    ``defense``, ``vs``, ``test_set`` for tables.
    """

    difference: float
    ci95: tuple[float, float]
    p_value: float
    p_mid: float
    accuracy_a: float
    accuracy_b: float
    n_rows: int
    n_clusters: int
    a_only: int
    b_only: int
    method: str
    n_boot: int
    seed: int
    defense: str = ""
    vs: str = ""
    test_set: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (tuples become lists)."""
        d = asdict(self)
        d["ci95"] = list(self.ci95)
        return d


# ----------------------------------------------------------------------------- input checks


def _flags(x: Any, name: str, fn: str) -> np.ndarray:
    """A 1-D boolean array from 0/1 or bool values, or a one-line ValueError naming ``name``."""
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{fn}: {name} must be 1-D (one flag per row), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{fn}: {name} is empty")
    if arr.dtype != bool:
        if not np.issubdtype(arr.dtype, np.number) or not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{fn}: {name} must hold booleans or 0/1, got dtype {arr.dtype}")
        arr = arr.astype(bool)
    return arr


def _clusters(cluster_ids: Any, n: int, fn: str, against: str) -> tuple[np.ndarray, int]:
    """Cluster codes 0..G-1 (in sorted order of the ids) for ``n`` rows."""
    ids = np.asarray(cluster_ids)
    if ids.ndim != 1:
        raise ValueError(f"{fn}: cluster_ids must be 1-D (one image id per row), got shape {ids.shape}")
    if ids.size != n:
        raise ValueError(f"{fn}: cluster_ids has {ids.size} rows, {against} has {n}")
    if ids.dtype.kind == "f" and np.isnan(ids).any():
        raise ValueError(f"{fn}: cluster_ids contains NaN")
    uniq, codes = np.unique(ids, return_inverse=True)
    return codes.reshape(-1), int(uniq.size)


def _check_boot(n_boot: int, fn: str) -> None:
    if not isinstance(n_boot, (int, np.integer)) or isinstance(n_boot, bool) or n_boot < 100:
        raise ValueError(f"{fn}: n_boot must be an integer >= 100, got {n_boot!r}")


def _resampled_sums(per_cluster: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Bootstrap sums over clusters: ``per_cluster`` (G, k) -> (n_boot, k).

    Each replicate draws G clusters with replacement (Efron & Tibshirani 1993, ch. 6) and sums
    their columns. Written by hand because numpy has no bootstrap and the rest of the project
    must not need scipy for a report; blocks bound the memory (see ``_BLOCK``).
    """
    g = per_cluster.shape[0]
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, per_cluster.shape[1]), dtype=np.float64)
    rows = max(1, _BLOCK // max(g, 1))
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        idx = rng.integers(0, g, size=(stop - start, g))
        out[start:stop] = per_cluster[idx].sum(axis=1)
    return out


# ----------------------------------------------------------------------------- accuracy


def clustered_accuracy(correct: Any, cluster_ids: Any, *, n_boot: int = DEFAULT_BOOT, seed: int = 0) -> ClusteredAccuracy:
    """Accuracy over rows with a 95% interval from a bootstrap over images (clusters).

    Args:
        correct: shape (n_rows,), bool or 0/1: row i classified correctly.
        cluster_ids: shape (n_rows,), any sortable ids (ints, strings): the image row i was made
            from (``index`` in the attack Parquet; the white-box set has one row per image and
            test method). Rows with equal ids form one cluster.
        n_boot: bootstrap replicates (>= 100; default 2000).
        seed: seed of ``numpy.random.default_rng``; equal seeds give equal intervals.

    Returns:
        :class:`ClusteredAccuracy`. ``accuracy`` is the plain row accuracy k / n. ``ci95`` is the
        percentile interval of the cluster bootstrap: each replicate draws the G images with
        replacement, keeps *all* rows of each drawn image, and recomputes k / n over those rows
        (the ratio estimator; Efron & Tibshirani 1993 ch. 13; Davison & Hinkley 1997 sec. 3.8
        on resampling the top stage of a two-stage sample). When every row is right (or every
        row wrong) the bootstrap distribution is a point, so the interval is instead Wilson's on
        the G images as if each were one trial (``method`` says so): the conservative choice,
        because identical outcomes say nothing about how correlated the rows of an image are.
        With one row per image the interval is the ordinary row bootstrap.

    Raises:
        ValueError: ``correct`` not 1-D / empty / not boolean, ``cluster_ids`` of another
            length, ``n_boot`` < 100.

    Caveat: the percentile interval undercovers a little with few images (G of a few dozen) and
    accuracies near 0 or 1; tests/report/test_significance.py measures its coverage.
    """
    fn = "clustered_accuracy"
    ok = _flags(correct, "correct", fn)
    codes, g = _clusters(cluster_ids, ok.size, fn, "correct")
    _check_boot(n_boot, fn)
    n, k = int(ok.size), int(ok.sum())
    naive = wilson(k, n)
    if k in (0, n):
        k_images = int(g if k == n else 0)
        lo, hi = wilson(k_images, g)
        method = "Wilson on images (all rows agree; bootstrap degenerate)"
    else:
        per = np.stack([np.bincount(codes, weights=ok, minlength=g), np.bincount(codes, minlength=g)], axis=1)
        sums = _resampled_sums(per.astype(np.float64), n_boot, seed)
        boot = sums[:, 0] / sums[:, 1]
        lo, hi = (float(v) for v in np.quantile(boot, [0.025, 0.975]))
        method = "cluster bootstrap over images, percentile"
    return ClusteredAccuracy(accuracy=k / n, ci95=(float(lo), float(hi)), n_rows=n, n_clusters=g,
                             ci95_rows_independent=(float(naive[0]), float(naive[1])), method=method,
                             n_boot=int(n_boot), seed=int(seed))


# ----------------------------------------------------------------------------- paired test


def _binom_pmf(n: int) -> np.ndarray:
    """Bin(n, 1/2) pmf, shape (n+1,): correctly rounded integer ratios comb(n, j) / 2^n up to
    n = 2000, log-gamma beyond (relative error ~1e-12)."""
    if n <= 2000:
        den = 1 << n
        return np.array([math.comb(n, i) / den for i in range(n + 1)])
    j = np.arange(n + 1)
    logc = np.array([math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in j])
    return np.exp(logc - n * math.log(2.0))


def sign_flip_pvalues(diffs: Any) -> tuple[float, float]:
    """Exact two-sided p-values ``(p_exact, p_mid)`` of the sign-flip test of sum(diffs) = 0.

    Args:
        diffs: shape (G,), integers: per image, (rows defense a gets right) - (rows b gets right).

    Under the null hypothesis that the two defenses are exchangeable on every image, each
    image's difference is equally likely to carry either sign (Fisher's randomization
    argument), so T = sum(s_c |d_c|) with independent fair signs s_c. Its distribution is built
    exactly: images with the same |d| = v contribute v (2X - m), X ~ Bin(m, 1/2), and the
    groups are convolved. ``p_exact`` = min(1, 2 P(T <= -|t|)); ``p_mid`` = min(1, 2 (P(T < -|t|)
    + P(T = -|t|) / 2)), the mid-p of Lancaster (1961), which Fagerland, Lydersen & Laake (2013,
    BMC Med Res Methodol 13:91) recommend for McNemar's test. With one row per image this *is*
    McNemar's exact (conditional binomial) test; its normal approximation is the clustered
    McNemar statistic (sum d)^2 / sum d^2 of Durkalski et al. (2003, Stat Med 22:2417).
    All-zero differences give (1.0, 1.0).
    """
    d = np.asarray(diffs, dtype=np.int64).reshape(-1)
    t = int(d.sum())
    v = np.abs(d[d != 0])
    if v.size == 0:
        return 1.0, 1.0
    total = int(v.sum())
    dist = np.zeros(2 * total + 1)  # index i <-> T = i - total
    dist[total] = 1.0
    for val, m in zip(*np.unique(v, return_counts=True)):
        val, m = int(val), int(m)
        pmf = _binom_pmf(m)  # X = 0..m  ->  T contribution val * (2X - m): steps of 2 val
        kernel = np.zeros(2 * val * m + 1)
        kernel[:: 2 * val] = pmf
        dist = np.convolve(dist, kernel)[val * m: val * m + 2 * total + 1]
    a = abs(t)
    below = float(dist[: total - a].sum())  # P(T < -|t|)
    at = float(dist[total - a])  # P(T = -|t|)
    return min(1.0, 2 * (below + at)), min(1.0, 2 * (below + 0.5 * at))


def paired_test(correct_a: Any, correct_b: Any, cluster_ids: Any = None, *, n_boot: int = DEFAULT_BOOT,
                seed: int = 0, defense: str = "", vs: str = "", test_set: str = "") -> PairedResult:
    """Difference in accuracy of defenses a and b on the same rows, its 95% interval and p-value.

    Args:
        correct_a, correct_b: shape (n_rows,), bool or 0/1, row i of both is the same adversarial
            image (same order): defense a / b classified row i correctly.
        cluster_ids: shape (n_rows,) image ids (rows of one image form a cluster), or None when
            every row is a different image.
        n_boot, seed: bootstrap replicates (>= 100) and seed (deterministic for a seed).
        defense, vs, test_set: labels carried into the result (for tables).

    Method (choice and why):
        * p-value: exact sign-flip randomization test over images (:func:`sign_flip_pvalues`).
          Without clusters it is McNemar's exact test on the discordant rows (McNemar 1947;
          exact conditional binomial). With clusters the unit that is flipped is an image, so
          rows that share an image never count as independent evidence; it is exact for any
          number of images (no Monte Carlo, no large-sample approximation, so small discordant
          counts are fine), and it is the exact form of Durkalski et al.'s (2003) clustered
          McNemar test. A paired cluster-bootstrap p-value was the alternative; it is only
          approximate and unreliable in the tails where small p-values live. ``p_value`` is the
          exact (conservative) one; ``p_mid`` the mid-p (closer to nominal size, Fagerland et
          al. 2013). Zero discordant rows give p = 1.
        * interval: paired percentile bootstrap over images (rows when ``cluster_ids`` is None):
          each replicate draws images with replacement and recomputes both accuracies on the
          same draw (Efron & Tibshirani 1993, ch. 13). With no discordant row the bootstrap is a
          point at 0, so the interval is then +-(Wilson upper bound of the share of discordant
          images, 0 of G), since |difference| can be no larger than that share.
        The test and the interval are different procedures, so near p = 0.05 the interval may
        touch 0 while p < 0.05 or the reverse; report both.

    Raises:
        ValueError: (one line, naming the argument) ``correct_b`` or ``cluster_ids`` of another
            length than ``correct_a``, empty or non-boolean input, ``n_boot`` < 100.
    """
    fn = "paired_test"
    a = _flags(correct_a, "correct_a", fn)
    b = _flags(correct_b, "correct_b", fn)
    if b.size != a.size:
        raise ValueError(f"{fn}: correct_b has {b.size} rows, correct_a has {a.size}")
    _check_boot(n_boot, fn)
    n = int(a.size)
    if cluster_ids is None:
        codes, g = np.arange(n), n
        unit = "rows"
    else:
        codes, g = _clusters(cluster_ids, n, fn, "correct_a")
        unit = "images"
    ai, bi = a.astype(np.int64), b.astype(np.int64)
    d_cluster = np.bincount(codes, weights=ai - bi, minlength=g).round().astype(np.int64)
    p_exact, p_mid = sign_flip_pvalues(d_cluster)
    diff = float((ai.sum() - bi.sum()) / n)
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    if a_only == 0 and b_only == 0:
        u = wilson(0, g)[1]
        ci = (-u, u)
        ci_method = f"+-Wilson bound on discordant {unit} (none discordant)"
    else:
        per = np.stack([np.bincount(codes, weights=ai - bi, minlength=g), np.bincount(codes, minlength=g)], axis=1)
        sums = _resampled_sums(per.astype(np.float64), n_boot, seed)
        boot = sums[:, 0] / sums[:, 1]
        ci = tuple(float(v) for v in np.quantile(boot, [0.025, 0.975]))
        ci_method = f"paired bootstrap over {unit}, percentile"
    test = "exact McNemar (rows)" if cluster_ids is None else "exact sign-flip over images (clustered McNemar)"
    return PairedResult(difference=diff, ci95=(float(ci[0]), float(ci[1])), p_value=float(p_exact), p_mid=float(p_mid),
                        accuracy_a=float(a.mean()), accuracy_b=float(b.mean()), n_rows=n, n_clusters=g,
                        a_only=a_only, b_only=b_only, method=f"p: {test}; CI: {ci_method}",
                        n_boot=int(n_boot), seed=int(seed), defense=defense, vs=vs, test_set=test_set)


def paired_comparisons(correct: Mapping[str, Any], cluster_ids: Any = None, *, baselines: Sequence[str] = ("none", "uddn_kt"),
                       test_set: str = "", n_boot: int = DEFAULT_BOOT, seed: int = 0) -> list[PairedResult]:
    """Every defense against each baseline present (default: no defense, then UDDN + KT).

    Args:
        correct: defense name -> shape (n_rows,) flags, all on the same rows in the same order
            (e.g. ``df[f"adv_ok_{d}"]`` of one test set in pipeline/evaluate.py).
        cluster_ids: shape (n_rows,) image ids of those rows (``df["index"]``), or None.
        baselines: names compared against; a baseline not in ``correct`` is skipped, a defense
            is never compared with itself, and a pair is compared once (no defense against
            UDDN + KT appears as UDDN + KT against no defense only).
        test_set, n_boot, seed: as in :func:`paired_test` (one seed for all pairs).

    Returns:
        A list of :class:`PairedResult` in the order baseline, then defense (insertion order of
        ``correct``); ``difference`` is always defense - baseline.

    Raises:
        ValueError: (one line) a defense's flags not 1-D boolean, or of another length than the
            first defense's (both named); ``cluster_ids`` of another length; ``n_boot`` < 100.
    """
    fn = "paired_comparisons"
    if not correct:
        return []
    flags = {name: _flags(v, f"correct[{name!r}]", fn) for name, v in correct.items()}
    first = next(iter(flags))
    for name, v in flags.items():
        if v.size != flags[first].size:
            raise ValueError(f"{fn}: defense {name!r} has {v.size} rows, {first!r} has {flags[first].size}")
    if cluster_ids is not None:
        _clusters(cluster_ids, flags[first].size, fn, f"defense {first!r}")
    out, done = [], set()
    for base in baselines:
        if base not in flags:
            continue
        for name, v in flags.items():
            if name != base and frozenset((name, base)) not in done:
                done.add(frozenset((name, base)))
                out.append(paired_test(v, flags[base], cluster_ids, n_boot=n_boot, seed=seed,
                                       defense=name, vs=base, test_set=test_set))
    return out


# ----------------------------------------------------------------------------- markdown


def _p_cell(p: float) -> str:
    if p < 0.001:
        return "<0.001"
    return f"{p:.3f}" if p < 0.995 else "1"


def render_paired_table(results: Iterable[PairedResult | Mapping[str, Any]],
                        labels: Optional[Mapping[str, str]] = None) -> str:
    """A markdown table of paired comparisons (no trailing newline).

    Columns: defense, vs, test set, difference (percentage points), 95% CI (points), p (exact),
    discordant rows (a only / b only), n (rows / images). ``results`` are :class:`PairedResult`
    or their ``to_dict()`` records (as read back from metrics.json); ``labels`` maps defense keys
    to display names (e.g. ``raydefense.report.paper.DEFENSE_LABELS``). An empty ``results``
    gives the header and one line saying there is nothing to compare.
    """
    labels = labels or {}
    lines = ["| defense | vs | test set | difference | 95% CI | p | discordant (a only / b only) | n rows / images |",
             "|---|---|---|---|---|---|---|---|"]
    rows = [r.to_dict() if isinstance(r, PairedResult) else dict(r) for r in results]
    for r in rows:
        lo, hi = r["ci95"]
        lines.append(f"| {labels.get(r['defense'], r['defense'])} | {labels.get(r['vs'], r['vs'])} | "
                     f"{r.get('test_set', '')} | {100 * r['difference']:+.1f} pts | "
                     f"{100 * lo:+.1f} to {100 * hi:+.1f} | {_p_cell(r['p_value'])} | "
                     f"{r['a_only']} / {r['b_only']} | {r['n_rows']} / {r['n_clusters']} |")
    if not rows:
        lines.append("| (no pairs of defenses to compare) | | | | | | | |")
    return "\n".join(lines)

"""Tests for raydefense.report.significance: intervals over images, paired tests, seed summaries.

Pure numpy, a few seconds in all. Every simulation has a fixed seed, so each is deterministic;
the tolerances stated beside them are what a correct method would meet with any seed (about
2.5 binomial standard errors of the simulated rate).
"""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from raydefense.report.seeds import paired_seed_difference, seed_summary, t_cdf, t_quantile
from raydefense.report.significance import (PairedResult, clustered_accuracy, paired_comparisons, paired_test,
                                            render_paired_table, sign_flip_pvalues)
from raydefense.report.stats import wilson


def _binom_sf_two_sided(b: int, c: int) -> tuple[float, float]:
    """McNemar by hand: exact min(1, 2 P(X <= min)) and mid-p, X ~ Bin(b + c, 1/2)."""
    n, k = b + c, min(b, c)
    pmf = [math.comb(n, i) / 2 ** n for i in range(n + 1)]
    cdf = sum(pmf[: k + 1])
    return min(1.0, 2 * cdf), min(1.0, 2 * (cdf - 0.5 * pmf[k]))


def _table(a_only: int, b_only: int, both: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([1] * a_only + [0] * b_only + [1] * both + [0] * neither, dtype=bool)
    b = np.array([0] * a_only + [1] * b_only + [1] * both + [0] * neither, dtype=bool)
    return a, b


# ----------------------------------------------------------------------------- clustered accuracy


def test_duplicated_rows_equal_distinct_image_bootstrap_and_are_wider_than_wilson():
    rng = np.random.default_rng(1)
    g = 80
    per_image = rng.random(g) < 0.7
    dup = np.repeat(per_image, 2)  # both rows of an image agree: the extreme of correlation
    ids = np.repeat(np.arange(g), 2)
    clustered = clustered_accuracy(dup, ids, n_boot=2000, seed=5)
    distinct = clustered_accuracy(per_image, np.arange(g), n_boot=2000, seed=5)
    assert clustered.accuracy == pytest.approx(distinct.accuracy)
    # Resampling images of duplicated rows is resampling the distinct images: same draws, same interval.
    assert clustered.ci95 == pytest.approx(distinct.ci95, abs=1e-12)
    assert (clustered.n_rows, clustered.n_clusters) == (2 * g, g)
    naive = wilson(int(dup.sum()), dup.size)
    assert clustered.ci95_rows_independent == pytest.approx(naive)
    width, naive_width = clustered.ci95[1] - clustered.ci95[0], naive[1] - naive[0]
    # Twice the rows, no new information: about sqrt(2) = 1.41 times the naive width.
    assert 1.2 < width / naive_width < 1.7
    assert clustered.ci95[0] <= clustered.accuracy <= clustered.ci95[1]


def test_one_row_per_image_is_close_to_wilson():
    rng = np.random.default_rng(2)
    ok = rng.random(300) < 0.7
    r = clustered_accuracy(ok, np.arange(300), n_boot=4000, seed=0)
    lo, hi = wilson(int(ok.sum()), ok.size)
    assert (r.ci95[1] - r.ci95[0]) / (hi - lo) == pytest.approx(1.0, abs=0.12)
    assert r.ci95[0] == pytest.approx(lo, abs=0.02) and r.ci95[1] == pytest.approx(hi, abs=0.02)


def test_deterministic_for_a_seed_and_ids_of_any_type():
    rng = np.random.default_rng(3)
    ok = rng.random(100) < 0.6
    ids = np.repeat(np.arange(50), 2)
    a = clustered_accuracy(ok, ids, n_boot=500, seed=7)
    assert a == clustered_accuracy(ok, ids, n_boot=500, seed=7)
    assert a.ci95 != clustered_accuracy(ok, ids, n_boot=500, seed=8).ci95
    # String ids that sort like the integers give the same clusters, the same draws.
    assert a == clustered_accuracy(ok.astype(int), [f"img{i:03d}" for i in ids], n_boot=500, seed=7)
    # Row order does not matter to which rows share an image (the interval is a different draw,
    # so only its width is compared).
    perm = rng.permutation(100)
    b = clustered_accuracy(ok[perm], ids[perm], n_boot=4000, seed=7)
    c = clustered_accuracy(ok, ids, n_boot=4000, seed=7)
    assert b.accuracy == c.accuracy and b.n_clusters == c.n_clusters
    assert b.ci95[1] - b.ci95[0] == pytest.approx(c.ci95[1] - c.ci95[0], abs=0.02)


def test_coverage_on_simulated_clustered_data():
    """Images with their own difficulty p_i ~ Beta (mean 0.7, intra-image correlation 0.8), two
    rows each: the image bootstrap covers the true accuracy 0.7 about 95% of the time, the row
    Wilson interval clearly less (theory: about 86% with design effect 1.8)."""
    rng = np.random.default_rng(12)
    g, sims, truth = 60, 400, 0.7
    a, b = truth * 0.25, (1 - truth) * 0.25  # a + b = 0.25: intra-class correlation 1 / (a + b + 1) = 0.8
    ids = np.repeat(np.arange(g), 2)
    hit = naive_hit = 0
    for s in range(sims):
        p = rng.beta(a, b, size=g)
        ok = (rng.random((g, 2)) < p[:, None]).reshape(-1)
        r = clustered_accuracy(ok, ids, n_boot=500, seed=s)
        hit += r.ci95[0] <= truth <= r.ci95[1]
        naive_hit += r.ci95_rows_independent[0] <= truth <= r.ci95_rows_independent[1]
    # 400 simulations: binomial SE of a 95% rate is 1.1 points; the percentile bootstrap with 60
    # images may undercover by 1-2 points. Tolerance: [0.915, 0.985].
    assert 0.915 <= hit / sims <= 0.985, hit / sims
    assert naive_hit / sims < 0.90, naive_hit / sims
    assert hit > naive_hit + 0.04 * sims


def test_all_correct_or_all_wrong_falls_back_to_wilson_on_images():
    ids = np.repeat(np.arange(30), 2)
    r = clustered_accuracy(np.ones(60, bool), ids)
    assert r.accuracy == 1.0 and r.ci95 == pytest.approx(wilson(30, 30)) and "Wilson on images" in r.method
    r = clustered_accuracy(np.zeros(60, bool), ids)
    assert r.accuracy == 0.0 and r.ci95 == pytest.approx(wilson(0, 30))
    # ... which is wider than the row interval (60 "independent" trials).
    assert r.ci95[1] > wilson(0, 60)[1]


def test_clustered_accuracy_bad_input():
    with pytest.raises(ValueError, match=r"^clustered_accuracy: cluster_ids has 3 rows, correct has 4$"):
        clustered_accuracy([1, 0, 1, 1], [0, 0, 1])
    with pytest.raises(ValueError, match="correct must hold booleans or 0/1"):
        clustered_accuracy([0.5, 1.0], [0, 1])
    with pytest.raises(ValueError, match="correct must be 1-D"):
        clustered_accuracy(np.ones((2, 2)), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="correct is empty"):
        clustered_accuracy([], [])
    with pytest.raises(ValueError, match="n_boot must be an integer >= 100"):
        clustered_accuracy([1, 0], [0, 1], n_boot=10)


# ----------------------------------------------------------------------------- paired test


@pytest.mark.parametrize("a_only,b_only", [(1, 6), (0, 5), (3, 3), (10, 2), (0, 1)])
def test_mcnemar_matches_hand_computed_binomial(a_only, b_only):
    a, b = _table(a_only, b_only, both=20, neither=7)
    r = paired_test(a, b, n_boot=200)
    exact, mid = _binom_sf_two_sided(a_only, b_only)
    assert r.p_value == pytest.approx(exact, rel=1e-12)
    assert r.p_mid == pytest.approx(mid, rel=1e-12)
    assert (r.a_only, r.b_only) == (a_only, b_only)
    assert r.difference == pytest.approx((a_only - b_only) / a.size)
    assert "McNemar" in r.method


def test_mcnemar_small_table_by_hand():
    # 1 vs 6 discordant rows: P(X <= 1) = 8/128 for X ~ Bin(7, 1/2); exact p = 16/128, mid-p = 9/128.
    a, b = _table(1, 6, both=5, neither=0)
    r = paired_test(a, b, n_boot=200)
    assert r.p_value == pytest.approx(0.125) and r.p_mid == pytest.approx(9 / 128)
    # One row per image, given as clusters: the same test.
    rc = paired_test(a, b, np.arange(a.size), n_boot=200)
    assert (rc.p_value, rc.p_mid) == pytest.approx((r.p_value, r.p_mid))


def test_sign_flip_distribution_equals_brute_force_enumeration():
    rng = np.random.default_rng(4)
    for _ in range(5):
        d = rng.integers(-2, 3, size=11)
        t = int(d.sum())
        totals = [sum(s * abs(int(x)) for s, x in zip(signs, d)) for signs in itertools.product((-1, 1), repeat=d.size)]
        totals = np.array(totals)
        lower = np.mean(totals <= -abs(t))
        at = np.mean(totals == -abs(t))
        exact, mid = sign_flip_pvalues(d)
        assert exact == pytest.approx(min(1.0, 2 * lower), abs=1e-12)
        assert mid == pytest.approx(min(1.0, 2 * (lower - 0.5 * at)), abs=1e-12)


def test_duplicated_rows_are_not_double_counted():
    """Both rows of each image agree: the clustered test equals McNemar on the distinct images,
    while McNemar on the rows (as if independent) reports a smaller p-value."""
    a1, b1 = _table(9, 2, both=30, neither=9)
    ids = np.repeat(np.arange(a1.size), 2)
    a2, b2 = np.repeat(a1, 2), np.repeat(b1, 2)
    clustered = paired_test(a2, b2, ids, n_boot=500)
    distinct = paired_test(a1, b1, n_boot=500)
    rows = paired_test(a2, b2, n_boot=500)
    assert clustered.p_value == pytest.approx(distinct.p_value, rel=1e-12)
    assert clustered.p_mid == pytest.approx(distinct.p_mid, rel=1e-12)
    assert rows.p_value < 0.5 * clustered.p_value
    assert clustered.difference == pytest.approx(distinct.difference)
    assert clustered.ci95[1] - clustered.ci95[0] > 1.2 * (rows.ci95[1] - rows.ci95[0])


def test_identical_defenses_give_zero_difference_and_p_one():
    rng = np.random.default_rng(5)
    ok = rng.random(120) < 0.6
    for ids in (None, np.repeat(np.arange(60), 2)):
        r = paired_test(ok, ok.copy(), ids, n_boot=200)
        assert r.difference == 0.0 and r.p_value == 1.0 and r.p_mid == 1.0
        assert (r.a_only, r.b_only) == (0, 0)
        lo, hi = r.ci95
        assert lo < 0 < hi and lo == pytest.approx(-hi)
    # Equal discordant counts in both directions: p = 1 too.
    a, b = _table(4, 4, both=10, neither=2)
    assert paired_test(a, b, n_boot=200).p_value == 1.0


def test_large_true_difference_is_detected():
    rng = np.random.default_rng(6)
    g = 60
    hard = rng.random(g) < 0.3  # shared difficulty: both rows of a hard image tend to fail
    a = (rng.random((g, 2)) < np.where(hard, 0.6, 0.95)[:, None]).reshape(-1)
    b = (rng.random((g, 2)) < np.where(hard, 0.1, 0.4)[:, None]).reshape(-1)
    ids = np.repeat(np.arange(g), 2)
    r = paired_test(a, b, ids, n_boot=2000, seed=1)
    assert r.p_value < 0.01 and r.p_mid <= r.p_value
    assert r.ci95[0] > 0 and r.ci95[0] <= r.difference <= r.ci95[1]
    assert r.difference == pytest.approx(a.mean() - b.mean())
    assert r.n_clusters == g and "sign-flip" in r.method
    # Swapping the defenses mirrors the result.
    s = paired_test(b, a, ids, n_boot=2000, seed=1)
    assert s.difference == pytest.approx(-r.difference) and s.p_value == pytest.approx(r.p_value)
    assert s.ci95 == pytest.approx((-r.ci95[1], -r.ci95[0]), abs=1e-12)


def test_clustered_test_keeps_its_size_where_row_mcnemar_does_not():
    """Null: the defenses are exchangeable on every image, but discordance comes per image (both
    rows favour the same defense). 300 simulations, 60 images, alpha 0.05: the clustered test
    rejects at most 8% (binomial SE 1.3 points; exact tests are at or below nominal), McNemar on
    rows about 15% (theory: P(|Z| > 1.96 / sqrt(2)))."""
    rng = np.random.default_rng(7)
    g, sims = 60, 300
    ids = np.repeat(np.arange(g), 2)
    rej_clustered = rej_rows = 0
    for _ in range(sims):
        favour_a = rng.random(g) < 0.5
        disc = np.repeat(rng.random(g) < 0.35, 2).reshape(g, 2)
        base = rng.random((g, 2)) < 0.6
        a, b = base.copy(), base.copy()
        fa = np.repeat(favour_a, 2).reshape(g, 2)
        a[disc], b[disc] = fa[disc], ~fa[disc]
        rej_clustered += paired_test(a.reshape(-1), b.reshape(-1), ids, n_boot=100).p_value <= 0.05
        rej_rows += paired_test(a.reshape(-1), b.reshape(-1), n_boot=100).p_value <= 0.05
    assert rej_clustered / sims <= 0.08, rej_clustered / sims
    assert rej_rows / sims >= 0.10, rej_rows / sims


def test_paired_test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match=r"^paired_test: correct_b has 3 rows, correct_a has 4$"):
        paired_test([1, 0, 1, 1], [1, 0, 1])
    with pytest.raises(ValueError, match=r"^paired_test: cluster_ids has 2 rows, correct_a has 3$"):
        paired_test([1, 0, 1], [1, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="correct_a must hold booleans or 0/1"):
        paired_test([2, 0], [1, 0])
    with pytest.raises(ValueError, match="cluster_ids must be 1-D"):
        paired_test([1, 0], [1, 1], [[0], [1]])
    with pytest.raises(ValueError, match="n_boot must be an integer >= 100"):
        paired_test([1, 0], [1, 1], n_boot=True)


def test_paired_comparisons_against_none_and_full_defense():
    rng = np.random.default_rng(8)
    ids = np.repeat(np.arange(40), 2)
    correct = {d: rng.random(80) < p for d, p in (("none", 0.3), ("uddn", 0.8), ("uddn_kt", 0.85), ("jpeg", 0.7))}
    res = paired_comparisons(correct, ids, test_set="white_box", n_boot=200)
    pairs = [(r.defense, r.vs) for r in res]
    # Each pair once: UDDN + KT against no defense is not repeated as no defense against UDDN + KT.
    assert pairs == [("uddn", "none"), ("uddn_kt", "none"), ("jpeg", "none"), ("uddn", "uddn_kt"), ("jpeg", "uddn_kt")]
    assert all(r.test_set == "white_box" and r.n_clusters == 40 for r in res)
    one = paired_test(correct["uddn"], correct["none"], ids, n_boot=200)
    assert res[0].difference == one.difference and res[0].p_value == one.p_value and res[0].ci95 == one.ci95
    # Without UDDN + KT in the run only the comparisons with no defense remain.
    assert len(paired_comparisons({k: v for k, v in correct.items() if k != "uddn_kt"}, ids, n_boot=200)) == 2
    correct["dae"] = correct["none"][:-1]
    with pytest.raises(ValueError, match=r"^paired_comparisons: cluster_ids has 79 rows, defense 'none' has 80$"):
        paired_comparisons({k: v for k, v in correct.items() if k != "dae"}, ids[:-1], n_boot=200)
    with pytest.raises(ValueError, match=r"^paired_comparisons: defense 'dae' has 79 rows, 'none' has 80$"):
        paired_comparisons(correct, ids, n_boot=200)


def test_render_paired_table_from_results_and_json_records():
    rng = np.random.default_rng(9)
    ids = np.repeat(np.arange(50), 2)
    none = rng.random(100) < 0.25
    kt = rng.random(100) < 0.85
    res = paired_comparisons({"none": none, "uddn_kt": kt}, ids, test_set="white-box", n_boot=200)
    records = json.loads(json.dumps([r.to_dict() for r in res]))  # as read back from metrics.json
    md = render_paired_table(records, labels={"none": "no defense", "uddn_kt": "UDDN + KT"})
    assert md == render_paired_table(res, labels={"none": "no defense", "uddn_kt": "UDDN + KT"})
    lines = md.splitlines()
    assert lines[0].startswith("| defense | vs | test set | difference | 95% CI | p |")
    assert len(lines) == 2 + 1 and all(line.count("|") == 9 for line in lines)
    r = res[0]
    assert lines[2].startswith(f"| UDDN + KT | no defense | white-box | {100 * r.difference:+.1f} pts | "
                               f"{100 * r.ci95[0]:+.1f} to {100 * r.ci95[1]:+.1f} | <0.001 |")
    assert f"| {r.a_only} / {r.b_only} | 100 / 50 |" in lines[2]
    assert "no pairs" in render_paired_table([])
    same = paired_test(kt, kt, ids, n_boot=200, defense="uddn_kt", vs="uddn_kt")
    assert "| +0.0 pts |" in render_paired_table([same]) and "| 1 |" in render_paired_table([same])
    assert isinstance(res[0], PairedResult)


# ----------------------------------------------------------------------------- Student t, seeds

# Two-sided 95% t quantiles t(0.975, df) from a printed table (e.g. Fisher & Yates; NIST/SEMATECH
# e-Handbook 1.3.6.7.2), three decimals.
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
           10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}


@pytest.mark.parametrize("df,t", sorted(T_TABLE.items()))
def test_t_quantile_matches_the_table(df, t):
    assert t_quantile(0.975, df) == pytest.approx(t, abs=6e-4)
    assert t_cdf(t_quantile(0.975, df), df) == pytest.approx(0.975, abs=1e-12)


def test_t_quantile_closed_forms():
    for q in (0.6, 0.9, 0.975, 0.995, 0.05):
        # df = 1 is the Cauchy distribution; df = 2 has t = (2q - 1) / sqrt(2 q (1 - q)).
        assert t_quantile(q, 1) == pytest.approx(math.tan(math.pi * (q - 0.5)), rel=1e-10)
        assert t_quantile(q, 2) == pytest.approx((2 * q - 1) / math.sqrt(2 * q * (1 - q)), rel=1e-10)
    assert t_quantile(0.975, 1e6) == pytest.approx(1.959966, abs=1e-5)  # the normal limit
    assert t_cdf(0.0, 7) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="q must be in"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="df must be > 0"):
        t_quantile(0.9, 0)


def test_seed_summary_by_hand():
    s = seed_summary([1.0, 2.0, 3.0, 4.0, 5.0])
    # mean 3, sd sqrt(2.5), t(0.975, 4) = 2.776 (table): half-width 2.776 * 1.5811 / sqrt(5) = 1.963
    assert s.mean == 3.0 and s.sd == pytest.approx(math.sqrt(2.5)) and s.n == 5 and not s.degenerate
    assert s.ci95 == pytest.approx((3 - 1.963, 3 + 1.963), abs=1e-3)
    s2 = seed_summary(np.array([0.80, 0.84]))
    # df = 1: half-width 12.706 * sd / sqrt(2) with sd = 0.04 / sqrt(2): 12.706 * 0.02 = 0.2541
    assert s2.ci95 == pytest.approx((0.82 - 0.25412, 0.82 + 0.25412), abs=1e-4)
    one = seed_summary([0.7])
    assert one.degenerate and one.ci95 == (0.7, 0.7) and "one seed" in one.note and math.isnan(one.t)
    json.dumps(s.to_dict())
    with pytest.raises(ValueError, match="values contains NaN"):
        seed_summary([0.1, float("nan")])
    with pytest.raises(ValueError, match="values is empty"):
        seed_summary([])


def test_paired_seed_difference_by_hand():
    a = [0.80, 0.82, 0.85]
    b = [0.70, 0.75, 0.80]
    r = paired_seed_difference(a, b)
    d = np.array(a) - np.array(b)
    mean, sd = d.mean(), d.std(ddof=1)
    t = mean / (sd / math.sqrt(3))
    # df = 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2)), so the two-sided p is 1 - |t| / sqrt(2 + t^2).
    assert r.p_value == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)
    assert r.summary.mean == pytest.approx(mean)
    half = 4.302653 * sd / math.sqrt(3)
    assert r.summary.ci95 == pytest.approx((mean - half, mean + half), abs=1e-6)
    assert r.differences == pytest.approx(tuple(d))
    assert paired_seed_difference([0.5, 0.6], [0.5, 0.6]).p_value == 1.0
    assert paired_seed_difference([0.7], [0.6]).p_value is None
    # Exactly equal non-zero differences (dyadic values, no rounding): t is infinite, p = 0.
    assert paired_seed_difference([0.75, 0.875], [0.5, 0.625]).p_value == 0.0
    json.dumps(r.to_dict())
    with pytest.raises(ValueError, match=r"^paired_seed_difference: b has 2 seeds, a has 3$"):
        paired_seed_difference(a, b[:2])

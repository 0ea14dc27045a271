"""The robust evaluation's summary without Ray: per-row flags -> accuracies with n and intervals
(never above clean), the worst case over attacks, the masking checks per defense (a defense whose
gradient attacks are masked is flagged, an honest one is not), the report section and console lines."""
from __future__ import annotations

import numpy as np
import pytest

from raydefense.pipeline.robust_eval import ATTACKS, summarize_robust

EPS = [2 / 255, 4 / 255, 8 / 255]
N = 60


def _rows(rng, clean_p, curve, square, transfer, large, stronger=None):
    """Flags of one defense: clean with prob clean_p; under attack k with prob curve[k] (given clean)."""
    clean = rng.random(N) < clean_p
    cols = {"clean": clean}
    for k in range(len(EPS)):
        for a in ("pgd", "apgd_ce", "apgd_dlr"):
            cols[f"{a}:{k}"] = rng.random(N) < curve[k]
        cols[f"square:{k}"] = rng.random(N) < square[k]
        cols[f"transfer:{k}"] = rng.random(N) < transfer[k]
    cols["pgd2s"] = rng.random(N) < (stronger if stronger is not None else curve[1])
    cols["pgd2r"] = cols["pgd:1"].copy()
    cols["large"] = rng.random(N) < large
    return cols


def _frame(per_defense):
    return {f"{d}:{k}": v for d, cols in per_defense.items() for k, v in cols.items()}


@pytest.fixture()
def summary():
    rng = np.random.default_rng(0)
    df = _frame({
        # honest: falls with eps, Square and transfer weaker, ~0 at huge eps
        "honest": _rows(rng, 0.95, [0.8, 0.6, 0.3], [0.9, 0.8, 0.6], [0.95, 0.9, 0.8], 0.0),
        # masked: gradient attacks do nothing, Square breaks it, large eps does not
        "masked": _rows(rng, 0.95, [0.95, 0.95, 0.95], [0.3, 0.1, 0.0], [0.9, 0.9, 0.9], 0.9),
    })
    df["index"] = np.arange(N)
    return summarize_robust(df, ["honest", "masked"], eps=EPS, headline=4 / 255, large_eps=0.5, tolerance=0.02,
                            setup={"images": N, "eps": EPS, "pgd_steps": 10, "pgd_restarts": 2, "apgd_steps": 20,
                                   "square_queries": 100, "headline_eps": 4 / 255, "large_eps": 0.5}), df


def test_records_never_above_clean_and_worst_is_the_minimum(summary):
    out, df = summary
    for d in ("honest", "masked"):
        rec = out["defenses"][d]
        clean = rec["clean"]
        assert clean["n"] == N and clean["ci95"][0] <= clean["accuracy"] <= clean["ci95"][1]
        for a in (*ATTACKS, "worst"):
            assert [r["eps"] for r in rec["attacks"][a]] == pytest.approx(EPS)
            for r in rec["attacks"][a]:
                assert r["n"] == N and r["accuracy"] <= clean["accuracy"] and r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]
        for k in range(len(EPS)):
            worst = rec["attacks"]["worst"][k]["accuracy"]
            assert worst <= min(rec["attacks"][a][k]["accuracy"] for a in ("pgd", "apgd_ce", "apgd_dlr", "square"))
            ok = df[f"{d}:clean"] & df[f"{d}:pgd:{k}"] & df[f"{d}:apgd_ce:{k}"] & df[f"{d}:apgd_dlr:{k}"] & df[f"{d}:square:{k}"]
            assert worst == pytest.approx(ok.mean())
        assert out["headline"][d] == rec["attacks"]["worst"][1]


def test_masked_defense_is_flagged_and_honest_one_passes(summary):
    out, _ = summary
    assert out["flagged"] == ["masked"]
    honest = {c["check"]: c["passed"] for c in out["checks"]["honest"]}
    assert set(honest) == {"eps_monotone", "large_eps", "stronger_attack", "gradient_free", "transfer"}
    assert all(c["passed"] is True for c in out["checks"]["honest"]), out["checks"]["honest"]
    masked = {c["check"]: c["passed"] for c in out["checks"]["masked"]}
    assert masked["gradient_free"] is False and masked["large_eps"] is False


def test_report_section_and_console_lines(summary):
    from raydefense.pipeline.evaluate import robust_summary_lines
    from raydefense.report.robust import robust_markdown

    out, _ = summary
    md = "\n".join(robust_markdown(out, {"pgd_at": 12.3}))
    assert "| masked | 4/255 |" in md and "**FAIL**" in md and "PASS" in md and "pgd_at 12 s" in md
    assert "Flagged (a masking check failed): masked." in md
    lines = robust_summary_lines(out)
    assert any(line.startswith("masked") and "FLAGGED" in line for line in lines)
    assert any(line.startswith("honest") and line.endswith("pass") for line in lines)


def test_headline_must_be_measured():
    with pytest.raises(ValueError, match="headline"):
        summarize_robust({}, [], eps=EPS, headline=3 / 255, large_eps=0.5, tolerance=0.02, setup={})

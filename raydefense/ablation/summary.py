"""The ablation's numbers: per variant and seed the four accuracies from each run's
``metrics.json``; over seeds the mean with a 95% Student-t interval; against the full defense
the paired difference seed by seed (:mod:`raydefense.report.seeds`); and ``ablation.md``.

Accuracies stay fractions in ``ablation.json``; ``ablation.md`` shows percent and points.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from raydefense.report.seeds import paired_seed_difference, seed_summary

METRICS = ("clean", "white_box", "black_box", "whole_model")
TITLES = {"clean": "clean", "white_box": "white-box", "black_box": "black-box", "whole_model": "whole-model"}
DEFINITIONS = {
    "clean": "accuracy on the clean test images (one row per image)",
    "white_box": "accuracy on the pre-generated white-box test set (FGSM / I-FGSM against the target, "
                 "attack.test_methods, each image's own eps; rows are (image, method) pairs)",
    "black_box": "accuracy on the pre-generated black-box test set (the same attacks against the surrogate)",
    "whole_model": "whole-model (adaptive) accuracy: an image of the eval.adaptive_max_images subset counts when the "
                   "defended model is right on the clean image, the pre-generated white-box image, PGD through the "
                   "whole defense and APGD-CE/DLR at the row's eps (accuracy_detail[d].autoattack."
                   "worst_case_accuracy; adaptive_pgd when eval.autoattack is off)",
}


def row_values(metrics: Mapping[str, Any], defense: str) -> dict[str, Optional[float]]:
    """One defense's values in one run's ``metrics.json``: the four metrics, and the two
    whole-model attacks separately (None where the run did not measure them).

    Raises KeyError naming the defense when the run has no such row."""
    acc = metrics["accuracy"].get(defense)
    if acc is None:
        raise KeyError(f"no accuracy row '{defense}' (rows: {', '.join(metrics['accuracy'])})")
    detail = metrics.get("accuracy_detail", {}).get(defense, {})
    worst = detail.get("autoattack", {}).get("worst_case_accuracy")
    return {
        "clean": acc.get("clean"),
        "white_box": acc.get("white_box"),
        "black_box": acc.get("black_box"),
        "whole_model": worst if worst is not None else acc.get("adaptive_pgd"),
        "adaptive_pgd": acc.get("adaptive_pgd"),
        "autoattack": acc.get("autoattack"),
    }


def summarize(per_seed: Mapping[str, Mapping[int, Mapping[str, Optional[float]]]], *, seeds: Sequence[int],
              full: str = "full") -> dict[str, dict[str, Any]]:
    """Statistics over seeds.

    Args:
        per_seed: variant -> seed -> metric -> value (a fraction, or None when not measured).
        seeds: the seeds, in order; every variant has a value dict for each.
        full: the variant the paired differences are taken against.

    Returns:
        variant -> ``{"summary": {metric: SeedSummary dict | None}, "vs_full": {metric:
        SeedDifference dict | None} | None}``; a metric is None (with ``missing`` naming the
        seeds) where a seed lacks it; ``vs_full`` is None for ``full`` itself.
    """
    out: dict[str, dict[str, Any]] = {}
    for variant, by_seed in per_seed.items():
        summary: dict[str, Any] = {}
        diffs: dict[str, Any] = {}
        missing: dict[str, list[int]] = {}
        for m in METRICS:
            values = [by_seed[s].get(m) for s in seeds]
            ref = [per_seed[full][s].get(m) for s in seeds]
            gaps = [s for s, v in zip(seeds, values) if v is None]
            if gaps:
                missing[m] = gaps
                summary[m] = None
                diffs[m] = None
                continue
            summary[m] = seed_summary(values).to_dict()
            diffs[m] = None if any(r is None for r in ref) else paired_seed_difference(values, ref).to_dict()
        out[variant] = {"summary": summary, "vs_full": None if variant == full else diffs}
        if missing:
            out[variant]["missing"] = missing
    return out


# ----------------------------------------------------------------------------- markdown


def clipped_ci(s: Mapping[str, Any], *, signed: bool = False) -> tuple[float, float]:
    """The interval cut to what the quantity can be: [0, 1] for an accuracy, [-1, 1] for a
    difference of two (a t-interval over few seeds can reach past both ends)."""
    lo, hi = s["ci95"]
    floor = -1.0 if signed else 0.0
    return max(lo, floor), min(hi, 1.0)


def _pct(s: Optional[Mapping[str, Any]], *, signed: bool = False) -> str:
    if s is None:
        return "-"
    sign = "+" if signed else ""
    mean = f"{100 * s['mean']:{sign}.1f}"
    if s.get("degenerate"):
        return mean
    lo, hi = clipped_ci(s, signed=signed)
    return f"{mean} [{100 * lo:{sign}.1f}, {100 * hi:{sign}.1f}]"


def _p(p: Optional[float]) -> str:
    if p is None:
        return ""
    return " (p < 0.001)" if p < 0.001 else f" (p {p:.2g})"


def _diff(d: Optional[Mapping[str, Any]]) -> str:
    if d is None:
        return "-"
    return _pct(d, signed=True) + _p(d.get("p_value"))


def render_markdown(result: Mapping[str, Any]) -> str:
    """``ablation.md`` from ``ablation.json``'s content."""
    seeds = result["seeds"]
    n = len(seeds)
    variants = result["variants"]
    order = result["order"]
    t = next((s["t"] for v in order for s in variants[v]["summary"].values() if s and not s["degenerate"]), None)
    lines = [
        f"# Ablation '{result['name']}'",
        "",
        f"The defense of Li & Wang (2019) against variants with one part removed or changed, over {n} seed"
        f"{'s' if n != 1 else ''} ({', '.join(str(s) for s in seeds)}). Each seed is a whole replicate: its own "
        "synthetic identities, split, target, surrogate, adversarial sets and GNR (one base run per seed, shared "
        "by that seed's variants), so the intervals below hold the spread of everything a rerun would change.",
        "",
        "Accuracy in %: mean over seeds and the 95% Student-t interval [low, high] "
        + (f"(mean +- t sd / sqrt(n), t(0.975, {n - 1}) = {t:.2f}; with {n} seeds the interval is wide by "
           "construction; shown cut to [0, 100], ablation.json has it uncut)." if t is not None
           else "(one seed: no interval)."),
        "",
        "| variant | what differs from the full defense | " + " | ".join(TITLES[m] for m in METRICS) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for v in order:
        row = variants[v]
        lines.append(f"| {v} | {row['changes']} | " + " | ".join(_pct(row["summary"][m]) for m in METRICS) + " |")
    lines += [
        "",
        f"## Paired differences against the full defense (variant - full, points; n = {n} seeds)",
        "",
        "Per seed, the variant's accuracy minus the full defense's on the same data, target and test sets; mean, "
        "95% Student-t interval of those differences, and the two-sided paired t-test's p-value. An interval "
        "that excludes 0 is a difference the seeds agree on.",
        "",
        "| variant | " + " | ".join(TITLES[m] for m in METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for v in order:
        if variants[v]["vs_full"] is not None:
            lines.append(f"| {v} | " + " | ".join(_diff(variants[v]["vs_full"][m]) for m in METRICS) + " |")
    lines += ["", "## Per seed", "", "clean / white-box / black-box / whole-model accuracy in %, each run's "
              "`report/metrics.json`.", "",
              "| variant | defense row | run | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|---|---|---|" + "---|" * n]
    for v in order:
        row = variants[v]
        cells = []
        for s in seeds:
            vals = row["per_seed"][str(s)]
            cells.append(" / ".join("-" if vals.get(m) is None else f"{100 * vals[m]:.1f}" for m in METRICS))
        lines.append(f"| {v} | `{row['defense']}` | `{row['run']}` | " + " | ".join(cells) + " |")
    lines += ["", "## Notes", ""]
    lines += [f"- **{TITLES[m]}**: {DEFINITIONS[m]}." for m in METRICS]
    present = set(order)
    if present & {"none", "no_kt"}:
        lines.append("- `none` and `no_kt` are rows of the full run itself (the same target, UDDN and test sets).")
    if present & {"dae", "pixel_guided"}:
        lines.append("- `dae` and `pixel_guided` are the paper's denoiser baselines in front of the target, without KT: "
                     "compare them with `no_kt` for the denoiser alone. The DAE reconstructs the whole image "
                     "through its bottleneck (no residual, as in the paper) with the UDDN's training budget; "
                     "its run's Table 1 gives how far its reconstruction is from the clean image.")
    if any(v.startswith("kt_") for v in order):
        lines.append("- KT variants reuse the full run's UDDN, denoised images and teacher, and train only their "
                     "student (equation 6 with their lambda and T).")
    uninformative = [s for s, ok in result.get("black_box_informative", {}).items() if ok is False]
    if uninformative:
        lines.append(f"- The black-box column is uninformative for seed(s) {', '.join(uninformative)}: the surrogate's "
                     "attacks barely hurt the undefended target there (see each run's report, black_box_check).")
    for v in order:
        missing = variants[v].get("missing")
        if missing:
            lines.append(f"- {v}: not measured " + "; ".join(f"{TITLES[m]} (seeds {', '.join(map(str, s))})"
                                                            for m, s in missing.items()) + ".")
    lines += [f"- {note}" for note in result.get("notes", [])]
    lines += ["", f"Runs: `{result['root']}/s<seed>-<run>/` (their `report/` has everything else). "
              "They read the stages they share from `s<seed>-base/` and are not standalone runs.",
              "", "![ablation](ablation.png)", ""]
    return "\n".join(lines)


def console_table(result: Mapping[str, Any]) -> str:
    """The summary printed at the end: mean [95% CI] per variant, and the white-box difference."""
    variants = result["variants"]
    head = f"{'variant':<18}" + "".join(f"{TITLES[m]:>22}" for m in METRICS) + f"{'white-box vs full':>24}"
    lines = ["", f"ablation '{result['name']}': {len(result['seeds'])} seeds, accuracy in % (mean [95% CI])", head]
    for v in result["order"]:
        row = variants[v]
        diff = row["vs_full"]["white_box"] if row["vs_full"] else None
        lines.append(f"{v:<18}" + "".join(f"{_pct(row['summary'][m]):>22}" for m in METRICS)
                     + f"{_pct(diff, signed=True) if diff else '-':>24}")
    return "\n".join(lines)

"""report.md's section on the robust defenses (issue 13): the whole-model attack table (defense x
eps x attack, with clean accuracy on the same images), the gradient-masking checks, training
times. Renders ``metrics["robust"]`` (:mod:`raydefense.pipeline.robust_eval` documents its keys)."""
from __future__ import annotations

from typing import Any, Optional


def _eps_label(e: float) -> str:
    return f"{255 * e:g}/255"


def robust_markdown(robust: dict[str, Any], training_s: Optional[dict[str, float]] = None) -> list[str]:
    """report.md's section: the table (defense x eps x attack, clean on the same images), the masking
    checks (pass/fail with numbers; :func:`raydefense.robust.render_markdown`) and training times."""
    from raydefense.robust import CheckResult, render_markdown

    s = robust["setup"]
    out = ["## Robust defenses: whole-model attacks and gradient-masking checks", "",
           f"{s['images']} clean test images, one row each; every attack through the whole defended model, each on "
           f"its own: PGD-{s['pgd_steps']} x {s['pgd_restarts']} restarts, APGD-CE and APGD-DLR-{s['apgd_steps']}, "
           f"Square ({s['square_queries']} queries), transfer (PGD-{s['pgd_steps']} on the surrogate). 'worst' = "
           "robust only if the image survives PGD, APGD-CE, APGD-DLR and Square. Accuracy (95% Wilson interval).", "",
           "| defense | eps | clean | PGD | APGD-CE | APGD-DLR | Square | transfer | worst |", "|---|---|---|---|---|---|---|---|---|"]

    def cell(rec: dict[str, Any]) -> str:
        lo, hi = rec["ci95"]
        return f"{100 * rec['accuracy']:.1f}% [{100 * lo:.0f}, {100 * hi:.0f}]"

    for d, rec in robust["defenses"].items():
        for k, e in enumerate(s["eps"]):
            row = [cell(rec["attacks"][a][k]) for a in ("pgd", "apgd_ce", "apgd_dlr", "square", "transfer", "worst")]
            out.append(f"| {d} | {_eps_label(e)} | {cell(rec['clean'])} | " + " | ".join(row) + " |")
    out += ["", f"n = {s['images']} per cell.", "", "### Gradient-masking checks (Carlini et al. 2019; Athalye et al. 2018)", ""]
    checks = {d: [CheckResult(**c) for c in cs] for d, cs in robust["checks"].items()}
    out += [render_markdown(checks)]
    if training_s:
        out += ["Training wall time: " + ", ".join(f"{d} {v:.0f} s" for d, v in training_s.items()) + ".", ""]
    return out

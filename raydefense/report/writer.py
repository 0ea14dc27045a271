"""report.md + metrics.json + figures, written to ``<run>/report/`` (local or S3).

``report.md`` is meant to be read on its own: what was run (config, data, models), the
paper's Tables 1-3 (and 5 for a multi-model run) with the paper's numbers beside ours,
Figures 6 and 7, the attacks on the whole defended model with a plain reading of what they
mean, and the time every stage took. Every accuracy carries its number of test images and a
95% interval (Wilson on one row per image; a bootstrap over images where an image has a row per
attack method), and each defense is compared with no defense and with UDDN + KT by a paired test.

Files are written figures first, then metrics.json, then report.md last: a report.md
that exists is a finished report.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import yaml

from raydefense.report.figures import adaptive_figure, figure6, figure7
from raydefense.report.stats import wilson
from raydefense.report.significance import render_paired_table
from raydefense.report.paper import (DEFENSE_LABELS, HGD_ADAPTIVE, PAPER_TABLE1, PAPER_TABLE2, PAPER_TABLE3,
                                     TABLE2_ROWS, TABLE3_ROWS)

SETS = ("clean", "white_box", "black_box")
SET_TITLES = {"clean": "clean", "white_box": "white-box", "black_box": "black-box"}


# ----------------------------------------------------------------------------- cells


def pct(v: Optional[float], digits: int = 1) -> str:
    """``0.6125 -> '61.2%'``; ``None -> 'n/a'``."""
    return "n/a" if v is None else f"{100 * v:.{digits}f}%"


def acc_cell(det: Optional[dict[str, Any]]) -> str:
    """An accuracy with its 95% interval and n: ``'62.5% (41-80, n=24)'``, or
    ``'62.5% (38-85, n=48 rows / 24 images)'`` where rows share images (the interval is then
    over images: report/significance.clustered_accuracy)."""
    if not det:
        return "n/a"
    lo, hi = det["ci95"]
    n = f"n={det['n']} rows / {det['n_images']} images" if det.get("n_images") else f"n={det['n']}"
    return f"{100 * det['accuracy']:.1f}% ({100 * lo:.0f}-{100 * hi:.0f}, {n})"


def _same_rows(v: Optional[float], n: int) -> str:
    """An accuracy measured on ``n`` rows given as a bare fraction, with its interval."""
    if v is None or not n:
        return "n/a"
    lo, hi = wilson(round(v * n), n)
    return f"{100 * v:.1f}% ({100 * lo:.0f}-{100 * hi:.0f})"


def label(d: str) -> str:
    return DEFENSE_LABELS.get(d, d)


def _detail(metrics: dict[str, Any], d: str, s: str) -> Optional[dict[str, Any]]:
    return metrics.get("accuracy_detail", {}).get(d, {}).get(s)


# ----------------------------------------------------------------------------- sections


def _summary(metrics: dict[str, Any]) -> list[str]:
    acc = metrics["accuracy"]
    cfg = metrics.get("config", {})
    best = "uddn_kt" if "uddn_kt" in acc else ("uddn" if "uddn" in acc else None)
    lines = []
    if best and "none" in acc:
        b, n = acc[best], acc["none"]
        lines.append(
            f"On the paper's own test sets (attacks computed against the bare target model), {label(best)} scores "
            f"{pct(b.get('clean'))} clean, {pct(b.get('white_box'))} white-box and {pct(b.get('black_box'))} black-box; "
            f"with no defense the target scores {pct(n.get('clean'))}, {pct(n.get('white_box'))} and "
            f"{pct(n.get('black_box'))}.")
        if "adaptive_pgd" in b:
            same = _detail(metrics, best, "adaptive_pgd") or {}
            lines.append(
                f"An attacker who knows the defense and attacks denoiser and classifier as one model leaves "
                f"{pct(b['adaptive_pgd'])} (on {same.get('n', '?')} white-box test rows, where the paper-style white-box "
                f"attack leaves {pct(same.get('white_box_accuracy_same_rows'))}); see *Attacks on the whole defended model*.")
    robust = metrics.get("robust")
    if robust:
        hl = robust["setup"]["headline_eps"]
        parts = [f"{label(d)} {pct(r['accuracy'])} (clean {pct(robust['defenses'][d]['clean']['accuracy'])})"
                 for d, r in robust["headline"].items()]
        lines.append(f"Worst of PGD, APGD-CE, APGD-DLR and Square through the whole model at {255 * hl:g}/255: "
                     + "; ".join(parts) + ".")
        lines.append(("**Flagged by a gradient-masking check: " + ", ".join(robust["flagged"]) + "** (their robust "
                      "accuracy may be overstated; see *Robust defenses*).") if robust["flagged"]
                     else "No defense failed a gradient-masking check.")
    lines.append(f"Model: `{cfg.get('models', {}).get('target', '?')}`; data: `{metrics.get('data', {}).get('source', '?')}`.")
    return [" ".join(lines), ""]


def black_box_check(metrics: dict[str, Any], *, min_drop: float) -> dict[str, Any] | None:
    """Whether the black-box column can say anything: the surrogate's attacks must cost the
    undefended target at least ``min_drop`` (a fraction) of clean accuracy.

    Reads ``metrics['accuracy']['none']`` (clean, black_box) and the surrogate's and target's
    last validation accuracy from ``metrics['models']``. Returns ``{'no_defense_drop',
    'min_drop', 'informative', 'surrogate_val_acc', 'target_val_acc'}`` (accuracies as fractions;
    a model used with pretrained weights as they are has no validation accuracy: None), or None
    without a no-defense black-box result.
    """
    none = metrics.get("accuracy", {}).get("none", {})
    if "clean" not in none or "black_box" not in none:
        return None
    models = metrics.get("models", {})

    def val_acc(name: str) -> Optional[float]:
        return (models.get(name) or {}).get("metrics", {}).get("val_acc")

    drop = float(none["clean"] - none["black_box"])
    return {"no_defense_drop": drop, "min_drop": float(min_drop), "informative": drop >= min_drop,
            "surrogate_val_acc": val_acc("surrogate"), "target_val_acc": val_acc("target")}


def black_box_sentence(check: dict[str, Any], surrogate: str, *, target: str | None = None,
                       surrogate_init: str = "own", markdown: bool = True) -> str:
    """One plain sentence on the black-box column (:func:`black_box_check`), set against the
    paper's no-defense drop (Table 2); says so when the surrogate has the target's architecture
    (the attacker knows the architecture and data, not the weights) and, with
    ``surrogate_init='target'`` (``models.surrogate_init``), that it started from the target's
    starting weights; ``markdown=False`` for the console."""
    acc = check.get("surrogate_val_acc")
    same = ""
    if target is not None and target == surrogate:
        same = (": the target's architecture, trained from the target's starting weights on its own batches"
                if surrogate_init == "target" else ": the target's architecture, its own weights")
    source = f"the surrogate (`{surrogate}`{same}" + (f"; {pct(acc)} validation accuracy)" if acc is not None else ")")
    drop = f"{100 * check['no_defense_drop']:.1f} points"
    p = PAPER_TABLE2["none"]
    paper = f"{100 * (p['clean'] - p['black_box']):.1f} points, {pct(p['clean'])} -> {pct(p['black_box'])}"
    if check["informative"]:
        return (f"Black-box column: attacks made on {source} cost the undefended target {drop} of accuracy, so the "
                f"column measures what a defense recovers (paper: {paper}).")
    head = "Black-box column uninformative"
    return (f"{f'**{head}**' if markdown else head}: attacks made on {source} cost the undefended target only {drop} "
            f"of accuracy (below {100 * check['min_drop']:.0f}, `eval.black_box_min_drop`); they hardly transfer, so "
            f"no defense can show anything there (paper: {paper}). A surrogate closer to the target (more epochs, "
            f"pretrained weights, `models.surrogate_init: target`) makes the column meaningful.")


def _run_section(metrics: dict[str, Any]) -> list[str]:
    cfg = metrics.get("config", {})
    data = metrics.get("data", {})
    out = ["## What was run", ""]
    m = cfg.get("models", {})
    counts = data.get("split_counts", {})
    out.append(f"- **data**: `{data.get('source')}`, {data.get('num_classes')} identities, {data.get('image_size')} px; "
               "split " + ", ".join(f"{k} {v}" for k, v in counts.items()) + " images")
    for line in data.get("shortfalls", []):
        out.append(f"- data note: {line}")
    if data.get("no_face_found"):
        out.append(f"- MTCNN found no face in {data['no_face_found']} images (centre-cropped)")
    out.append(f"- **target** (white-box, the defended model): `{m.get('target')}`"
               + (f" from `{m.get('target_pretrained')}`" if m.get("target_pretrained") else "")
               + f"; **surrogate** (black-box source): `{m.get('surrogate')}`"
               + (" from the target's starting weights" if m.get("surrogate_init") == "target" else ""))
    a = cfg.get("attack", {})
    out.append(f"- **attacks**: GNR/denoiser training data {', '.join(a.get('train_methods', []))}; test sets "
               f"{', '.join(a.get('test_methods', []))}; each image its own eps ~ U[{255 * a.get('eps_min', 0):.1f}, "
               f"{255 * a.get('eps_max', 0):.1f}]/255 (L-inf)")
    dn, ds, g = cfg.get("denoise", {}), cfg.get("distill", {}), cfg.get("gnr", {})
    out.append(f"- **GNR** {'on' if g.get('enabled', True) else 'off'} (augment ratio {g.get('augment_ratio')}); "
               f"**UDDN** guidance `{dn.get('guidance')}`, widths {dn.get('widths')}; **knowledge transfer** "
               f"{'on' if ds.get('enabled', True) else 'off'}, lambda = {ds.get('lam')}, T = {ds.get('T')}")
    n = metrics.get("n_images", {})
    out.append(f"- **test images**: clean {n.get('clean')}, white-box rows {n.get('white_box')}, black-box rows "
               f"{n.get('black_box')} (one row per image and test method); Figure 7 on {n.get('by_epsilon')} images")
    for d, why in metrics.get("defenses_left_out", {}).items():
        out.append(f"- left out: **{label(d)}**: {why}")
    out.append("")
    models = metrics.get("models", {})
    if models:
        out += ["| artifact | kind | architecture | parameters | last recorded metrics |", "|---|---|---|---|---|"]
        for name, info in models.items():
            shown = ", ".join(f"{k} {v:.3g}" for k, v in info.get("metrics", {}).items()
                              if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch_s")
            out.append(f"| `{name}` | {info.get('kind')} | {info.get('arch') or '-'} | {info.get('parameters', 0):,} | "
                       f"{shown or '-'} |")
        out.append("")
    if cfg:
        out += ["<details><summary>Full resolved config</summary>", "", "```yaml",
                yaml.safe_dump(cfg, sort_keys=False).rstrip(), "```", "", "</details>", ""]
    return out


def _table1(metrics: dict[str, Any]) -> list[str]:
    out = ["## Table 1: mean L1 distance between the denoiser's output and the clean image", "",
           "Per-pixel mean absolute difference in [0, 1] units; lower is closer to the clean image. "
           "Paper: LFW, FaceNet.", "",
           "| defense | clean | paper | white-box | paper | black-box | paper |", "|---|---|---|---|---|---|---|"]
    for d, row in metrics.get("l1", {}).items():
        p = PAPER_TABLE1.get(d, {})
        cells = []
        for s in SETS:
            cells.append(f"{row[s]:.4f}" if s in row else "n/a")
            cells.append(f"{p[s]:.4f}" if s in p else "-")
        out.append(f"| {label(d)} | " + " | ".join(cells) + " |")
    n = metrics.get("n_images", {})
    out += ["", f"Images: clean {n.get('clean')}, white-box {n.get('white_box')}, black-box {n.get('black_box')}.", ""]
    return out


def _acc_table(metrics: dict[str, Any], rows, paper: dict[str, dict[str, float]], title: str, note: str) -> list[str]:
    acc = metrics["accuracy"]
    out = [title, "", note, "", "| defense | clean | paper | white-box | paper | black-box | paper |",
           "|---|---|---|---|---|---|---|"]
    shown = [d for d in rows if d in acc]
    for d in shown:
        p = paper.get(d, {})
        cells = []
        for s in SETS:
            cells.append(acc_cell(_detail(metrics, d, s)))
            cells.append(pct(p[s]) if s in p else "-")
        out.append(f"| {label(d)} | " + " | ".join(cells) + " |")
    missing = [label(d) for d in rows if d not in acc]
    if missing:
        out.append("")
        out.append("Not in this run: " + ", ".join(missing) + " (see *What was run*).")
    out.append("")
    return out


def _asr(metrics: dict[str, Any]) -> list[str]:
    acc = metrics["accuracy"]
    sets = ["white_box", "black_box"] + [s for s in ("adaptive_pgd", "autoattack")
                                         if any(s in acc[d] for d in acc)]
    titles = {"white_box": "white-box", "black_box": "black-box", "adaptive_pgd": "whole-model PGD",
              "autoattack": "APGD check"}
    out = ["### Attack success rates", "",
           "Of the test rows a defense classifies correctly when clean, the share each attack makes it get wrong.", "",
           "| defense | " + " | ".join(titles[s] for s in sets) + " |", "|---|" + "---|" * len(sets)]
    for d in acc:
        out.append(f"| {label(d)} | " + " | ".join(
            pct((_detail(metrics, d, s) or {}).get("attack_success_rate")) for s in sets) + " |")
    out.append("")
    return out


def _figures(figures: list[str]) -> list[str]:
    captions = {
        "figure6_denoising.png": "Figure 6: clean x, white-box adversarial x* and UDDN output x_hat, with the "
                                 "difference maps |x* - x| and |x_hat - x| (one colour scale).",
        "figure7_accuracy_vs_eps.png": "Figure 7: accuracy against the FGSM perturbation level for each defense, "
                                       "white-box (FGSM on the target) and black-box (FGSM on the surrogate); "
                                       "bands are Wilson 95% intervals.",
    }
    out = []
    for f in figures:
        if f in captions:
            out += [f"![{captions[f]}]({f})", "", f"*{captions[f]}*", ""]
    return out


def _whole_model(metrics: dict[str, Any], figures: list[str]) -> list[str]:
    acc = metrics["accuracy"]
    setup = metrics.get("adaptive_setup", {})
    attacked = [d for d in setup.get("defenses", metrics.get("adaptive", {}).keys()) if d in acc]
    if not attacked:
        return []
    out = ["## Attacks on the whole defended model", "",
           "**Two threat models.** The tables above follow the paper: each adversarial image is computed once against "
           "the bare target classifier and then passed through the defense, so the attacker does not know the defense "
           "exists. Here the attacker knows it and attacks the denoiser (or JPEG) and the classifier as one model: PGD "
           f"with {setup.get('pgd_steps')} steps and {setup.get('pgd_restarts')} random restart(s) through the whole "
           "model; real JPEG, which has no gradient, through BPDA (the real codec forward, the identity backward; "
           "Athalye et al. 2018); defenses with randomness through EOT. As an independent check with another optimiser "
           f"and loss, APGD-CE then APGD-DLR ({setup.get('apgd_steps')} steps, Croce & Hein 2020) attack the same "
           "images. Each attack counts an image as robust only if the defense also gets it right when clean.", "",
           f"**Same images, same budgets.** {setup.get('images')} test images drawn at random "
           f"({setup.get('rows')} white-box rows, one per test method), each attacked within the L-inf budget of its "
           "own pre-generated white-box image. *Whole-model PGD* keeps, per row, the worst of the pre-generated image "
           "and the PGD image, so it is never weaker than the paper's white-box attack on the same rows.", "",
           "All columns on the same rows (n in the bold column); 95% Wilson intervals in brackets.", "",
           "| defense | clean | paper-style white-box | PGD alone | **whole-model PGD** | APGD check | worst of all |",
           "|---|---|---|---|---|---|---|"]
    for d in attacked:
        det = _detail(metrics, d, "adaptive_pgd") or {}
        aa = _detail(metrics, d, "autoattack") or {}
        n = det.get("n", 0)
        out.append(f"| {label(d)} | {_same_rows(det.get('clean_accuracy_same_rows'), n)} | "
                   f"{_same_rows(det.get('white_box_accuracy_same_rows'), n)} | "
                   f"{_same_rows(det.get('pgd_alone_accuracy'), n)} | **{acc_cell(det)}** | "
                   f"{acc_cell(aa) if aa else 'not run'} | {_same_rows(aa.get('worst_case_accuracy'), n)} |")
    eot = setup.get("eot_samples", {})
    if isinstance(eot, dict) and eot:
        out += ["", "Forward passes per gradient (EOT; more than 1 only for defenses with randomness): "
                + ", ".join(f"{label(d)} {v}" for d, v in eot.items()) + "."]
    out.append("")
    curves = metrics.get("adaptive_detail") or {}
    if curves:
        levels = [r["eps"] for r in next(iter(curves.values()))]
        out += ["**Fixed budgets** (PGD through the whole model, one row per image, the threat model of the "
                "literature):", "",
                "| defense | " + " | ".join(f"eps {255 * e:.0f}/255" for e in levels) + " |",
                "|---|" + "---|" * len(levels)]
        for d in attacked:
            if d in curves:
                out.append(f"| {label(d)} | " + " | ".join(acc_cell(r) for r in curves[d]) + " |")
        out.append("")
    out += [_plain_reading(metrics, attacked), ""]
    if "adaptive_pgd.png" in figures:
        out += ["![Accuracy under PGD through the whole defended model](adaptive_pgd.png)", ""]
    return out


def _plain_reading(metrics: dict[str, Any], attacked: list[str]) -> str:
    """One paragraph a user can act on."""
    acc = metrics["accuracy"]
    best = next((d for d in ("uddn_kt", "uddn") if d in attacked), attacked[0])
    det = _detail(metrics, best, "adaptive_pgd") or {}
    adaptive = acc[best].get("adaptive_pgd")
    white = det.get("white_box_accuracy_same_rows")
    parts = [f"**What this means for a user.** Against the paper's attacker, {label(best)} keeps {pct(white)} of these "
             f"rows; against an attacker who differentiates through it, {pct(adaptive)} "
             f"(95% CI {pct(det.get('ci95', [0, 0])[0], 0)}-{pct(det.get('ci95', [0, 0])[1], 0)})."]
    if "none" in attacked and "adaptive_pgd" in acc.get("none", {}):
        gain = adaptive - acc["none"]["adaptive_pgd"]
        parts.append(f"The undefended target keeps {pct(acc['none']['adaptive_pgd'])} under the same attack, so the "
                     f"defense adds {100 * gain:+.1f} points against an adaptive attacker.")
    aa = _detail(metrics, best, "autoattack")
    if aa and adaptive is not None and aa["accuracy"] < adaptive - 1e-9:
        parts.append(f"The APGD check goes lower ({pct(aa['accuracy'])}; worst of all attacks "
                     f"{pct(aa.get('worst_case_accuracy'))}): PGD with these settings underestimates the attacker, "
                     f"so read the worst-of-all number and raise eval.adaptive_steps / eval.adaptive_restarts.")
    curve = {round(255 * e): a for e, a in metrics.get("adaptive", {}).get(best, [])}
    hgd = round(255 * HGD_ADAPTIVE["eps"])
    if hgd in curve:
        parts.append(f"At L-inf {hgd}/255 PGD leaves {pct(curve[hgd])}; Athalye & Carlini (2018) took HGD, the "
                     f"closest published relative of the UDDN, to {pct(HGD_ADAPTIVE['accuracy'])} at that budget.")
    none_det = _detail(metrics, "none", "adaptive_pgd") if "none" in attacked else None
    paper_gain = (white - none_det["white_box_accuracy_same_rows"]) if none_det and white is not None else None
    if paper_gain is not None and paper_gain <= 0.02:
        parts.append("In this run the defense does not beat the undefended model even under the paper's attack, so "
                     "there is no gain for an adaptive attacker to remove; check training (clean accuracy, epochs, data "
                     "size) before reading anything into these numbers.")
    elif white is not None and adaptive is not None and white - adaptive > 0.05:
        parts.append("The gains in Tables 2 and 3 rest largely on the attacker not knowing the defense: treat them as "
                     "protection against attacks transferred from an undefended model, not against an attacker who "
                     "can compute gradients of the deployed pipeline.")
    else:
        parts.append("Here the whole-model attack does not lower accuracy much below the paper-style attack on these "
                     "rows. Wide intervals (few images) or weak attack settings (few steps) can hide a drop: confirm "
                     "with more images and steps (eval.adaptive_max_images, eval.adaptive_steps) before relying on it.")
    return " ".join(parts)


def _table5(metrics: dict[str, Any]) -> list[str]:
    rows = metrics.get("table5")
    if not rows:
        return []
    from raydefense.report.compare import table5_lines

    return table5_lines(rows) + [""]


def _timings(metrics: dict[str, Any]) -> list[str]:
    t = metrics.get("timings_s", {})
    out = ["## Timings", "", "| stage | seconds |", "|---|---|"]
    for k, v in t.items():
        out.append(f"| {k} | {v:.1f} |")
    out.append(f"| **total** | {sum(t.values()):.1f} |")
    sub = metrics.get("eval_timings_s", {})
    if sub:
        out += ["", "Inside the evaluate stage:", "", "| step | seconds |", "|---|---|"]
        out += [f"| {k} | {v:.1f} |" for k, v in sub.items()]
    out.append("")
    return out


def _paired(metrics: dict[str, Any]) -> list[str]:
    """Each defense against no defense and against UDDN + KT on the same rows."""
    paired = metrics.get("paired_tests") or {}
    rows = [r for key in ("clean", "white_box", "black_box") for r in paired.get(key, [])]
    if not rows:
        return []
    return ["### Paired tests: is a defense's difference real?", "",
            "Both defenses on the same rows. The p-value is the exact sign-flip test over images (McNemar's exact "
            "test on the clean set, where each image is one row; its clustered form where an image has one row "
            "per attack method); the interval is a paired bootstrap over images. No correction for the number "
            "of comparisons.", "", render_paired_table(rows, labels=DEFENSE_LABELS), ""]


def render_markdown(metrics: dict[str, Any], figures: list[str]) -> str:
    """The whole report.md for one run's ``metrics`` and the figure files beside it."""
    cfg = metrics.get("config", {})
    out: list[str] = [f"# raydefense report: run `{cfg.get('name', '?')}`", "",
                      "Li & Wang (2019), *Defense Against Adversarial Attacks in Deep Learning*: GNR noise "
                      "reconstruction, the UDDN denoiser and knowledge transfer, reproduced with raydefense. Accuracies "
                      "are given as `accuracy (95% interval, n)`: a Wilson interval where each image is one row (clean), a bootstrap "
                      "over images where an image has one row per attack method (white-/black-box); the paper's numbers "
                      "(LFW, FaceNet) stand beside ours.", ""]
    out += _summary(metrics)
    if metrics.get("black_box_check"):
        m = cfg.get("models", {})
        out += [black_box_sentence(metrics["black_box_check"], m.get("surrogate", "?"), target=m.get("target"),
                                   surrogate_init=m.get("surrogate_init", "own")), ""]
    out += _run_section(metrics)
    out += _table1(metrics)
    out += ["## Tables 2 and 3: accuracy per defense", ""]
    out += _acc_table(metrics, TABLE2_ROWS, PAPER_TABLE2, "### Table 2: accuracy behind each denoiser",
                      "Classifier: the target. Pre-generated attacks against the bare target (white-box) and the "
                      "surrogate (black-box), the paper's threat model.")
    out += _acc_table(metrics, TABLE3_ROWS, PAPER_TABLE3, "### Table 3: the whole strategy against other defenses",
                      "UDDN + KT is the whole strategy (UDDN in front of the knowledge-transfer student). The paper's "
                      "Table 3 has no plain UDDN row; its pixel-guided row differs from its Table 2.")
    acc = metrics["accuracy"]
    if "none" in acc and "uddn_kt" in acc:
        gain = acc["uddn_kt"]["white_box"] - acc["none"]["white_box"]
        drop = acc["none"]["clean"] - acc["uddn_kt"]["clean"]
        out += [f"UDDN + KT against no defense: white-box accuracy {100 * gain:+.1f} points (paper: +38.9), clean "
                f"accuracy {-100 * drop:+.1f} points (paper: -0.6).", ""]
    out += _paired(metrics)
    out += _asr(metrics)
    out += _figures(figures)
    out += _whole_model(metrics, figures)
    if metrics.get("robust"):
        from raydefense.report.robust import robust_markdown

        out += robust_markdown(metrics["robust"], metrics["robust"].get("training_s"))
    out += _table5(metrics)
    out += _timings(metrics)
    return "\n".join(out)


# ----------------------------------------------------------------------------- files


def write_report(storage, metrics: dict[str, Any], examples: dict[str, np.ndarray]) -> None:
    """Render the figures, then write ``report/metrics.json`` and ``report/report.md`` (in that order)."""
    from raydefense.pipeline.run import RunLayout

    figures = []
    storage.write_bytes(RunLayout.report_rel("figure6_denoising.png"), figure6(examples))
    figures.append("figure6_denoising.png")
    storage.write_bytes(RunLayout.report_rel("figure7_accuracy_vs_eps.png"),
                        figure7(metrics["by_epsilon"], metrics.get("by_epsilon_black_box"),
                                n=metrics.get("n_images", {}).get("by_epsilon")))
    figures.append("figure7_accuracy_vs_eps.png")
    if metrics.get("adaptive"):
        steps = metrics.get("config", {}).get("eval", {}).get("adaptive_steps", "?")
        storage.write_bytes(RunLayout.report_rel("adaptive_pgd.png"), adaptive_figure(metrics["adaptive"], steps,
                                                                        detail=metrics.get("adaptive_detail")))
        figures.append("adaptive_pgd.png")
    metrics["figures"] = figures
    rewrite_report(storage, metrics)


def rewrite_report(storage, metrics: dict[str, Any]) -> None:
    """Write ``report/metrics.json`` then ``report/report.md`` (figures listed in ``metrics['figures']`` exist)."""
    from raydefense.pipeline.run import RunLayout

    storage.write_json(RunLayout.METRICS, metrics)
    storage.write_text(RunLayout.REPORT, render_markdown(metrics, list(metrics.get("figures", []))))

"""report.md + metrics.json + figures, written to ``<run>/report/`` (local or S3).

Files are written figures first, then metrics.json, then report.md last: a report.md
that exists is a finished report.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from raydefense.report.figures import DEFENSE_LABELS, adaptive_figure, figure6, figure7

# The paper's numbers (Li & Wang 2019, LFW + FaceNet), as fractions; keyed like metrics.json.
PAPER_L1 = {  # Table 1
    "none": {"clean": 0.0, "white_box": 0.0373, "black_box": 0.0157},
    "dae": {"clean": 0.0153, "white_box": 0.0359, "black_box": 0.0161},
    "pixel_guided": {"clean": 0.0138, "white_box": 0.0178, "black_box": 0.0145},
    "uddn": {"clean": 0.0125, "white_box": 0.0167, "black_box": 0.0134},
}
PAPER_ACC = {  # Tables 2 and 3 (the paper prints PGD's Table 2 row again as DCN in Table 3)
    "none": {"clean": 0.845, "white_box": 0.223, "black_box": 0.690},
    "dae": {"clean": 0.661, "white_box": 0.288, "black_box": 0.627},
    "pixel_guided": {"clean": 0.819, "white_box": 0.582, "black_box": 0.722},
    "uddn": {"clean": 0.831, "white_box": 0.602, "black_box": 0.753},
    "jpeg": {"clean": 0.822, "white_box": 0.534, "black_box": 0.558},
    "dcn": {"clean": 0.819, "white_box": 0.582, "black_box": 0.722},
    "distillation": {"clean": 0.836, "white_box": 0.563, "black_box": 0.708},
    "uddn_kt": {"clean": 0.839, "white_box": 0.612, "black_box": 0.765},
}
SETS = ("clean", "white_box", "black_box")


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _acc_cell(metrics: dict[str, Any], d: str, s: str) -> str:
    det = metrics.get("accuracy_detail", {}).get(d, {}).get(s)
    if not det:
        return "n/a"
    lo, hi = det["ci95"]
    return f"{100 * det['accuracy']:.1f}% [{100 * lo:.0f}, {100 * hi:.0f}] (n={det['n']})"


def render_markdown(metrics: dict[str, Any], figures: list[str]) -> str:
    cfg = metrics.get("config", {})
    data = metrics.get("data", {})
    acc = metrics["accuracy"]
    out: list[str] = []
    w = out.append
    w(f"# raydefense report: run `{cfg.get('name', '?')}`\n")
    w("Defense of Li & Wang (2019): GNR noise reconstruction, UDDN denoiser, knowledge transfer. "
      "Accuracies carry Wilson 95% intervals and the number of test images; the paper's numbers "
      "(LFW, FaceNet) stand beside ours where the paper has them.\n")

    w("## Run\n")
    m = cfg.get("models", {})
    counts = data.get("split_counts", {})
    w(f"- data: `{data.get('source')}`, {data.get('num_classes')} identities, {data.get('image_size')} px; "
      + ", ".join(f"{k} {v}" for k, v in counts.items()) + " images")
    for line in data.get("shortfalls", []):
        w(f"- data note: {line}")
    if data.get("no_face_found"):
        w(f"- MTCNN found no face in {data['no_face_found']} images (centre-cropped)")
    w(f"- target (white-box): `{m.get('target')}`; surrogate (black-box): `{m.get('surrogate')}`")
    a = cfg.get("attack", {})
    w(f"- attacks: training {', '.join(a.get('train_methods', []))}; test {', '.join(a.get('test_methods', []))}; "
      f"per-image eps ~ U[{255 * a.get('eps_min', 0):.1f}, {255 * a.get('eps_max', 0):.1f}]/255")
    dn, ds = cfg.get("denoise", {}), cfg.get("distill", {})
    w(f"- UDDN guidance: `{dn.get('guidance')}`; knowledge transfer lambda = {ds.get('lam')}, T = {ds.get('T')}")
    n = metrics.get("n_images", {})
    w(f"- test images: clean {n.get('clean')}, white-box {n.get('white_box')}, black-box {n.get('black_box')}")
    for d, why in metrics.get("defenses_left_out", {}).items():
        w(f"- left out: **{DEFENSE_LABELS.get(d, d)}**: {why}")
    w("")

    w("## Table 1: mean L1 distance between the denoiser's output and the clean image\n")
    w("| defense | clean | white-box | black-box | paper (clean / white / black) |")
    w("|---|---|---|---|---|")
    for d, row in metrics.get("l1", {}).items():
        p = PAPER_L1.get(d)
        paper = " / ".join(f"{p[s]:.4f}" for s in SETS) if p else "-"
        w(f"| {DEFENSE_LABELS.get(d, d)} | " + " | ".join(f"{row.get(s, float('nan')):.4f}" for s in SETS) + f" | {paper} |")
    w("")

    w("## Tables 2 and 3: accuracy per defense (pre-generated attacks, the paper's threat model)\n")
    w("| defense | clean | white-box | black-box | paper (clean / white / black) |")
    w("|---|---|---|---|---|")
    for d in acc:
        p = PAPER_ACC.get(d)
        paper = " / ".join(_pct(p[s]) for s in SETS) if p else "-"
        w(f"| {DEFENSE_LABELS.get(d, d)} | " + " | ".join(_acc_cell(metrics, d, s) for s in SETS) + f" | {paper} |")
    w("")
    w("Attack success rate (of the test images a defense classifies correctly when clean, the share the attack flips):\n")
    w("| defense | white-box | black-box |")
    w("|---|---|---|")
    for d in acc:
        det = metrics.get("accuracy_detail", {}).get(d, {})
        w(f"| {DEFENSE_LABELS.get(d, d)} | " + " | ".join(
            _pct(det.get(s, {}).get("attack_success_rate")) for s in ("white_box", "black_box")) + " |")
    w("")
    if "none" in acc and "uddn_kt" in acc:
        gain = acc["uddn_kt"]["white_box"] - acc["none"]["white_box"]
        drop = acc["none"]["clean"] - acc["uddn_kt"]["clean"]
        w(f"UDDN + knowledge transfer against no defense: white-box accuracy {100 * gain:+.1f} points "
          f"(paper: +38.9), clean accuracy {-100 * drop:+.1f} points (paper: -0.6).\n")

    if metrics.get("adaptive"):
        w("## Attacks on the whole defended model\n")
        w("The tables above follow the paper: adversarial images are computed against the bare classifier and then "
          "passed through the defense. An attacker who knows the defense attacks the denoiser and classifier "
          "together. PGD through the whole model (BPDA through real JPEG):\n")
        w("| defense | clean (same images) | pre-generated white-box | adaptive PGD | " + " | ".join(
            f"eps {255 * e:.0f}/255" for e, _ in next(iter(metrics["adaptive"].values()))) + " |")
        w("|---|---|---|---|" + "---|" * len(next(iter(metrics["adaptive"].values()))))
        for d, pts in metrics["adaptive"].items():
            same = metrics["accuracy_detail"][d]["adaptive_pgd"].get("clean_accuracy_same_images")
            w(f"| {DEFENSE_LABELS.get(d, d)} | {_pct(same)} | {_pct(acc[d].get('white_box'))} | "
              f"{_acc_cell(metrics, d, 'adaptive_pgd')} | " + " | ".join(_pct(a_) for _, a_ in pts) + " |")
        w("")
        worst = min(acc[d].get("adaptive_pgd", 1.0) for d in metrics["adaptive"])
        w(f"What this means for a user: against an attacker who can differentiate through the denoiser, the "
          f"defended models keep at most {100 * max(acc[d].get('adaptive_pgd', 0) for d in metrics['adaptive']):.1f}% "
          f"accuracy at the largest eps (worst defense {100 * worst:.1f}%). The gains in Tables 2 and 3 hold against "
          f"attackers who do not know the defense; they are not a guarantee against adaptive attackers, as Athalye "
          f"et al. (2018) showed for HGD.\n")

    w("## Figures\n")
    for f in figures:
        w(f"![{f}]({f})\n")

    w("## Timings\n")
    w("| stage | seconds |")
    w("|---|---|")
    for k, v in metrics.get("timings_s", {}).items():
        w(f"| {k} | {v:.1f} |")
    w(f"| total | {sum(metrics.get('timings_s', {}).values()):.1f} |")
    w("")
    return "\n".join(out)


def write_report(storage, metrics: dict[str, Any], examples: dict[str, np.ndarray]) -> None:
    figures = []
    storage.write_bytes("report/figure6_denoising.png", figure6(examples))
    figures.append("figure6_denoising.png")
    storage.write_bytes("report/figure7_accuracy_vs_eps.png", figure7(metrics["by_epsilon"], metrics.get("by_epsilon_black_box")))
    figures.append("figure7_accuracy_vs_eps.png")
    if metrics.get("adaptive"):
        steps = metrics.get("config", {}).get("eval", {}).get("adaptive_steps", "?")
        storage.write_bytes("report/adaptive_pgd.png", adaptive_figure(metrics["adaptive"], steps))
        figures.append("adaptive_pgd.png")
    storage.write_json("report/metrics.json", metrics)
    storage.write_text("report/report.md", render_markdown(metrics, figures))

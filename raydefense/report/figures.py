"""Figures 6 and 7 of the paper, rendered with matplotlib's Agg backend to PNG bytes."""
from __future__ import annotations

import io
from typing import Any

import numpy as np

from raydefense.report.paper import DEFENSE_LABELS
from raydefense.report.stats import wilson

__all__ = ["DEFENSE_LABELS", "figure6", "figure7", "adaptive_figure"]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def figure6(examples: dict[str, np.ndarray]) -> bytes:
    """Rows of clean x, adversarial x*, denoised x_hat, with |x* - x| and |x_hat - x| maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clean, adv = examples["clean"], examples["adv"]
    den = examples.get("denoised")
    cols = 5 if den is not None else 3
    n = len(clean)
    fig, axes = plt.subplots(n, cols, figsize=(2.1 * cols, 2.1 * n), squeeze=False)
    diff_adv = np.abs(adv.astype(np.float32) - clean.astype(np.float32)).mean(-1) / 255.0
    vmax = max(float(diff_adv.max()), 1e-6)
    for i in range(n):
        panels = [(clean[i], "x (clean)"), (adv[i], f"x* ({examples['method'][i]}, eps {255 * examples['eps'][i]:.1f}/255)")]
        if den is not None:
            panels.append((den[i], "x_hat (UDDN)"))
        panels.append((diff_adv[i], "|x* - x|"))
        if den is not None:
            panels.append((np.abs(den[i].astype(np.float32) - clean[i].astype(np.float32)).mean(-1) / 255.0, "|x_hat - x|"))
        for j, (img, title) in enumerate(panels):
            ax = axes[i, j]
            if img.ndim == 2:
                ax.imshow(img, cmap="magma", vmin=0, vmax=vmax)
            else:
                ax.imshow(img)
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.suptitle("Figure 6: denoising with the UDDN (difference maps share one colour scale)", fontsize=9)
    return _png(fig)


def _band(ax, eps_255: list[float], acc: list[float], n: int | None, color) -> None:
    """Shade the Wilson 95% interval of each point (``n`` images per point)."""
    if not n:
        return
    lo, hi = zip(*(wilson(round(a * n), n) for a in acc))
    ax.fill_between(eps_255, [100 * v for v in lo], [100 * v for v in hi], color=color, alpha=0.12, linewidth=0)


def figure7(by_eps: dict[str, list[list[float]]], by_eps_black: dict[str, list[list[float]]] | None = None, *,
            n: int | None = None) -> bytes:
    """Accuracy against perturbation level per defense (FGSM), white-box and black-box (Figure 7).

    ``by_eps[d]`` is ``[[eps, accuracy], ...]``; ``n`` (images per point) adds Wilson 95% bands.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("white-box (FGSM on the target)", by_eps)]
    if by_eps_black:
        panels.append(("black-box (FGSM on the surrogate)", by_eps_black))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels):
        for d, pts in curves.items():
            e = [255 * p[0] for p in pts]
            a = [p[1] for p in pts]
            (line,) = ax.plot(e, [100 * v for v in a], marker="o", label=DEFENSE_LABELS.get(d, d),
                              linewidth=2.2 if d == "uddn_kt" else 1.2)
            _band(ax, e, a, n, line.get_color())
        ax.set_xlabel("perturbation level eps (x/255, L-inf)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.set_title(title + (f", n={n}" if n else ""), fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Figure 7: accuracy under different levels of perturbation", fontsize=9)
    return _png(fig)


def adaptive_figure(curves: dict[str, list[list[float]]], steps: Any, *,
                    detail: dict[str, list[dict[str, Any]]] | None = None) -> bytes:
    """Robust accuracy against eps under PGD through the whole defended model, with Wilson bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for d, pts in curves.items():
        e = [255 * p[0] for p in pts]
        (line,) = ax.plot(e, [100 * p[1] for p in pts], marker="s", label=DEFENSE_LABELS.get(d, d))
        if detail and d in detail:
            lo = [100 * r["ci95"][0] for r in detail[d]]
            hi = [100 * r["ci95"][1] for r in detail[d]]
            ax.fill_between(e, lo, hi, color=line.get_color(), alpha=0.12, linewidth=0)
    ax.set_xlabel("eps (x/255, L-inf)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"PGD-{steps} through the whole defended model", fontsize=9)
    return _png(fig)

"""``ablation.png``: the ablation at a glance, rendered with matplotlib's Agg backend."""
from __future__ import annotations

import io
from typing import Any, Mapping

from raydefense.ablation.summary import METRICS, TITLES, clipped_ci


def ablation_figure(result: Mapping[str, Any]) -> bytes:
    """PNG bytes: two rows of one panel per metric (clean, white-box, black-box, whole-model).

    Top: each variant's mean accuracy over seeds (bar end) with its 95% Student-t interval
    (error bar) and each seed's value (dots). Bottom: the paired difference variant - full
    defense in points, mean and 95% interval, with a line at 0 (the full defense's row is
    left out). Variants run top to bottom in the order of ``ablation.md``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = list(result["order"])
    variants = result["variants"]
    seeds = [str(s) for s in result["seeds"]]
    others = [v for v in order if variants[v]["vs_full"] is not None]
    height = 1.2 + 0.32 * (len(order) + len(others))
    fig, axes = plt.subplots(2, len(METRICS), figsize=(3.3 * len(METRICS), height), squeeze=False,
                             gridspec_kw={"height_ratios": [max(len(order), 1), max(len(others), 1)]})
    colors = {v: plt.get_cmap("tab10")(i % 10) for i, v in enumerate(order)}
    for j, m in enumerate(METRICS):
        ax = axes[0, j]
        for i, v in enumerate(order):
            s = variants[v]["summary"][m]
            if s is None:
                continue
            y = len(order) - 1 - i
            lo, hi = clipped_ci(s)
            ax.barh(y, 100 * s["mean"], color=colors[v], alpha=0.35, height=0.7)
            ax.errorbar(100 * s["mean"], y, xerr=[[100 * (s["mean"] - lo)], [100 * (hi - s["mean"])]], fmt="o",
                        color=colors[v], capsize=3, ms=4)
            pts = [variants[v]["per_seed"][k].get(m) for k in seeds]
            ax.scatter([100 * p for p in pts if p is not None], [y] * sum(p is not None for p in pts), s=9,
                       color="black", zorder=3)
        ax.set_yticks(range(len(order)), list(reversed(order)) if j == 0 else [""] * len(order))
        ax.set_xlim(0, 100)
        ax.set_title(f"{TITLES[m]} accuracy (%)", fontsize=9)
        ax.grid(axis="x", alpha=0.3)

        ax = axes[1, j]
        reach = 0.01  # the x-range, symmetric about 0: at least 1 point, at most 100
        for i, v in enumerate(others):
            d = variants[v]["vs_full"][m]
            if d is None:
                continue
            y = len(others) - 1 - i
            lo, hi = clipped_ci(d, signed=True)
            reach = max(reach, abs(lo), abs(hi), *(abs(x) for x in d["differences"]))
            ax.errorbar(100 * d["mean"], y, xerr=[[100 * (d["mean"] - lo)], [100 * (hi - d["mean"])]], fmt="s",
                        color=colors[v], capsize=3, ms=4)
            ax.scatter([100 * x for x in d["differences"]], [y] * len(d["differences"]), s=9, color="black", zorder=3)
        ax.axvline(0, color="grey", lw=1)
        ax.set_xlim(-100 * min(1.0, 1.1 * reach), 100 * min(1.0, 1.1 * reach))
        ax.set_yticks(range(len(others)), list(reversed(others)) if j == 0 else [""] * len(others))
        ax.set_title(f"{TITLES[m]}: variant - full (points)", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    n = len(seeds)
    fig.suptitle(f"Ablation '{result['name']}': mean and 95% Student-t interval over {n} seed{'s' if n != 1 else ''} "
                 "(dots: seeds; intervals cut to the possible range); bottom: paired differences against the full "
                 "defense", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()

"""``trials.png``: a defense search at a glance, rendered with matplotlib's Agg backend."""
from __future__ import annotations

import io
import math
from typing import Any, Sequence

MARKERS = "os^Dvp*h"


def trials_figure(rows: Sequence[dict[str, Any]], *, best_id: str | None, phase_ends: Sequence[int] = (),
                  title: str = "") -> bytes:
    """PNG bytes with two panels.

    One cohesive thing (one figure, drawn panel by panel), so it stays one function.

    Left: the objective of every trial per Tune iteration (one line per trial; the dotted
    lines separate the UDDN, teacher and student phases; a short line is a trial ASHA stopped).
    Right: every trial's last objective against lambda (or the first numeric parameter),
    coloured by T (or the second numeric parameter), one marker per guidance layer;
    hollow markers were stopped early, the star is the best trial.

    Args:
        rows: one dict per trial with ``trial_id``, ``params``, ``status`` ('completed',
            'stopped_early', 'error'), ``objective`` and ``curve`` (objective per iteration).
        best_id: the best trial's id (starred).
        phase_ends: iteration numbers where a phase ends (drawn as dotted lines).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax_curve, ax_params) = plt.subplots(1, 2, figsize=(11, 4.2))
    guidances = sorted({str(r["params"].get("guidance", "")) for r in rows})
    marker = {g: MARKERS[i % len(MARKERS)] for i, g in enumerate(guidances)}
    cmap = plt.get_cmap("viridis")

    for r in rows:
        curve = [v for v in r.get("curve", []) if v is not None and math.isfinite(v)]
        if not curve:
            continue
        best = r["trial_id"] == best_id
        ax_curve.plot(range(1, len(curve) + 1), curve, marker=".", lw=2.5 if best else 1.0, alpha=1.0 if best else 0.6,
                      label=f"{r['trial_id']} (best)" if best else None)
    for x in phase_ends[:-1]:
        ax_curve.axvline(x + 0.5, color="grey", ls=":", lw=1)
    ax_curve.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax_curve.set_xlabel("Tune iteration (epochs: UDDN | teacher | student)")
    ax_curve.set_ylabel("objective")
    ax_curve.set_title("objective per epoch")
    if best_id:
        ax_curve.legend(loc="lower right", fontsize=8)

    numeric = [k for k in _param_names(rows) if all(isinstance(r["params"].get(k), (int, float))
                                                    and not isinstance(r["params"].get(k), bool) for r in rows)]
    xk = "lam" if "lam" in numeric else (numeric[0] if numeric else None)
    ck = "T" if "T" in numeric and xk != "T" else next((k for k in numeric if k != xk), None)
    done = [r for r in rows if r.get("objective") is not None and math.isfinite(r["objective"])]
    if xk is not None and done:
        cvals = [float(r["params"][ck]) for r in done] if ck else [0.0] * len(done)
        lo, hi = min(cvals), max(cvals)
        norm = matplotlib.colors.Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1)
        for r, c in zip(done, cvals):
            g = str(r["params"].get("guidance", ""))
            colour = cmap(norm(c))
            hollow = r["status"] != "completed"
            ax_params.scatter([r["params"][xk]], [r["objective"]], marker=marker[g], s=60,
                              facecolors="none" if hollow else [colour], edgecolors=[colour], linewidths=1.5)
            if r["trial_id"] == best_id:
                ax_params.scatter([r["params"][xk]], [r["objective"]], marker="*", s=260, facecolors="none",
                                  edgecolors="red", linewidths=1.5)
        if all(float(r["params"][xk]) > 0 for r in done):
            ax_params.set_xscale("log")
            ax_params.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax_params.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if ck:
            sm = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
            fig.colorbar(sm, ax=ax_params, label=ck)
        for g in guidances:
            ax_params.scatter([], [], marker=marker[g], facecolors="grey", edgecolors="grey", label=g or "-")
        if guidances != [""]:
            ax_params.legend(title="guidance", fontsize=8, loc="best")
        ax_params.set_xlabel(xk)
    ax_params.set_ylabel("last objective")
    ax_params.set_title("trials (hollow: stopped early)")
    if title:
        fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _param_names(rows: Sequence[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for r in rows:
        for k in r["params"]:
            if k not in names:
                names.append(k)
    return names

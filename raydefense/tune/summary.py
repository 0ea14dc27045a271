"""The end of a defense search: one row per trial, the best trial, ``summary.json``,
``best_config.yaml``, the trials figure, and the console summary. Split from
:mod:`raydefense.tune.search`, which re-exports these names.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional, Sequence

from raydefense.config import Config
from raydefense.errors import RayDefenseError
from raydefense.storage import Storage
from raydefense.tune.space import Knob, apply_params, overrides_for


def console(line: str) -> None:
    """The default ``echo``. Tune pickles its callbacks, and ``builtins.print`` itself cannot
    always be pickled (Ray's progress bars replace it while they run): this looks it up when called."""
    print(line)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def _first_line(text: str) -> str:
    return str(text).strip().splitlines()[0] if str(text).strip() else ""


def trial_rows(results, *, knobs: Sequence[Knob]) -> list[dict[str, Any]]:
    """One summary row per trial of a Tune ``ResultGrid``, in the order the trials were created."""
    names = [k.name for k in knobs if not k.fixed]
    rows = []
    for r in results:
        metrics = dict(r.metrics or {})
        trial_id = metrics.get("trial_id") or os.path.basename(str(r.path).rstrip("/"))
        status = "error" if r.error is not None else ("completed" if metrics.get("complete") else "stopped_early")
        curve: list[float] = []
        df = r.metrics_dataframe
        if df is not None and "objective" in df and "training_iteration" in df:
            # A trial restarted after the driver was killed counts its (replayed) epochs again.
            df = df.drop_duplicates("training_iteration", keep="last").sort_values("training_iteration")
            curve = [float(v) for v in df["objective"].tolist()]
        obj = metrics.get("objective")
        rows.append({
            "trial_id": trial_id,
            "status": status,
            "params": {n: r.config.get(n) for n in names},
            "objective": float(obj) if obj is not None else None,
            "val_white_acc": metrics.get("val_white_acc"),
            "val_clean_acc": metrics.get("val_clean_acc"),
            "val_pgd_acc": metrics.get("val_pgd_acc"),  # tune.defense: uddn_kt_adv
            "phase": metrics.get("phase"),
            "iterations": int(metrics.get("training_iteration", 0) or 0),
            "error": _first_line(str(r.error)) if r.error is not None else None,
            "curve": curve,
            "_error": r.error,
        })
    return rows  # in the order Tune created the trials


def pick_best(rows: Sequence[dict[str, Any]], *, mode: str) -> Optional[dict[str, Any]]:
    """The best trial: among those that trained every phase if any did, else among all that reported."""
    scored = [r for r in rows if r["objective"] is not None and math.isfinite(r["objective"]) and r["status"] != "error"]
    completed = [r for r in scored if r["status"] == "completed"]
    pool = completed or scored
    if not pool:
        return None
    sign = 1.0 if mode == "max" else -1.0
    # Ties (small validation sets make them common) go to the better clean accuracy, then to
    # the earlier trial.
    order = {id(r): i for i, r in enumerate(rows)}
    return max(pool, key=lambda r: (sign * r["objective"], r.get("val_clean_acc") or 0.0, -order[id(r)]))


def summarize(cfg: Config, results, *, knobs: Sequence[Knob], sdir: Storage, search: str, metric: str,
              concurrency: int, wall_s: float) -> dict[str, Any]:
    """Write ``trials.png``, ``best_config.yaml`` and (last) ``best.json``; return best.json's content."""
    from raydefense.pipeline.runtime import find_user_error
    from raydefense.tune.plot import trials_figure

    rows = trial_rows(results, knobs=knobs)
    best = pick_best(rows, mode=cfg.tune.mode)
    if best is None:
        errors = [r["_error"] for r in rows if r["_error"] is not None]
        for e in errors:
            found = find_user_error(e)
            if found is not None:
                raise found
        first = _first_line(str(errors[0])) if errors else "no trial reported a result"
        raise RayDefenseError(f"search '{search}' of run '{cfg.name}': no trial finished ({first})")
    best_cfg = apply_params(cfg, best["params"], knobs, name=f"{cfg.name}-{search}-best")
    sdir.write_text("best_config.yaml", f"# The best values of search '{search}' (trial {best['trial_id']}, objective "
                                        f"{best['objective']:.4f}); train with them:\n#   python jobs/full_pipeline.py "
                                        f"--config best_config.yaml\n" + best_cfg.to_yaml())
    phase_ends = []
    n = 0
    for e in (cfg.denoise.epochs, cfg.distill.teacher.epochs, cfg.distill.student.epochs):
        n += e
        phase_ends.append(n)
    sdir.write_bytes("trials.png", trials_figure(rows, best_id=best["trial_id"], phase_ends=phase_ends,
                                                 title=f"search '{search}' of run '{cfg.name}' ({metric})"))
    trial = sdir.child("trials", best["trial_id"])
    result = trial.read_json("result.json") if trial.exists("result.json") else {}
    public = [{k: v for k, v in r.items() if k not in ("curve", "_error")} for r in rows]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped_early", "error")}
    out = {
        "search": search,
        "run": cfg.name,
        "path": sdir.display(),
        "metric": metric,
        "mode": cfg.tune.mode,
        "clean_floor": cfg.tune.clean_floor,
        "best": {
            "trial_id": best["trial_id"],
            "status": best["status"],
            "params": best["params"],
            "overrides": overrides_for(cfg, best["params"], knobs),
            "objective": best["objective"],
            "metrics": {k: best[k] for k in ("val_white_acc", "val_clean_acc", "val_pgd_acc", "phase")},
            "final_metrics": result.get("metrics", {}),
        },
        "trials": public,
        "counts": counts,
        "space": [k.to_dict() for k in knobs],
        "num_samples": cfg.tune.num_samples,
        "max_concurrent": concurrency,
        "seed": cfg.tune.seed,
        "wall_s": wall_s,
        "files": {"best_config": sdir.display("best_config.yaml"), "plot": sdir.display("trials.png"),
                  "optuna": sdir.display("optuna_trials.json"), "experiment": sdir.display("experiment")},
    }
    sdir.write_json("best.json", out)
    return out


def _write_local_copy(sdir: Storage, path: Optional[str]) -> None:
    if path:
        with open(path, "w") as f:
            f.write(sdir.read_text("best_config.yaml"))


def format_summary(best: Mapping[str, Any]) -> str:
    """The console table of a finished search."""
    lines = [f"search '{best['search']}' of run '{best['run']}': {best['counts']['completed']} trials completed, "
             f"{best['counts']['stopped_early']} stopped early by ASHA, {best['counts']['error']} failed",
             f"  {'trial':<14} {'status':<14} {'objective':>9}  params"]
    for r in best["trials"]:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in r["params"].items())
        lines.append(f"  {r['trial_id']:<14} {r['status']:<14} {_fmt(r['objective']):>9}  {params}")
    b = best["best"]
    lines.append(f"best: trial {b['trial_id']}, objective {b['objective']:.4f} ({best['metric']}); "
                 + ", ".join(f"{k}={_fmt(v)}" for k, v in b["params"].items()))
    lines.append(f"train with the best values: python jobs/full_pipeline.py --config {best['files']['best_config']}")
    return "\n".join(lines)

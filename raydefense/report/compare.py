"""Tables across runs: Table 4 (datasets) and Table 5 (target models) of Li & Wang (2019).

Each finished run contributes one row, built from its ``report/metrics.json`` by
:func:`run_row`: the defended model's accuracy (UDDN + KT, or the UDDN alone when knowledge
transfer was off) beside the undefended target's ("NA" in the paper), on the clean,
white-box and black-box sets, plus the whole-model attack when the run has it. Runs that
differ in their data make Table 4; runs that differ in their target model make Table 5.

``compare_runs(storage, ["lfw", "ytf"])`` writes ``<storage>/comparisons/<out>/report.md``
and ``comparison.json``; a multi-model run (``models.extra_targets``) puts Table 5 into
its parent's own report.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from raydefense.errors import DataError
from raydefense.report.paper import PAPER_TABLE4, PAPER_TABLE4_NA, PAPER_TABLE5, paper_dataset_key

__all__ = ["run_row", "table4_lines", "table5_lines", "compare_runs", "format_rows"]

SETS = ("clean", "white_box", "black_box")


def run_row(metrics: dict[str, Any], *, run: str) -> dict[str, Any]:
    """One run's row: ``{run, model, dataset, defense, <set>: detail, <set>_na: detail, ...}``.

    ``detail`` is the run's ``accuracy_detail`` entry (``accuracy``, ``n``, ``ci95``, ...);
    ``<set>_na`` is the undefended target's. Sets: clean, white_box, black_box and, when the
    run attacked the whole model, adaptive_pgd and autoattack.

    Raises:
        DataError: the run has no UDDN results (naming the run).
    """
    det = metrics.get("accuracy_detail", {})
    defense = next((d for d in ("uddn_kt", "uddn") if d in det), None)
    if defense is None:
        raise DataError(f"run '{run}': its metrics have no UDDN or UDDN + KT results to compare")
    cfg = metrics.get("config", {})
    row: dict[str, Any] = {
        "run": run,
        "model": cfg.get("models", {}).get("target", "?"),
        "dataset": str(metrics.get("data", {}).get("source", cfg.get("data", {}).get("source", "?"))),
        "defense": defense,
    }
    for s in SETS + ("adaptive_pgd", "autoattack"):
        row[s] = det[defense].get(s)
        row[f"{s}_na"] = det.get("none", {}).get(s)
    return row


def _pair(row: dict[str, Any], s: str) -> str:
    """``'61.2% (52-70) / 22.3% (15-31), n=24'``: defended / no defense."""
    a, b = row.get(s), row.get(f"{s}_na")
    if not a:
        return "n/a"

    def one(d: Optional[dict[str, Any]]) -> str:
        if not d:
            return "n/a"
        return f"{100 * d['accuracy']:.1f}% ({100 * d['ci95'][0]:.0f}-{100 * d['ci95'][1]:.0f})"

    return f"{one(a)} / {one(b)}, n={a['n']}"


def _single(d: Optional[dict[str, Any]]) -> str:
    if not d:
        return "n/a"
    return f"{100 * d['accuracy']:.1f}% ({100 * d['ci95'][0]:.0f}-{100 * d['ci95'][1]:.0f}, n={d['n']})"


def _paper_pair(p: Optional[dict[str, float]], s: str, na: Optional[dict[str, float]] = None) -> str:
    if not p or s not in p:
        return "-"
    other = p.get(f"{s}_na", (na or {}).get(s))
    return f"{100 * p[s]:.1f}%" + (f" / {100 * other:.1f}%" if other is not None and s != "clean" else "")


def _lines(rows: Sequence[dict[str, Any]], *, key: str, title: str, note: str, paper_of) -> list[str]:
    whole = any(r.get("adaptive_pgd") for r in rows)
    head = (f"| {key} | run | clean | paper | white-box: defended / NA | paper | black-box: defended / NA | paper |"
            + (" whole-model PGD: defended / NA |" if whole else ""))
    out = [title, "", note, "", head, "|---|---|---|---|---|---|---|---|" + ("---|" if whole else "")]
    for r in rows:
        p, na = paper_of(r)
        cells = [_single(r.get("clean")), _paper_pair(p, "clean"),
                 _pair(r, "white_box"), _paper_pair(p, "white_box", na),
                 _pair(r, "black_box"), _paper_pair(p, "black_box", na)]
        if whole:
            cells.append(_pair(r, "adaptive_pgd"))
        label = r["model"] if key == "model" else r["dataset"]
        out.append(f"| `{label}` | `{r['run']}` | " + " | ".join(cells) + " |")
    return out


def table5_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown of Table 5 (one row per target model), the paper's numbers beside ours."""
    return _lines(rows, key="model", title="## Table 5: the defense with other target models",
                  note="Defended = UDDN + KT (the UDDN alone where knowledge transfer was off) in front of that model; "
                       "NA = the same model with no defense. Accuracy (95% Wilson interval); n = test images (clean) "
                       "or rows (attacks). Paper: LFW; its columns read defended / NA.",
                  paper_of=lambda r: (PAPER_TABLE5.get(r["model"]), None))


def table4_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown of Table 4 (one row per dataset), the paper's numbers beside ours."""

    def paper_of(r):
        key = paper_dataset_key(r["dataset"])
        return (PAPER_TABLE4.get(key) if key else None), PAPER_TABLE4_NA

    return _lines(rows, key="dataset", title="## Table 4: the defense on several datasets",
                  note="One row per run, labelled by its data. Defended = UDDN + KT; NA = no defense. The paper reports "
                       "UDDN + KT on LFW, YTF and SFC (FaceNet) and a single NA row (LFW: 22.3% white-box, 69.0% "
                       "black-box), shown after the slash.",
                  paper_of=paper_of)


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text summary for the console: run, model, data, defended/NA accuracies."""
    lines = [f"{'run':<24}{'model':<14}{'clean':>8}{'white (def/NA)':>18}{'black (def/NA)':>18}"]
    for r in rows:
        def p(s):
            a, b = r.get(s), r.get(f"{s}_na")
            return (f"{100 * a['accuracy']:.1f}/" if a else "n/a/") + (f"{100 * b['accuracy']:.1f}" if b else "n/a")

        clean = f"{100 * r['clean']['accuracy']:.1f}" if r.get("clean") else "n/a"
        lines.append(f"{r['run']:<24}{r['model']:<14}{clean:>8}{p('white_box'):>18}{p('black_box'):>18}")
    return "\n".join(lines)


def compare_runs(storage, runs: Sequence[str], *, out: str = "comparison") -> dict[str, Any]:
    """Tables 4 and 5 over finished runs; written to ``<storage>/comparisons/<out>/``.

    Args:
        storage: the :class:`~raydefense.storage.Storage` holding the runs.
        runs: run names (each needs ``<run>/report/metrics.json``).
        out: folder name under ``comparisons/``.

    Returns:
        ``{"rows": [...], "tables": [...], "report": path}``.

    Raises:
        DataError: fewer than one run, a run without metrics, or a run without UDDN results.
    """
    if not runs:
        raise DataError("compare: name at least one run (--runs RUN1 RUN2 ...)")
    from raydefense.pipeline.run import RunLayout

    rows = []
    for name in runs:
        run = storage.child(name)
        if not run.exists(RunLayout.METRICS):
            raise DataError(f"run '{name}': no report/metrics.json at {run.display()}; finish it with "
                            f"jobs/full_pipeline.py --name {name} or evaluate it with jobs/evaluate.py --name {name}")
        rows.append(run_row(run.read_json(RunLayout.METRICS), run=name))
    datasets = {r["dataset"] for r in rows}
    models = {r["model"] for r in rows}
    lines = ["# raydefense: runs compared", "",
             "Runs: " + ", ".join(f"`{r['run']}` ({r['model']} on `{r['dataset']}`)" for r in rows) + ".", ""]
    tables = []
    if len(datasets) > 1:
        lines += table4_lines(rows) + [""]
        tables.append("table4")
    if len(models) > 1 or len(datasets) == 1:
        lines += table5_lines(rows) + [""]
        tables.append("table5")
    if len(datasets) == 1 and len(models) == 1 and len(rows) > 1:
        lines += ["All runs share the same data and target model: the table compares them side by side "
                  "(e.g. seeds or settings).", ""]
    target = storage.child("comparisons", out)
    target.write_json("comparison.json", {"runs": list(runs), "rows": rows, "tables": tables})
    target.write_text("report.md", "\n".join(lines))
    return {"rows": rows, "tables": tables, "report": target.display("report.md")}

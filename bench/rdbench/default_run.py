"""Section 5: the default run's wall time and stage breakdown.

Runs ``python jobs/full_pipeline.py --config <config> --storage <temporary folder> --name
bench-default`` in a subprocess (its own local Ray; nothing else of the suite runs meanwhile),
times it end to end, and reads the stages' seconds from the run's ``report/metrics.json``
(``timings_s``, written by the stage runner: wall seconds of each stage in the driver). One run,
so each figure has n = 1. The run's console output goes to ``bench/out/<name>.log``; the
headline accuracies (UDDN + KT white-box, clean) are kept beside the timings so a faster run can
be checked for unchanged effectiveness.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, Optional

from .results import Row, Section

__all__ = ["run_default", "stage_rows"]


def stage_rows(metrics: dict[str, Any], *, wall_s: float) -> list[Row]:
    """Rows for a finished run's ``metrics.json``: the wall time, then each stage's seconds in run
    order with its share of the stages' sum. KeyError when ``timings_s`` is missing."""
    timings = {k: float(v) for k, v in metrics["timings_s"].items()}
    total = sum(timings.values())
    rows = [Row.of("full run, wall (process start to exit)", [wall_s], "s", stages_sum_s=round(total, 1))]
    for stage, seconds in timings.items():
        rows.append(Row.of(f"stage {stage}", [seconds], "s", share=round(seconds / total, 3) if total else None))
    return rows


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    acc = metrics.get("accuracy", {})
    pick = {}
    for defense in ("none", "uddn", "uddn_kt"):
        for test_set in ("clean", "white_box", "black_box"):
            value = acc.get(defense, {}).get(test_set)
            if isinstance(value, (int, float)):
                pick[f"{defense}.{test_set}"] = round(float(value), 4)
    return pick


def run_default(section: Section, *, repo: str, config: str, log_dir: str, timeout_s: float,
                keep: bool = False, log: Callable[[str], None] = print, python: Optional[str] = None) -> None:
    """Run the pipeline with ``config`` and fill ``section``; RuntimeError (with the log's tail)
    when the run fails or ``metrics.json`` has no ``timings_s``."""
    root = tempfile.mkdtemp(prefix="raydefense-bench-run-")
    name = "bench-default"
    os.makedirs(log_dir, exist_ok=True)
    log_path = os.path.join(log_dir, f"{os.path.splitext(os.path.basename(config))[0]}-run.log")
    cmd = [python or sys.executable, os.path.join(repo, "jobs", "full_pipeline.py"), "--config", config,
           "--storage", root, "--name", name]
    log(f"  running: {' '.join(cmd)}  (log: {log_path})")
    try:
        t0 = time.perf_counter()
        with open(log_path, "w") as f:
            proc = subprocess.run(cmd, cwd=repo, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            with open(log_path) as f:
                tail = "".join(f.readlines()[-5:]).strip()
            raise RuntimeError(f"the run exited with {proc.returncode} after {wall:.0f} s: {tail}")
        with open(os.path.join(root, name, "report", "metrics.json")) as f:
            metrics = json.load(f)
        section.rows.extend(stage_rows(metrics, wall_s=wall))
        section.rows[0].detail["accuracy"] = _headline(metrics)
        section.notes.append(f"{os.path.relpath(config, repo)}: one run, wall seconds of the subprocess and the stage "
                             "runner's timings_s; headline accuracies in the JSON")
        for r in section.rows:
            log(f"  {r.name}: {r.summary.median:.1f} s")
    finally:
        if keep:
            log(f"  run kept at {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

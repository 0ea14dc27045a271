"""What a benchmark section returns, the table the suite prints, and the JSON file it writes.

A section is a list of :class:`Row` (one figure each: a median over repeats with its min and
max, its unit, and whether it is a ratio of interleaved measurements) plus notes (how it was
measured) or the reason it was skipped. ``bench/results/<host>-<date>.json`` holds every row,
the notes, the machine and the command's arguments.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
from dataclasses import dataclass, field
from typing import Any, Optional

from .stats import Summary, summarize

__all__ = ["Row", "Section", "format_table", "machine_info", "results_path", "write_json"]


@dataclass
class Row:
    """One figure. ``ratio`` rows compare two interleaved measurements (``detail`` names them);
    others are absolute (images/s, seconds)."""

    name: str
    summary: Summary
    unit: str
    ratio: bool = False
    detail: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, name: str, values, unit: str, *, ratio: bool = False, **detail: Any) -> "Row":
        return cls(name=name, summary=summarize(values), unit=unit, ratio=ratio, detail=detail)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "unit": self.unit, "ratio": self.ratio, **self.summary.to_dict(),
                "detail": self.detail}


@dataclass
class Section:
    """A section's rows, how they were measured (``notes``), and ``skipped`` (why not run) or
    ``error`` (what failed)."""

    key: str
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: Optional[str] = None
    error: Optional[str] = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "rows": [r.to_dict() for r in self.rows], "notes": self.notes,
                "skipped": self.skipped, "error": self.error, "seconds": round(self.seconds, 1)}


def _num(x: float) -> str:
    """A figure with three significant digits (more before the point when it is large)."""
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.3g}" if abs(x) >= 0.01 else f"{x:.2e}"


def format_table(sections: list[Section]) -> str:
    """The printed table: per section its ratios first, then absolute figures, each as
    ``median [min, max] unit (n)``; a skipped or failed section says why in one line."""
    lines: list[str] = []
    width = max([len(r.name) for s in sections for r in s.rows] + [40])
    for s in sections:
        lines.append(f"{s.key}. {s.title}" + (f"  ({s.seconds:.0f} s)" if s.seconds else ""))
        if s.skipped:
            lines.append(f"   skipped: {s.skipped}")
        if s.error:
            lines.append(f"   FAILED: {s.error}")
        for r in sorted(s.rows, key=lambda r: not r.ratio):
            m = r.summary
            unit = "x" if r.ratio and r.unit == "x" else f" {r.unit}"
            lines.append(f"   {r.name:<{width}}  {_num(m.median)}{unit}  [{_num(m.min)}, {_num(m.max)}]  (n={m.n})")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def machine_info() -> dict[str, Any]:
    """Host, CPU count, Python / torch / Ray versions, torch threads and the GPU if any."""
    import torch

    info: dict[str, Any] = {
        "host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:  # pragma: no cover  (a project dependency)
        info["ray"] = None
    try:
        with open("/proc/loadavg") as f:
            info["loadavg_at_start"] = f.read().split()[:3]
    except OSError:
        pass
    return info


def results_path(directory: str, *, host: str, when: _dt.datetime, quick: bool) -> str:
    """``<directory>/<host>-<YYYY-MM-DD>.json`` (``-quick`` before ``.json`` for a --quick run,
    so that a quick check never replaces the day's full results)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in host) or "host"
    return os.path.join(directory, f"{safe}-{when:%Y-%m-%d}{'-quick' if quick else ''}.json")


def write_json(path: str, *, sections: list[Section], machine: dict[str, Any], args: dict[str, Any],
               started: _dt.datetime, seconds: float) -> None:
    """Write the results file atomically (a temporary file moved into place)."""
    doc = {
        "started_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "seconds": round(seconds, 1),
        "machine": machine,
        "args": args,
        "sections": {s.key: s.to_dict() for s in sections},
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)

"""Report: metrics.json, report.md and the figures of a finished run; tables across runs."""
from raydefense.report.compare import compare_runs, run_row
from raydefense.report.stats import proportion, wilson
from raydefense.report.writer import render_markdown, rewrite_report, write_report

__all__ = ["write_report", "rewrite_report", "render_markdown", "compare_runs", "run_row", "wilson", "proportion"]

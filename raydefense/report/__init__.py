"""Report: metrics.json, report.md and the figures of a finished run."""
from raydefense.report.writer import write_report

__all__ = ["write_report"]

"""The run report: ``report.md`` and a self-contained ``report.html`` with figures."""

from __future__ import annotations

from achilles.report.build import ReportFiles, write_report

__all__ = ["ReportFiles", "write_report"]

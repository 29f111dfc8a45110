"""The run report: ``report.md`` and a self-contained ``report.html`` with figures.

Sections are the ordered list ``build.SECTIONS``; :func:`register_section` adds one.
"""

from __future__ import annotations

from achilles.report.build import ReportContext, ReportFiles, register_section, write_report

__all__ = ["ReportContext", "ReportFiles", "register_section", "write_report"]

"""``write_report``: ``RUN_DIR/report.md`` and a self-contained ``RUN_DIR/report.html``.

The report renders the results it is given: the run's ``ranking.json`` and
``identification.json``, the analysis (computed before it, in the command, by
:func:`~achilles.analysis.run.analyze_for_report`; read from ``analysis.json`` when not
given), and ``comparison.json`` / ``downstream.json`` / ``heldout.json`` /
``mechanism.json`` of the same run when another command wrote them. Every number is
rendered with :func:`~achilles.report.document.fmt` from those files, so the report and
the JSON agree at the printed precision.

It reads finding first: a summary paragraph, then the evidence, then the provenance. The
sections are the ordered list :data:`SECTIONS` of builders (:mod:`achilles.report.sections`),
each a function of a :class:`ReportContext` that returns its blocks (or ``None`` to leave
the section out); :func:`register_section` adds one, before the provenance by default.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from achilles.analysis.run import ANALYSIS_FILE, analyze_for_report, check_same_run, load_run
from achilles.model.names import model_name as display_name
from achilles.report.document import Block, to_html, to_markdown
from achilles.report.sections import (  # noqa: F401 - ReportContext, SectionBuilder re-exported
    ReportContext,
    SectionBuilder,
    activations_section,
    comparison_section,
    compression_section_of,
    controls_section,
    downstream_section,
    locations_section,
    mechanism_section,
    phase_section,
    provenance_section,
    sets_section,
    summary_section,
    weights_section,
)
from achilles.results.envelope import run_id_of
from achilles.results.files import atomic_write

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportFiles:
    """Paths written by :func:`write_report`."""

    markdown: Path
    html: Path
    analysis: Path
    figures: list[Path]


SECTIONS: list[tuple[str, SectionBuilder]] = [
    ("summary", summary_section),
    ("sets", sets_section),
    ("mechanism", mechanism_section),
    ("locations", locations_section),
    ("phase", phase_section),
    ("activations", activations_section),
    ("weights", weights_section),
    ("controls", controls_section),
    ("comparison", comparison_section),
    ("downstream", downstream_section),
    ("compression", compression_section_of),
    ("provenance", provenance_section),
]
"""The report's sections in order: ``(name, builder)``. The summary stays first and the
provenance last; add a section with :func:`register_section`."""


def register_section(name: str, builder: SectionBuilder, *, before: str = "provenance") -> None:
    """Add (or replace) section ``name``, placed before section ``before``.

    ``builder(ctx)`` returns the section's blocks, starting with its :class:`Heading`, or
    ``None`` when the run has nothing for it (e.g. a result file that is absent). A figure it
    draws goes under ``ctx.figures_dir`` and into ``ctx.figures``.
    """
    SECTIONS[:] = [(n, b) for n, b in SECTIONS if n != name]
    names = [n for n, _ in SECTIONS]
    at = names.index(before) if before in names else len(SECTIONS)
    SECTIONS.insert(at, (name, builder))


def write_report(
    run_dir: str | Path,
    analysis: Mapping[str, Any] | None = None,
) -> ReportFiles:
    """Write ``RUN_DIR/report.md`` and ``report.html`` from the run's results.

    ``analysis``: what :func:`~achilles.analysis.run.analyze_for_report` returned (the
    command runs it first, with the model when it has one); default: the model-free
    analysis, with the model parts of an ``analysis.json`` of this same run kept.
    """
    run_dir = Path(run_dir)
    check_run_inputs(run_dir)
    ranking, ident = load_run(run_dir)
    check_same_run(ranking, ident, run_dir)
    if analysis is None:
        analysis = analyze_for_report(run_dir, results=(ranking, ident))
    elif run_id_of(dict(analysis)) != ident.run_id:
        raise ValueError("the analysis given is of another run than the folder's identification")
    ranking_d, ident_d = ranking.to_dict(), ident.to_dict()
    name = display_name(ident.config.get("model", {}).get("model"))
    ctx = ReportContext(run_dir, analysis, ranking_d, ident_d, name, analysis.get("tokens"),
                        run_id=ident.run_id)
    blocks: list[Block] = []
    for section, builder in SECTIONS:
        part = builder(ctx)
        if part:
            blocks += part
        logger.debug("report section %s: %d block(s)", section, len(part or ()))

    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    atomic_write(md_path, to_markdown(blocks, run_dir))
    atomic_write(html_path, to_html(blocks, f"achilles report: {name}"))
    logger.info("report written: %s, %s", md_path, html_path)
    return ReportFiles(md_path, html_path, run_dir / ANALYSIS_FILE, list(ctx.figures))


def check_run_inputs(run_dir: Path) -> None:
    """Refuse a damaged ranking / identification / mechanism / compression file before
    anything is written (each is read with the checks of its typed loader)."""
    from achilles.method.identify import Identification
    from achilles.method.ranking import Ranking
    from achilles.report.compression import read_compression
    from achilles.report.mechanism import read_mechanism

    for name, load in (("ranking.json", Ranking.load), ("identification.json", Identification.load)):
        if (run_dir / name).exists():
            load(str(run_dir / name))
    read_mechanism(run_dir)
    read_compression(run_dir)

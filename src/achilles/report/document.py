"""A tiny document model rendered to both Markdown and self-contained HTML.

The report is built once as a list of blocks (:class:`Heading`, :class:`Para`,
:class:`Table`, :class:`Figure`) so the Markdown and HTML versions carry the same numbers.
HTML embeds figures as base64 PNG; Markdown links them by relative path.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def fmt(x: Any, digits: int = 4) -> str:
    """A number as shown in the report: ``digits`` significant digits; ``-`` for ``None``."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return f"{x:.{digits}g}"
    if isinstance(x, str) and x in ("nan", "inf", "-inf"):
        return x
    return str(x)


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Para:
    text: str
    code: bool = False


@dataclass(frozen=True)
class Table:
    header: Sequence[str]
    rows: Sequence[Sequence[Any]]


@dataclass(frozen=True)
class Figure:
    path: Path
    caption: str


@dataclass(frozen=True)
class Raw:
    """Pre-rendered content: ``markdown`` for report.md, ``html`` (trusted, escaped by its
    maker) for report.html; the highlighted text of the Mechanism section uses it."""

    markdown: str
    html: str


Block = Heading | Para | Table | Figure | Raw

TABLE_ROWS = 20
"""Rows a long table shows before its "… N more" row."""


def capped(header: Sequence[str], rows: Sequence[Sequence[Any]], *, limit: int = TABLE_ROWS,
           more: str = "") -> Table:
    """A :class:`Table` of at most ``limit`` rows, then one "… N more" row (``more`` says where)."""
    rows = list(rows)
    if len(rows) <= limit:
        return Table(header, rows)
    extra = f"… {len(rows) - limit} more" + (f" {more}" if more else "")
    return Table(header, [*rows[:limit], [extra, *([""] * (len(header) - 1))]])


def _md_cell(x: Any) -> str:
    return fmt(x).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: Sequence[Block], base: Path) -> str:
    """Markdown text; figure paths relative to ``base`` (the report's folder)."""
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}\n")
        elif isinstance(b, Para):
            out.append(f"```\n{b.text}\n```\n" if b.code else f"{b.text}\n")
        elif isinstance(b, Table):
            out.append("| " + " | ".join(_md_cell(h) for h in b.header) + " |")
            out.append("|" + "---|" * len(b.header))
            out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in b.rows]
            out.append("")
        elif isinstance(b, Figure):
            rel = b.path.relative_to(base) if b.path.is_relative_to(base) else b.path
            out.append(f"![{b.caption}]({rel.as_posix()})\n\n*{b.caption}*\n")
        elif isinstance(b, Raw):
            out.append(b.markdown)
    return "\n".join(out)


CSS = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}th{background:#f3f3f3}
.scroll{overflow-x:auto;max-width:100%}
pre{background:#f6f6f6;padding:.6em;white-space:pre-wrap}img{max-width:100%}
figcaption{color:#555;font-size:.9em;margin-bottom:1.5em}"""


def to_html(blocks: Sequence[Block], title: str) -> str:
    """A self-contained HTML page (figures inlined as base64 PNG)."""
    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
           f"<style>{CSS}</style></head><body>"]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{e(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            out.append(f"<pre>{e(b.text)}</pre>" if b.code else f"<p>{e(b.text)}</p>")
        elif isinstance(b, Table):
            out.append("<div class='scroll'><table><tr>"
                       + "".join(f"<th>{e(h)}</th>" for h in b.header) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{e(fmt(c))}</td>" for c in r) + "</tr>" for r in b.rows]
            out.append("</table></div>")
        elif isinstance(b, Figure):
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            out.append(f"<figure><img alt='{e(b.caption)}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{e(b.caption)}</figcaption></figure>")
        elif isinstance(b, Raw):
            out.append(b.html)
    out.append("</body></html>")
    return "\n".join(out)

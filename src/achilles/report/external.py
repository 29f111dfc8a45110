"""The report's sections for results other commands write into a run folder:
``comparison.json`` (``achilles compare``), ``downstream.json``, and any other ``NAME.json``
/ ``NAME.png`` pair, rendered only when they are of the report's run
(:meth:`~achilles.report.sections.ReportContext.read`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from achilles.report.document import Block, Figure, Heading, Para, Table, capped, fmt

if TYPE_CHECKING:
    from achilles.report.sections import ReportContext


def _flatten(d: Any, prefix: str = "", depth: int = 3) -> list[tuple[str, Any]]:
    if isinstance(d, Mapping) and depth > 0:
        out: list[tuple[str, Any]] = []
        for k, v in d.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k), depth - 1)
        return out
    if isinstance(d, list) and d and all(isinstance(x, (int, float, str)) for x in d):
        return [(prefix, ", ".join(fmt(x) for x in d))]
    return [(prefix, d if isinstance(d, (int, float, str, bool)) or d is None else json.dumps(d)[:200])]


def comparison_blocks(ctx: ReportContext) -> list[Block]:
    """Perplexity per level (rows) and ranking method (columns) from ``comparison.json``."""
    data = ctx.read("comparison.json")
    png = ctx.run_dir / "comparison.png"
    if data is None or not isinstance(data.get("methods"), Mapping):
        return _external(ctx, "comparison", "Baseline comparison", ("methods",))
    methods = {m: {p["n"]: p for p in pts} for m, pts in data["methods"].items()}
    rand = {p["n"]: p for p in (data.get("random") or {}).get("levels", [])}
    runs = (data.get("random") or {}).get("runs")
    levels = sorted({n for pts in methods.values() for n in pts} | set(rand))
    header = ["n masked", *methods]
    if rand:
        header.append(f"random (mean ± sd, {runs} runs)")
    rows = []
    for n in levels:
        row: list[Any] = [n, *(fmt(methods[m][n]["ppl"]) if n in methods[m] else "-" for m in methods)]
        if rand:
            r = rand.get(n)
            row.append(f"{fmt(r['ppl_mean'])} ± {fmt(r['ppl_sd'])}" if r else "-")
        rows.append(row)
    base = (data.get("baseline") or {}).get("ppl")
    out: list[Block] = [
        Heading("Baseline comparison"),
        Para(f"Perplexity on the evaluation data with the top-n units of each ranking masked "
             f"(from comparison.json; unmasked: {fmt(base)})."),
        Table(header, rows),
    ]
    for skip in data.get("skipped") or []:
        out.append(Para(f"skipped: {skip}"))
    if png.is_file():
        out.append(Figure(png, "Perplexity against the number of masked units (comparison.png)"))
    return out


def downstream_blocks(ctx: ReportContext) -> list[Block]:
    """One row per (level, task) with the task's metrics from ``downstream.json``."""
    data = ctx.read("downstream.json")
    if data is None or not isinstance(data.get("levels"), list):
        return _external(ctx, "downstream", "Downstream results", ("results", "tasks"))
    rows = []
    for lv in data["levels"]:
        for task, res in (lv.get("results") or {}).items():
            metrics = ", ".join(
                f"{k.split(',')[0]}={fmt(v)}" for k, v in res.items()
                if "," in k and "stderr" not in k and isinstance(v, (int, float))
            )
            rows.append([lv.get("level"), task, metrics])
    return [Heading("Downstream results"), Para("lm-evaluation-harness, from downstream.json."),
            capped(["units masked", "task", "metrics"], rows, limit=40, more="in downstream.json")]


def _external(ctx: ReportContext, name: str, title: str, keys: tuple[str, ...]) -> list[Block]:
    path = ctx.run_dir / f"{name}.json"
    data = ctx.read(f"{name}.json")
    png = ctx.run_dir / f"{name}.png"
    if path.is_file() and data is None:
        return []  # another run's (or unreadable): neither its numbers nor its figure
    if data is None and not png.is_file():
        return []
    out: list[Block] = [Heading(title)]
    if data is not None:
        body = next((data[k] for k in keys if isinstance(data.get(k), Mapping)), None)
        if body is None:
            body = {k: v for k, v in data.items() if k not in ("config", "env", "schema_version", "kind", "run_id")}
        rows = [[k, v] for k, v in _flatten(body)]
        out.append(Para(f"From {name}.json."))
        out.append(capped(["key", "value"], rows, limit=40, more=f"in {name}.json"))
    if png.is_file():
        out.append(Figure(png, f"{title} ({name}.png)"))
    return out

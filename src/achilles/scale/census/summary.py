"""The census summary: one row per model as CSV, JSON and markdown, plus cross-model figures."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from achilles.results.envelope import envelope, new_run_id
from achilles.results.files import atomic_write, write_json
from achilles.results.provenance import environment

CSV_COLUMNS: tuple[str, ...] = (
    "name", "model", "status", "params", "layers", "pool_units", "tokens", "n_units_total",
    "epsilon", "n_star", "delta_critical", "n_minimal", "delta_minimal", "ratio",
    "critical_layers", "components", "minimal_set", "wall_s", "error",
)  # fmt: skip


@dataclass(frozen=True)
class SummaryFiles:
    csv: Path
    json: Path
    markdown: Path
    depth_png: Path
    scale_png: Path


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return " ".join(f"{k}:{v}" for k, v in value.items())
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value)


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        w.writerow([_cell(r.get(c)) for c in CSV_COLUMNS])
    return buf.getvalue()


def _num(x: Any, fmt: str = ".3f") -> str:
    if x is None:
        return "-"
    return format(x, fmt) if math.isfinite(x) else str(x)


def to_markdown(rows: list[dict[str, Any]], title: str = "Census") -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    lines = [
        f"# {title}",
        "",
        f"{len(ok)} of {len(rows)} models finished. Δ = log10(PPL masked / PPL clean); "
        "|N| = pool units per token × tokens (the study's count); ratio = n*/|N|.",
        "",
        "| model | params | layers | \\|N\\| | n* | Δ(n*) | minimal set | Δ(minimal) | the set's layers "
        "| components | n*/\\|N\\| | wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | **{r['status']}**: {r.get('error') or ''} |" + " |" * 10)
            continue
        units = r["minimal_set"]
        shown = ", ".join(units[:6]) + (f" … (+{len(units) - 6})" if len(units) > 6 else "")
        lines.append(
            f"| [{r['name']}](runs/{r['name']}/{r.get('report') or ''}) | {r['params'] / 1e6:.3g}M | {r['layers']} | "
            f"{r['n_units_total']:,} | {r['n_star'] if r['n_star'] is not None else 'none'} | "
            f"{_num(r['delta_critical'])} | {shown or '-'} | {_num(r['delta_minimal'])} | "
            f"{', '.join(map(str, r['critical_layers'])) or '-'} | {_cell(r['components']) or '-'} | "
            f"{_num(r['ratio'], '.3g')} | {r['wall_s']:.1f} s |"
        )
    lines += ["", "![relative depth](figures/depth.png)", "", "![scale](figures/scale.png)", ""]
    return "\n".join(lines)


def write_summary(
    out_dir: str | Path, rows: list[dict[str, Any]], config: dict[str, Any]
) -> SummaryFiles:
    """Write ``summary.{csv,json,md}`` and ``figures/{depth,scale}.png`` into ``out_dir``."""
    from achilles.plots.census import plot_depth, plot_scale

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = SummaryFiles(
        out / "summary.csv", out / "summary.json", out / "summary.md",
        out / "figures" / "depth.png", out / "figures" / "scale.png",
    )
    write_json(files.json, {
        **envelope("census", config=config, env=environment(), run_id=new_run_id()),
        "complete": all(r["status"] == "ok" for r in rows),
        "rows": rows,
    })
    atomic_write(files.csv, to_csv(rows))
    atomic_write(files.markdown, to_markdown(rows))
    plot_depth(rows, files.depth_png)
    plot_scale(rows, files.scale_png)
    return files

"""Report section for ``compression.json`` (written by ``achilles compress``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from achilles.report.document import Block, Figure, Heading, Para, Table, fmt

COMPRESSION_FILE = "compression.json"
COMPRESSION_FIGURE = "compression.png"


def compression_rows(data: dict[str, Any]) -> list[list[Any]]:
    """One row per method: Δ log10 perplexity vs the original, whole / critical / random."""
    base = float(data["baseline"]["log10_ppl"])
    rows = []
    for m in data["methods"].values():
        sd = m.get("random_log10_ppl_sd")
        rand = f"{float(m['random_log10_ppl_mean']) - base:+.3g}" + (f" ± {fmt(sd, 2)}" if sd is not None else "")
        rows.append([m["method"], f"{float(m['whole']['log10_ppl']) - base:+.3g}",
                     f"{float(m['critical']['log10_ppl']) - base:+.3g}", rand,
                     m["whole"]["fraction_changed"]])
    return rows


COLUMNS = ["method", "Δ whole model", "Δ critical protected", "Δ random protected (mean ± sd)",
           "weights changed"]


def compression_section(run_dir: str | Path) -> list[Block]:
    """Heading, table and figure for ``RUN_DIR/compression.json``; nothing if it is absent."""
    run_dir = Path(run_dir)
    path = run_dir / COMPRESSION_FILE
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return [Heading("Compression"), Para(f"{COMPRESSION_FILE} could not be read.")]
    if data.get("kind") != "compression":
        return []
    prot = data.get("protected", {})
    base = data.get("baseline", {})
    seeds = len(next(iter(data["methods"].values()), {}).get("random", []))
    out: list[Block] = [
        Heading("Compression"),
        Para(f"Δ = change in log10 perplexity on the evaluation data against the original "
             f"(log10 perplexity {fmt(base.get('log10_ppl'))}, perplexity {fmt(base.get('ppl'))}; "
             f"positive = worse) after each compression of the decoder's weight "
             f"matrices: applied to everything, with the weights of the {fmt(prot.get('n_units'))} "
             f"critical unit(s) protected ({fmt(prot.get('n_weights'))} weights kept in the "
             f"source precision, never pruned), and with as many random units of the same kinds "
             f"protected ({seeds} seeds). From {COMPRESSION_FILE}."),
        Table(COLUMNS, compression_rows(data)),
    ]
    if (run_dir / COMPRESSION_FIGURE).is_file():
        out.append(Figure(run_dir / COMPRESSION_FIGURE,
                          "Δ log10 perplexity per method: whole, critical protected, random protected (compression.png)"))
    return out

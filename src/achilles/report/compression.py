"""Report section for ``compression.json`` (written by ``achilles compress``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from achilles.errors import AchillesError
from achilles.report.document import Block, Figure, Heading, Para, Table, fmt
from achilles.results.schema import read_json, require_fields

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
    data = read_compression(run_dir)
    if data is None:
        return []
    prot = data.get("protected", {})
    base = data.get("baseline", {})
    first_method: dict[str, Any] = next(iter(data["methods"].values()), {})
    seeds = len(first_method.get("random", []))
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


def read_compression(run_dir: str | Path) -> dict[str, Any] | None:
    """``RUN_DIR/compression.json`` checked (one error line naming the fix), or ``None`` without it."""
    path = Path(run_dir) / COMPRESSION_FILE
    if not path.is_file():
        return None
    try:
        data = read_json(path, kind="compression")
        require_fields(data, path, {"baseline": dict, "protected": dict, "methods": dict})
        require_fields(data["baseline"], path, {"log10_ppl": float})
        for m in data["methods"].values():
            if not isinstance(m, dict):
                raise AchillesError(f"{path}: every entry of 'methods' must be an object")
            require_fields(m, path, {"method": str, "whole": dict, "critical": dict,
                                     "random_log10_ppl_mean": float})
            for part in ("whole", "critical"):
                require_fields(m[part], path, {"log10_ppl": float})
            require_fields(m["whole"], path, {"fraction_changed": float})
    except AchillesError as e:
        raise AchillesError(f"{e}: run `achilles compress --out-dir {run_dir}` again, or remove it") from None
    return data

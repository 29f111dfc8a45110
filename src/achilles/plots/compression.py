"""Compression figure: change in log10 perplexity per method, whole / critical protected / random protected.

Input is a ``compression.json`` payload; nothing is computed here. Random protection is
drawn as mean ± sd with every seed as a dot; a non-finite perplexity is a marked bar at the
top of the axis, never left out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from achilles.plots import save_figure  # noqa: E402

_SERIES = (("whole", "whole model", "#7f7f7f"),
           ("critical", "critical units protected", "#d62728"),
           ("random", "random units protected", "#1f77b4"))


def plot_compression(data: Mapping[str, Any], path: str | Path, *, title: str | None = None) -> Path:
    """Grouped bars of the change in log10 perplexity against the original, per method."""
    methods = list(data["methods"].values())
    base = float(data["baseline"]["log10_ppl"])
    vals: dict[str, list[float]] = {k: [] for k, _, _ in _SERIES}
    sds: list[float | None] = []
    dots: list[list[float]] = []
    for m in methods:
        vals["whole"].append(float(m["whole"]["log10_ppl"]) - base)
        vals["critical"].append(float(m["critical"]["log10_ppl"]) - base)
        vals["random"].append(float(m["random_log10_ppl_mean"]) - base)
        sds.append(m.get("random_log10_ppl_sd"))
        dots.append([float(r["log10_ppl"]) - base for r in m["random"]])
    finite = [v for vs in vals.values() for v in vs if math.isfinite(v)] + [0.0]
    span = (max(finite) - min(finite)) or 1e-3
    top = max(finite) + 0.3 * span
    fig, ax = plt.subplots(figsize=(max(6.5, 1.5 * len(methods) + 2.5), 4.8))
    width = 0.26
    for j, (key, label, color) in enumerate(_SERIES):
        xs = [i + (j - 1) * width for i in range(len(methods))]
        heights = [v if math.isfinite(v) else top for v in vals[key]]
        bars = ax.bar(xs, heights, width, color=color, label=label)
        for b, v in zip(bars, vals[key], strict=True):
            x = b.get_x() + width / 2
            if not math.isfinite(v):  # drawn to the top, hatched, labelled inside: never left out
                b.set_hatch("//")
                b.set_alpha(0.5)
                ax.annotate("non-finite", (x, top), ha="center", va="top", fontsize=7.5, rotation=90,
                            bbox={"fc": "white", "ec": "none", "pad": 1},
                            xytext=(0, -4), textcoords="offset points")
                continue
            y = b.get_height()
            ax.annotate(f"{v:+.3g}", (x, y), ha="center", va="bottom" if y >= 0 else "top",
                        fontsize=7.5, rotation=90,
                        xytext=(0, (2 if y >= 0 else -2) * (4 if key == "random" else 1)),
                        textcoords="offset points")
        if key == "random":
            for x, v, sd, ds in zip(xs, vals[key], sds, dots, strict=True):
                if sd is not None and math.isfinite(v):
                    ax.errorbar(x, v, yerr=sd, color="black", capsize=4, lw=1.2)
                ax.plot([x] * len(ds), [d if math.isfinite(d) else top for d in ds], "k.", ms=4, alpha=0.7)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(methods)), [m["method"] for m in methods])
    ax.set_ylabel("Δ log10 perplexity vs the original")
    ax.set_ylim(min(min(finite) - 0.3 * span, -0.05 * span), top + 0.05 * span)
    n = data.get("protected", {}).get("n_units")
    ax.set_title(title or f"compression with {n} critical unit(s) protected vs {n} random unit(s)",
                 fontsize=11)
    ax.text(0.99, 0.98, f"original: log10 PPL {base:.4g}", transform=ax.transAxes, ha="right",
            va="top", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)

"""Cross-model census figures: where the critical units sit (Figure 2) and how n*, Δ scale.

Input is the census rows (``summary.json``); nothing is computed here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from achilles.model.names import format_count  # noqa: E402
from achilles.plots import save_figure  # noqa: E402
from achilles.plots.layers import KIND_COLORS  # noqa: E402


def _ok(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted((r for r in rows if r["status"] == "ok"), key=lambda r: (r["params"], r["name"]))


def plot_depth(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """One line per model (by size): its critical units at relative depth 0 (first) to 1 (last)."""
    ok = _ok(rows)
    fig, ax = plt.subplots(figsize=(8.5, max(2.8, 0.42 * len(ok) + 1.6)))
    seen: set[str] = set()
    for y, r in enumerate(ok):
        depths, kinds = r["relative_depths"], r["unit_components"]
        if not depths:
            ax.text(0.5, y, "no critical set", ha="center", va="center", fontsize=8, color="gray")
        # one marker per (layer, component): its area grows with the units it holds
        counts: dict[tuple[float, str], int] = {}
        for d, k in zip(depths, kinds, strict=True):
            counts[(d, k)] = counts.get((d, k), 0) + 1
        kinds_at: dict[float, list[str]] = {}
        for d, k in counts:
            kinds_at.setdefault(d, []).append(k)
        for (d, k), c in counts.items():
            j = kinds_at[d].index(k)
            dy = 0.22 * (j - (len(kinds_at[d]) - 1) / 2)
            ax.scatter(d, y + dy, s=min(300.0, 36 * math.sqrt(c)), zorder=3,
                       color=KIND_COLORS.get(k, "black"), edgecolor="black", linewidth=0.4)
            if c > 1:
                ax.annotate(f"×{c}", (d, y + dy), fontsize=7, xytext=(6, 4),
                            textcoords="offset points")
            seen.add(k)
    ax.set_yticks(range(len(ok)))
    ax.set_yticklabels([f"{r['name']} ({format_count(r['params'])})" for r in ok], fontsize=8)
    ax.set_ylim(-0.8, len(ok) - 0.2)
    ax.set_xlim(-0.05, 1.05)
    ax.set_xlabel("relative depth of the layer (0 = first, 1 = last)")
    ax.grid(axis="x", color="0.9")
    ax.set_title("Critical units per model (minimal set; ×n: units in one layer and component)",
                 fontsize=10)
    if seen:
        handles = [Line2D([], [], marker="o", linestyle="", markersize=6, markeredgecolor="black",
                          markeredgewidth=0.4, color=KIND_COLORS.get(k, "black"), label=k)
                   for k in sorted(seen)]
        ax.legend(handles=handles, fontsize=8, title="component", title_fontsize=8,
                  loc="upper left", bbox_to_anchor=(1.01, 1.0))
    missing = [r["name"] for r in rows if r["status"] != "ok"]
    if missing:
        fig.text(0.01, 0.01, f"not finished: {', '.join(missing)}", fontsize=7, color="firebrick")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_scale(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """n* and Δ(n*) against model size (log axis); a non-finite Δ is drawn at the top as ∞."""
    ok = _ok(rows)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    found = [r for r in ok if r["n_star"] is not None]
    none = [r for r in ok if r["n_star"] is None]
    for r in found:
        a1.scatter(r["params"], r["n_star"], color="#d62728", zorder=3)
        a1.annotate(r["name"], (r["params"], r["n_star"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    for r in none:  # honest: a model without a set is shown, at 0, hollow
        a1.scatter(r["params"], 0, facecolor="none", edgecolor="0.5", zorder=3)
        a1.annotate(f"{r['name']} (none)", (r["params"], 0), fontsize=7, color="0.4",
                    xytext=(3, 3), textcoords="offset points")
    a1.set_ylim(bottom=-0.5)
    a1.yaxis.get_major_locator().set_params(integer=True)
    a1.set_ylabel("n* (critical set size; 0 = none found)")
    a1.set_title("n* vs model size" + (f" ({len(none)} without a set)" if none else ""), fontsize=10)
    finite = [r["delta_critical"] for r in found if math.isfinite(r["delta_critical"])]
    top = (max(finite) * 1.15) if finite else 1.0
    for r in found:
        d = r["delta_critical"]
        y = d if math.isfinite(d) else top
        a2.scatter(r["params"], y, color="#1f77b4", marker="o" if math.isfinite(d) else "^", zorder=3)
        a2.annotate(r["name"] + ("" if math.isfinite(d) else " (Δ = ∞)"), (r["params"], y),
                    fontsize=7, xytext=(3, 3), textcoords="offset points")
    eps = {r["epsilon"] for r in ok}
    for e in eps:
        a2.axhline(e, color="0.6", linestyle="--", linewidth=0.8)
    a2.set_ylabel("Δ(n*) = log10(PPL masked / PPL clean)")
    a2.set_title("Δ at n* vs model size" + (" (dashed: ε)" if eps else ""), fontsize=10)
    for ax in (a1, a2):
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.grid(color="0.92")
        if not found:
            ax.text(0.5, 0.5, "no model has a critical set", transform=ax.transAxes,
                    ha="center", va="center", color="gray")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)

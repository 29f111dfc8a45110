"""Layer-distribution figure: units per layer, stacked by component kind (Figs 2/5).

Input is the ``locations`` section of ``analysis.json``
(:func:`achilles.analysis.locations.locations`); nothing is computed here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from achilles.plots import save_figure

KIND_COLORS = {
    "mlp.down": "#d62728", "attn.o": "#1f77b4", "mlp.up": "#ff7f0e", "mlp.gate": "#2ca02c",
    "mlp.act": "#9467bd", "mlp.gate_up": "#8c564b", "attn.q": "#17becf", "attn.k": "#bcbd22",
    "attn.v": "#7f7f7f", "attn.qkv": "#e377c2", "norm.attn": "#aec7e8", "norm.mlp": "#ffbb78",
    "norm.attn_out": "#98df8a", "norm.mlp_out": "#c5b0d5",
}


def _panel(ax: Any, dist: dict[str, Any], n_layers: int) -> None:
    bottom = [0] * n_layers
    xs = list(range(n_layers))
    for kind, counts in dist["counts"].items():
        ax.bar(xs, counts, bottom=bottom, label=kind, color=KIND_COLORS.get(kind), width=0.85)
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    shares = []
    if dist.get("down_share") is not None:
        shares.append(f"down_proj {dist['down_share']:.0%}")
    if dist.get("outer_share") is not None:
        shares.append(f"outer layers {dist['outer_share']:.0%}")
    title = f"{dist['label']} ({dist['n_units']} unit{'' if dist['n_units'] == 1 else 's'})"
    ax.set_title(title + ("\n" + ", ".join(shares) if shares else ""), fontsize=10)
    ax.set_ylabel("units")
    if not dist["n_units"]:
        ax.text(0.5, 0.5, "empty", transform=ax.transAxes, ha="center", va="center", color="gray")
    elif dist["counts"]:
        ax.legend(fontsize=8, title="component", title_fontsize=8, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0))
    ax.yaxis.get_major_locator().set_params(integer=True)


def plot_layers(loc: dict[str, Any], path: str | Path, *, title: str | None = None) -> Path:
    """Two stacked-bar panels (critical set, top-N ranking) of units per layer; saves a PNG."""
    n_layers = int(loc["n_layers"])
    fig, axes = plt.subplots(
        2, 1, figsize=(max(7.5, min(15.0, 0.25 * n_layers + 5.5)), 6.5), sharex=True
    )
    _panel(axes[0], loc["critical"], n_layers)
    _panel(axes[1], loc["ranking"], n_layers)
    first, last = loc.get("outer_layers", {}).get("first", []), loc.get("outer_layers", {}).get("last", [])
    for ax in axes:
        for group in (first, last):
            if group and len(first) + len(last) < n_layers:
                ax.axvspan(min(group) - 0.5, max(group) + 0.5, color="0.9", zorder=0)
    axes[1].set_xlabel("layer index (shaded: outer quarters)")
    axes[1].set_xlim(-0.5, n_layers - 0.5)
    if n_layers <= 40:
        axes[1].set_xticks(range(n_layers))
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)

"""Mechanism figures from ``mechanism.json``: residual magnitudes, sink heatmaps, patching bars.

Input is the dict of :class:`achilles.explain.Mechanism`; nothing is computed here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from achilles.plots import save_figure  # noqa: E402

FIGURES = ("mechanism_residual.png", "mechanism_sinks.png", "mechanism_patching.png",
           "mechanism_channels.png")


def plot_residual(mech: dict[str, Any], path: str | Path) -> Path:
    """Per layer, the top-3 |h| at the sink position, the top |h| elsewhere and the median
    (log scale), clean (solid) vs masked (dashed): the layout of Sun et al.'s magnitude plots."""
    prof = mech["residual_profile"]
    xs = prof["layers"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for run, style in (("clean", "-"), ("masked", "--")):
        d = prof[run]
        top = np.array(d["sink_top"])
        for k, color in zip(range(top.shape[1]), ("#d62728", "#ff7f0e", "#bcbd22"), strict=False):
            ax.plot(xs, top[:, k], style, color=color, marker="o", ms=3,
                    label=f"top-{k + 1} at position {prof['position']} ({run})")
        ax.plot(xs, np.array(d["rest_top"])[:, 0], style, color="#1f77b4", marker="s", ms=3,
                label=f"top-1 at other positions ({run})")
        ax.plot(xs, d["median"], style, color="0.5", label=f"median ({run})")
    ax.set_yscale("log")
    ax.set_xlabel("layer (-1 = embeddings; block outputs after)")
    ax.set_ylabel("|h| (residual stream)")
    ax.set_xticks(xs if len(xs) <= 16 else xs[:: max(2, len(xs) // 15)])
    ax.set_title("Residual-stream magnitudes: clean (solid) vs set masked (dashed)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_sinks(mech: dict[str, Any], path: str | Path) -> Path:
    """Layers × heads heatmaps of attention mass on the sink position: clean, masked, masked − clean."""
    sa = mech["sink_attention"]
    clean, masked = np.array(sa["clean"], dtype=float), np.array(sa["masked"], dtype=float)
    L, H = clean.shape
    fig, axes = plt.subplots(1, 3, figsize=(min(16, 4 + 0.35 * H * 3), max(3.2, 0.25 * L + 2)))
    diff = masked - clean
    lim = max(1e-6, float(np.nanmax(np.abs(diff))))
    panels = ((clean, "clean", "viridis", 0, 1), (masked, "masked", "viridis", 0, 1),
              (diff, "masked − clean", "RdBu_r", -lim, lim))
    for ax, (m, title, cmap, lo, hi) in zip(axes, panels, strict=True):
        im = ax.imshow(m, aspect="auto", cmap=cmap, vmin=lo, vmax=hi, origin="lower")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("head")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    axes[0].set_ylabel("layer")
    for h in mech.get("sink_heads", []):
        axes[2].add_patch(plt.Rectangle((h["head"] - 0.5, h["layer"] - 0.5), 1, 1, fill=False,
                                        edgecolor="black", lw=1.2))
    fig.suptitle(f"Attention on position {mech['sink_position']} (mean over later queries); "
                 "boxed: heads that lose their sink", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_patching(mech: dict[str, Any], path: str | Path, top: int = 15) -> Path:
    """Fraction of Δ recovered by restoring each of the top components alone and reproduced
    by patching it alone into the clean model (bars), and the recovery of the top k
    mediators restored together (right panel)."""
    single = mech["patching"][:top]
    rev = {d["component"]: d["reproduced"] for d in mech["patching_reverse"]}
    names = [d["component"] for d in single]
    labels = [n + (" *" if d.get("holds_set") else "") for n, d in zip(names, single, strict=True)]
    fig, (ax, ax2) = plt.subplots(
        1, 2, figsize=(min(11, max(9, 0.5 * len(names) + 6)), 4.4),
        gridspec_kw={"width_ratios": [3, 1]},
    )
    x = np.arange(len(names))
    rec = np.array([d["recovered"] for d in single], dtype=float)
    ax.bar(x - 0.2, rec, width=0.4, color="#2ca02c", label="restored alone in the masked model")
    ax.bar(x + 0.2, [rev.get(n, np.nan) for n in names], width=0.4, color="#d62728",
           label="patched alone into the clean model (share of Δ reproduced)")
    ax.axhline(1.0, color="0.6", lw=0.8, ls=":")
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("fraction of Δ")
    ax.set_title("Each component alone (* holds a masked unit)", fontsize=10)
    ax.legend(fontsize=8)
    cum = mech.get("patching_cumulative", [])
    if cum:
        ax2.plot([c["k"] for c in cum], [c["recovered"] for c in cum], color="black", marker="o", ms=4)
        ax2.set_xticks([c["k"] for c in cum])
    else:
        ax2.text(0.5, 0.5, "no mediators", transform=ax2.transAxes, ha="center", color="gray")
    ax2.axhline(1.0, color="0.6", lw=0.8, ls=":")
    ax2.set_ylim(min(0.0, ax.get_ylim()[0]), max(1.05, ax.get_ylim()[1]))
    ax2.set_xlabel("k")
    ax2.set_title("Top k mediators restored together", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_channels(mech: dict[str, Any], path: str | Path) -> Path:
    """|h| per layer of the massive (position, channel) pairs, clean (solid) vs masked (dashed):
    where each activation is written, how long it lasts, and what the mask leaves of it."""
    prof = mech["residual_profile"]
    xs = prof["layers"]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    traces = prof.get("channels") or []
    colors = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e")
    for t, color in zip(traces, colors, strict=False):
        label = f"channel {t['channel']} at position {t['position']} ({t['token']!r})"
        ax.plot(xs, np.abs(t["clean"]), "-", color=color, marker="o", ms=3, label=f"{label}, clean")
        ax.plot(xs, np.abs(t["masked"]), "--", color=color, marker="x", ms=3, label=f"{label}, masked")
    ax.plot(xs, prof["clean"]["median"], "-", color="0.5", label="median |h| (clean)")
    if not traces:
        ax.text(0.5, 0.5, "no massive activation flagged", transform=ax.transAxes, ha="center", color="gray")
    ax.set_yscale("log")
    ax.set_xlabel("layer (-1 = embeddings; block outputs after)")
    ax.set_ylabel("|h| (residual stream)")
    ax.set_xticks(xs if len(xs) <= 16 else xs[:: max(2, len(xs) // 15)])
    ax.set_title("Massive activations per layer: clean (solid) vs set masked (dashed); "
                 "a value of 0 has no point on the log scale", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_mechanism(mech: dict[str, Any], folder: str | Path) -> list[Path]:
    """The four mechanism figures into ``folder``."""
    folder = Path(folder)
    return [
        plot_residual(mech, folder / FIGURES[0]),
        plot_sinks(mech, folder / FIGURES[1]),
        plot_patching(mech, folder / FIGURES[2]),
        plot_channels(mech, folder / FIGURES[3]),
    ]

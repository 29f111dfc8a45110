"""Controls figure: Δ of the final set zeroed, mean-ablated, in fp32, and of random sets.

Input is the ``controls`` section of ``analysis.json``; nothing is computed here. When the
bars span more than two orders of magnitude the y axis is symmetric-log.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from achilles.plots import save_figure


def control_bars(controls: Mapping[str, Any]) -> list[tuple[str, float, float | None]]:
    """``(label, Δ, sd)`` bars read from a controls section (no computation)."""
    bars: list[tuple[str, float, float | None]] = []
    ma = controls.get("mean_ablation") or {}
    if "delta_zero" in ma:
        bars.append(("zero-ablation\n(the set)", float(ma["delta_zero"]), None))
        bars.append(("mean-ablation\n(the set)", float(ma["delta_mean"]), None))
    fp = controls.get("fp32")
    if fp:
        bars.append((f"zero-ablation, fp32\n(run: {fp['dtype_run']})", float(fp["delta_fp32"]), None))
    rs = controls.get("random_sets")
    if rs and rs.get("mean") is not None:
        sd = rs.get("sd")
        drawn = rs.get("drawn", "same-module")
        what = "same-module" if drawn == "same-module" else "partly other-module"
        bars.append((f"random {what}\nsets ({len(rs['deltas'])} seeds)", float(rs["mean"]),
                     float(sd) if sd is not None else None))
    return bars


def plot_controls(controls: Mapping[str, Any], path: str | Path, *, epsilon: float | None = None,
                  title: str | None = None) -> Path:
    """Bar chart of the controls; random sets as mean ± sd with every seed as a dot."""
    bars = control_bars(controls)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    palette = {"fp32": "#9467bd", "random": "#7f7f7f", "mean": "#ff7f0e", "zero": "#d62728"}
    colors = [next((c for k, c in palette.items() if k in lab), "#1f77b4") for lab, _, _ in bars]
    vals = [v if math.isfinite(v) else float("nan") for _, v, _ in bars]
    xs = list(range(len(bars)))
    ax.bar(xs, [0 if math.isnan(v) else v for v in vals], color=colors, edgecolor="black", lw=0.6)
    for x, (_, v, sd) in zip(xs, bars, strict=True):
        if sd is not None and math.isfinite(v):
            ax.errorbar(x, v, yerr=sd, color="black", capsize=5, lw=1.5)
    seeds = list((controls.get("random_sets") or {}).get("deltas") or [])
    for x, (lab, v, sd) in zip(xs, bars, strict=True):
        label = f"{v:.3g}" if math.isfinite(v) else "non-finite"
        y = 0 if not math.isfinite(v) else v
        if lab.startswith("random") and math.isfinite(v):  # above the seeds' dots and the bar
            y = max([v + (sd or 0.0), *(d for d in seeds if math.isfinite(d))])
            label = f"mean {label}"
        ax.annotate(label, (x, y), ha="center",
                    va="bottom", fontsize=9, xytext=(0, 3), textcoords="offset points")
    rs = controls.get("random_sets")
    if rs and rs.get("deltas"):
        xr = len(bars) - 1
        ax.plot([xr] * len(rs["deltas"]), rs["deltas"], "o", color="black", mfc="white", ms=5,
                label="random sets, one per seed")
        ax.plot([xr - 0.4, xr + 0.4], [float(rs["mean"])] * 2, color="black", lw=2)
    if epsilon is not None:
        ax.axhline(epsilon, ls="--", color="#d62728", lw=1, label=f"ε = {epsilon:g}")
    ax.axhline(0, color="0.5", lw=0.8)
    finite = [abs(v) for v in vals if not math.isnan(v) and v != 0]
    if finite and max(finite) / max(min(finite), 1e-12) > 100:
        # every bar above the linear zone; ticks only at 0 and whole decades from 10·linthresh,
        # so no two tick labels sit on top of each other
        lin = 10.0 ** math.floor(math.log10(max(min(finite), max(finite) * 1e-8)))
        ax.set_yscale("symlog", linthresh=lin, linscale=0.5)
        low = [v - (sd or 0) for _, v, sd in bars if math.isfinite(v)]
        low += list((controls.get("random_sets") or {}).get("deltas") or [])
        bottom = min(min(low, default=0.0) * 3, -lin)
        ax.set_ylim(bottom, max(finite) * 4)
        decades = range(int(math.log10(lin)) + 1, math.ceil(math.log10(max(finite) * 4)))
        ticks = [0.0] + [10.0 ** k for k in decades]
        ticks += [-(10.0 ** k) for k in decades if 10.0 ** k <= -bottom]
        ax.set_yticks(sorted(ticks))
        ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    else:
        ax.margins(y=0.15)
    ax.set_xticks(xs, [b[0] for b in bars], fontsize=9)
    ax.set_ylabel("Δ = log10(PPL_masked / PPL_clean)")
    n = controls.get("n_units")
    ax.set_title(title or f"controls on the {controls.get('set', 'final')} set ({n} unit{'' if n == 1 else 's'})",
                 fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)

"""Phase-transition figure: Δ against the number of masked units n (log x).

Inputs are the ``curve`` of ``identification.json`` and the ``phase`` section of
``analysis.json``; nothing is computed here. Non-finite Δ (overflow) are drawn as red
crosses at the top edge, the ε line dashed, n* as a vertical line, the largest jump as an
arrow when it is a real transition (:func:`real_transition`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from achilles.plots import save_figure

SHARP = 0.5
"""A jump is annotated as a transition when it is at least this share of the curve's range."""


def real_transition(phase: Mapping[str, Any] | None) -> bool:
    """Whether the largest jump is a transition (``sharpness ≥ SHARP`` and above the noise
    ``tolerance``), not the largest step of a smooth ramp."""
    if not phase or phase.get("jump") is None or not phase.get("n_jump"):
        return False
    sharp = phase.get("sharpness")
    return (sharp is not None and sharp >= SHARP
            and float(phase["jump"]) > float(phase.get("tolerance") or 0.0))


def plot_phase(
    curve: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    epsilon: float | None = None,
    n_star: int | None = None,
    phase: Mapping[str, Any] | None = None,
    title: str | None = None,
) -> Path:
    """Plot Δ(n) with ε, n* and the detected jump; saves a PNG."""
    pts = sorted((int(p["n"]), float(p["delta"])) for p in curve)
    fin = [(n, d) for n, d in pts if math.isfinite(d)]
    bad = [n for n, d in pts if not math.isfinite(d)]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    if fin:
        ax.plot([n for n, _ in fin], [d for _, d in fin], "o-", ms=3, lw=1.2, color="#1f77b4",
                label="Δ(n), masked prefix of the ranking")
    ax.axhline(0, color="0.6", lw=0.8)
    if epsilon is not None:
        ax.axhline(epsilon, ls="--", color="#d62728", lw=1, label=f"ε = {epsilon:g}")
    if n_star is not None:
        ax.axvline(n_star, ls=":", color="black", lw=1.2, label=f"n* = {n_star}")
    ymax = max([d for _, d in fin] + [epsilon or 0.0, 0.0])
    ymin = min([d for _, d in fin] + [0.0])
    pad = 0.08 * (ymax - ymin or 1.0)
    top = ymax + 2 * pad
    if bad:
        ax.plot(bad, [top - pad / 2] * len(bad), "x", color="red", ms=8, mew=2,
                label=f"non-finite Δ ({len(bad)} point{'s' if len(bad) != 1 else ''})")
    if real_transition(phase):
        assert phase is not None
        na = phase["n_jump"]
        # n = 0 (no mask) has no place on a log axis: draw a jump from it as a vertical arrow
        nb = phase["n_before"] if phase["n_before"] > 0 else na
        ax.annotate(
            "", xy=(na, phase["delta_after"]), xytext=(nb, phase["delta_before"]),
            arrowprops={"arrowstyle": "->", "color": "#ff7f0e", "lw": 2},
        )
        sharp = phase.get("sharpness")
        txt = f"largest jump {phase['jump']:.3g} at n = {na}"
        if sharp is not None:
            txt += f"\nsharpness {sharp:.2f}"
        ax.text(0.02, 0.97, txt, transform=ax.transAxes, va="top", fontsize=9, color="#b35806",
                bbox={"facecolor": "white", "edgecolor": "#ff7f0e", "alpha": 0.85})
    ax.set_xscale("log")
    ax.set_ylim(ymin - pad, top)
    ax.set_xlabel("masked units n (log scale)")
    ax.set_ylabel("Δ = log10(PPL_masked / PPL_clean)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    if title:
        ax.set_title(title, fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)

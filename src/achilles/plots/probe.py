"""Figure 1: next-token probability bars at each masking level, target highlighted."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from achilles.experiments.probe import ProbeResult  # noqa: E402
from achilles.model.names import token_label  # noqa: E402
from achilles.plots import save_figure


def _label(token: str, limit: int = 12) -> str:
    s = token_label(token)  # visible spaces, escaped control characters and bytes
    return s if len(s) <= limit else s[: limit - 1] + "…"


MAX_BARS = 30
"""Bars per panel: a larger ``--top-k`` is listed in full in the JSON and the summary, and
the chart shows its first ``MAX_BARS`` (thousands of bars are unreadable and slow to draw)."""


def plot_probe(result: ProbeResult, path: str | Path, *, max_cols: int = 3) -> Path:
    """One bar-chart panel per level (top-k tokens, at most :data:`MAX_BARS`), written to ``path``."""
    levels = result.levels
    cols = min(max_cols, len(levels))
    rows = math.ceil(len(levels) / cols)
    k = min(MAX_BARS, max(len(lv.top) for lv in levels))
    shown = f"; top {k} of {max(len(lv.top) for lv in levels)} shown" if k == MAX_BARS and any(
        len(lv.top) > MAX_BARS for lv in levels) else ""
    fig, axes = plt.subplots(rows, cols, figsize=(max(4.5, 0.55 * k + 1.5) * cols, 3.6 * rows),
                             squeeze=False)
    ymax = max(t.prob for lv in levels for t in lv.top)
    for ax, lv in zip(axes.flat, levels):
        top = lv.top[:k]
        probs = [t.prob for t in top]
        colors = ["tab:red" if t.token_id == result.target_token_id else "tab:blue" for t in top]
        bars = ax.bar(range(len(probs)), probs, color=colors)
        for b, p in zip(bars, probs):
            ax.text(b.get_x() + b.get_width() / 2, p, f"{p:.3f}", ha="center", va="bottom",
                    fontsize=7)
        ax.set_xticks(range(len(probs)), [_label(t.token) for t in top], rotation=60,
                      ha="right", fontsize=8)
        ax.set_ylim(0, min(1.0, ymax * 1.25))
        ax.set_ylabel("next-token probability")
        title = "unmasked" if lv.n_masked == 0 else f"{lv.n_masked} unit(s) masked"
        ax.set_title(title)
        ax.text(0.97, 0.95,
                f"P({_label(result.target_token)!s}) = {lv.target_prob:.4g}\nrank #{lv.target_rank}",
                transform=ax.transAxes, ha="right", va="top", fontsize=9,
                bbox={"boxstyle": "round", "facecolor": "mistyrose", "alpha": 0.9})
    for ax in list(axes.flat)[len(levels):]:
        ax.axis("off")
    fig.suptitle(f"Next token after {result.prompt!r} (target {result.target_token!r} in red; "
                 f"masking the {result.set} set in order{shown})", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)

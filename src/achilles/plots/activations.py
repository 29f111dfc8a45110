"""Per-token activation of the critical channels (the Massive Activations figure).

Input is the ``activations`` section of ``analysis.json`` and the text's token strings;
nothing is computed here. One panel per unit: its activation at every token position, the
peak labelled with its token.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from achilles.plots import save_figure  # noqa: E402

MAX_LABELS = 60
"""Token labels drawn on the x axis at most (every k-th token beyond that)."""


def plot_activations(activations: Mapping[str, Any], tokens: Sequence[str] | None,
                     path: str | Path, *, title: str | None = None) -> Path:
    """Bar chart of each traced unit's activation per token position; saves a PNG."""
    units, values = activations["units"], activations["values"]
    n = max(1, len(units))
    fig, axes = plt.subplots(n, 1, figsize=(9, 2.3 * n + 0.9), squeeze=False, sharex=True)
    for ax, u, vals in zip(axes[:, 0], units, values, strict=False):
        xs = list(range(len(vals)))
        finite = [v if math.isfinite(v) else 0.0 for v in vals]
        ax.bar(xs, finite, color="#d62728", width=0.8)
        ax.axhline(0, color="0.5", lw=0.8)
        p = max(xs, key=lambda i: abs(finite[i])) if xs else 0
        tok = f" {tokens[p]!r}" if tokens and p < len(tokens) else ""
        ax.set_title(f"L{u['layer']}.{u['component']}[{u['channel']}]: peak {finite[p]:.4g} "
                     f"at position {p}{tok}", fontsize=9, loc="left")
        ax.set_ylabel("activation", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        bad = [i for i, v in enumerate(vals) if not math.isfinite(v)]
        if bad:
            ax.plot(bad, [0] * len(bad), "x", color="black", label="non-finite")
            ax.legend(fontsize=7)
    ax = axes[-1, 0]
    if tokens:
        step = max(1, math.ceil(len(tokens) / MAX_LABELS))
        ticks = list(range(0, len(tokens), step))
        ax.set_xticks(ticks, [tokens[i] for i in ticks], rotation=90, fontsize=6)
    ax.set_xlabel("token position" + (" (token)" if tokens else ""))
    fig.suptitle(title or "critical channels, activation per token", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)

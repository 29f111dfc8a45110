"""Heatmaps of pairwise Jaccard overlap of the critical sets found on different texts."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from achilles.experiments.robustness import Robustness  # noqa: E402
from achilles.plots import save_figure


def plot_robustness(result: Robustness, path: str | Path) -> Path:
    """Three heatmaps (minimal set, critical set, top-N), written to ``path`` (PNG)."""
    labels = result.labels
    n = len(labels)
    side = max(3.2, 0.55 * n + 1.8)
    width = max(len(x) for x in labels)
    fig, axes = plt.subplots(1, 3, figsize=(3 * side + 1.2 + 0.25 * width, side + 0.6),
                             gridspec_kw={"wspace": 0.25 + 0.04 * width})
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    panels = (
        ("minimal sets", result.jaccard_minimal),
        ("critical sets", result.jaccard_critical),
        (f"top-{result.top} rankings", result.jaccard_top),
    )
    im = None
    for ax, (title, mat) in zip(axes, panels, strict=True):
        arr = np.array([[np.nan if v is None else v for v in row] for row in mat], dtype=float)
        im = ax.imshow(arr, vmin=0, vmax=1, cmap=cmap)
        ax.set_xticks(range(n), labels, rotation=45, ha="right")
        ax.set_yticks(range(n), labels)
        ax.set_title(f"Jaccard: {title}")
        if n <= 12:
            for i in range(n):
                for j in range(n):
                    v = arr[i, j]
                    txt = "n/a" if np.isnan(v) else f"{v:.2f}"
                    ax.text(j, i, txt, ha="center", va="center", fontsize=8,
                            color="black" if (np.isnan(v) or v > 0.6) else "white")
    assert im is not None  # set by each of the three panels
    fig.colorbar(im, ax=axes, shrink=0.8, label="Jaccard index |A∩B| / |A∪B|")
    fig.suptitle("Overlap of identified units across input texts, by (module, channel)")
    if np.isnan(np.array(result.jaccard_minimal, dtype=float)).any():
        fig.text(0.5, 0.0, "n/a: both sets empty (no collapse found on either text)",
                 ha="center", va="bottom", fontsize=8, color="dimgrey")
    return save_figure(fig, path, dpi=120, bbox_inches="tight")

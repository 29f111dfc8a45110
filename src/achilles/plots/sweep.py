"""Figure 4: number of critical units n* against α and against K."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from achilles.experiments.sweep import SweepPoint, SweepResult  # noqa: E402
from achilles.plots import save_figure


def _panel(ax, pts: list[SweepPoint], x_attr: str, result: SweepResult, label: str | None) -> bool:  # noqa: ANN001
    """Plot n* (solid) and |minimal set| (dashed) of ``pts`` against ``x_attr``; True if any found."""
    pts = sorted(pts, key=lambda p: getattr(p, x_attr))
    xs = [getattr(p, x_attr) for p in pts]
    ns = [p.n_star for p in pts]
    mins = [p.n_minimal for p in pts]
    line = ax.plot(
        [x for x, n in zip(xs, ns) if n is not None], [n for n in ns if n is not None],
        marker="o", label=f"n* {label}" if label else "n* (critical set)",
    )[0]
    ax.plot(
        [x for x, n in zip(xs, mins) if n is not None], [n for n in mins if n is not None],
        marker="s", linestyle="--", color=line.get_color(), alpha=0.6,
        label=f"minimal {label}" if label else "minimal set",
    )
    missing = [x for x, n in zip(xs, ns) if n is None]
    if missing:
        ax.scatter(missing, [result.max_neurons] * len(missing), marker="x", color="red", zorder=3,
                   label=f"not found (Δ < ε up to n={result.max_neurons})")
    return any(n is not None for n in ns)


def plot_sweep(result: SweepResult, path: str | Path) -> Path:
    """Two panels, n* vs α and n* vs K, written to ``path`` (PNG)."""
    s = result.sweep
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, x_attr, other, xlabel, fixed in (
        (axes[0], "alpha", "samples", "noise scale α", f"K = {s.anchor_samples}"),
        (axes[1], "samples", "alpha", "noisy copies K", f"α = {s.anchor_alpha:g}"),
    ):
        if s.grid == "full":
            groups: dict[float, list[SweepPoint]] = {}
            for p in result.points:
                groups.setdefault(getattr(p, other), []).append(p)
            name = "K" if other == "samples" else "α"
            for val, pts in sorted(groups.items()):
                _panel(ax, pts, x_attr, result, f"{name}={val:g}")
            title = f"n* against {xlabel.split()[-1]} (one line per {name})"
        else:
            axis = "alpha" if x_attr == "alpha" else "samples"
            pts = [p for p in result.points if axis in p.axes]
            _panel(ax, pts, x_attr, result, None)
            title = f"n* against {xlabel.split()[-1]} at {fixed}"
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"critical units (ε = {result.epsilon:g})")
        ax.set_title(title)
        ys = [y for ln in ax.get_lines() for y in ln.get_ydata() if y > 0]
        if ys and max(ys) / min(ys) >= 20:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
            ax.yaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Sensitivity of the critical set to the stage-1 hyper-parameters")
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)

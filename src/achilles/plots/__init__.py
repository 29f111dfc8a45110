"""Figures from result files (headless matplotlib; no computation here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_figure(fig: Any, path: str | Path, *, dpi: int | str = 110, **kwargs: Any) -> Path:
    """Write ``fig`` to ``path`` (creating its folder), close it, and return the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, **kwargs)
    plt.close(fig)
    return path

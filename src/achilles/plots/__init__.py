"""Figures from result files (headless matplotlib; no computation here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_figure(fig: Any, path: str | Path, *, dpi: int | str = 110, **kwargs: Any) -> Path:
    """Write ``fig`` to ``path`` atomically (creating its folder), close it, return the path."""
    import matplotlib.pyplot as plt

    from achilles.results.files import atomic_path

    path = Path(path)
    kwargs.setdefault("format", path.suffix.lstrip(".") or "png")
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, **kwargs)
    finally:
        plt.close(fig)
    return path

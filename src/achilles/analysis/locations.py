"""Where the critical neurons live: counts over layer index, per component kind (Figs 2/5).

The paper reports that critical units concentrate in ``mlp.down`` (down_proj) and in the
**outer layers** (the first few and the last few). Both are turned into numbers here:

* ``down_share``: the fraction of units whose component is ``mlp.down``;
* ``outer_share``: the fraction in the first or last quarter of the layers, i.e. layer
  ``l < q`` or ``l >= L - q`` with ``q = ceil(L / 4)``. With ``L <= 4`` every layer is outer,
  so the figure is only informative for deeper models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from achilles.model.units import Unit

DOWN_KIND = "mlp.down"


def outer_layers(n_layers: int) -> tuple[int, int]:
    """``(q, L - q)``: layers ``< q`` or ``>= L - q`` are "outer" (``q = ceil(L/4)``)."""
    q = max(1, math.ceil(n_layers / 4))
    return q, n_layers - q


@dataclass(frozen=True)
class LayerDistribution:
    """Counts of a set of units over layer index, per component kind."""

    label: str
    n_layers: int
    n_units: int
    counts: dict[str, list[int]]
    """component kind -> count per layer (length ``n_layers``)."""
    down_share: float | None
    outer_share: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "n_layers": self.n_layers,
            "n_units": self.n_units,
            "counts": self.counts,
            "per_layer": [sum(c[i] for c in self.counts.values()) for i in range(self.n_layers)],
            "per_component": {k: sum(v) for k, v in self.counts.items()},
            "down_share": self.down_share,
            "outer_share": self.outer_share,
        }


def layer_distribution(units: Sequence[Unit], n_layers: int, label: str = "") -> LayerDistribution:
    """Count ``units`` per layer and component kind.

    Units with a layer index outside ``[0, n_layers)`` (e.g. ``-1``, unknown) are counted in
    the shares' denominators but not in any layer bin.
    """
    counts: dict[str, list[int]] = {}
    outer = 0
    lo, hi = outer_layers(n_layers)
    for u in units:
        row = counts.setdefault(u.component or "?", [0] * n_layers)
        if 0 <= u.layer < n_layers:
            row[u.layer] += 1
            outer += u.layer < lo or u.layer >= hi
    n = len(units)
    down = sum(1 for u in units if u.component == DOWN_KIND)
    return LayerDistribution(
        label=label,
        n_layers=n_layers,
        n_units=n,
        counts=dict(sorted(counts.items())),
        down_share=down / n if n else None,
        outer_share=outer / n if n else None,
    )


def n_layers_of(pool: dict[str, Any], units: Sequence[Unit] = ()) -> int:
    """Number of decoder layers, from a ranking's ``pool`` summary (or the units seen)."""
    n_modules, comps = pool.get("n_modules"), pool.get("components") or []
    if n_modules and comps:
        return int(n_modules) // len(comps)
    return max((u.layer for u in units), default=-1) + 1


def locations(
    critical: Sequence[Unit], ranking: Sequence[Unit], n_layers: int, top_n: int = 100
) -> dict[str, Any]:
    """Layer distributions of the critical set and of the top-``top_n`` ranking."""
    top = list(ranking[:top_n])
    lo, hi = outer_layers(n_layers)
    return {
        "n_layers": n_layers,
        "outer_layers": {"first": list(range(lo)), "last": list(range(max(hi, lo), n_layers))},
        "top_n": len(top),
        "critical": layer_distribution(critical, n_layers, "critical set").to_dict(),
        "ranking": layer_distribution(top, n_layers, f"top {len(top)} of the ranking").to_dict(),
    }

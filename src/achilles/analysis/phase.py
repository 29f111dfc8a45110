"""The phase transition of a masking curve Δ(n): where it jumps, how sharply, and whether
masking more ever undoes damage.

Definitions (Δ in orders of magnitude of perplexity, points sorted by ``n``):

* The curve starts at the **origin** ``(0, 0)``: masking nothing changes nothing. It is
  prepended unless the curve already has ``n = 0`` (``include_origin=False`` turns it off).
* **Jump**: the largest single-step increase ``Δ[i] - Δ[i-1]`` between consecutive finite
  points; ``n_jump`` is the ``n`` reached by that step (``n_before`` the one before).
* **Rise**: the range ``max Δ - min Δ`` of the finite points (with the origin: for a curve
  that never goes below 0, ``max Δ``); **sharpness** = jump / rise, in ``[0, 1]``: 1 for a
  single step, about ``1/k`` for a ramp of ``k`` equal steps. ``None`` for a flat curve.
* **Non-monotone**: the largest drawdown ``max_{i<j} (Δ[i] - Δ[j])`` exceeds ``tolerance``;
  ``drops`` lists every single step that falls by more than ``tolerance``.
* **Non-finite points** (``inf``/``nan`` Δ: the masked NLL overflowed) are listed in
  ``nonfinite_n`` and left out of the jump, rise and drawdown, which describe the finite
  curve only: a non-finite Δ is a numerical failure, not a measured value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_TOLERANCE = 0.1
"""Drops smaller than this (orders of magnitude of PPL, i.e. a factor 1.26) are noise."""


@dataclass(frozen=True)
class Drop:
    """Δ fell from ``from_delta`` at ``from_n`` to ``delta`` at ``n``."""

    from_n: int
    from_delta: float
    n: int
    delta: float

    @property
    def size(self) -> float:
        return self.from_delta - self.delta

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "size": self.size}


@dataclass(frozen=True)
class PhaseTransition:
    """Jump, sharpness and monotonicity of one Δ(n) curve (see the module docstring)."""

    n_points: int
    jump: float | None
    n_jump: int | None
    n_before: int | None
    delta_before: float | None
    delta_after: float | None
    rise: float | None
    sharpness: float | None
    max_delta: float | None
    n_max_delta: int | None
    non_monotone: bool
    tolerance: float
    max_drawdown: Drop | None
    drops: list[Drop] = field(default_factory=list)
    nonfinite_n: list[int] = field(default_factory=list)
    origin_included: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["max_drawdown"] = self.max_drawdown.to_dict() if self.max_drawdown else None
        d["drops"] = [x.to_dict() for x in self.drops]
        return d


def curve_points(curve: Iterable[Mapping[str, Any]] | Iterable[tuple[int, float]]) -> list[tuple[int, float]]:
    """``[(n, Δ)]`` from curve dicts (``{"n", "delta", ...}``) or pairs; strings decoded."""
    out = []
    for p in curve:
        n, d = (p["n"], p["delta"]) if isinstance(p, Mapping) else p
        out.append((int(n), float(d)))
    return sorted(out)


def phase_transition(
    curve: Iterable[Mapping[str, Any]] | Iterable[tuple[int, float]],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    include_origin: bool = True,
) -> PhaseTransition:
    """Analyse a Δ(n) curve (dicts as in ``identification.json`` or ``(n, Δ)`` pairs)."""
    pts = curve_points(curve)
    nonfinite = [n for n, d in pts if not math.isfinite(d)]
    finite: list[tuple[int, float]] = [(n, d) for n, d in pts if math.isfinite(d)]
    origin = include_origin and not any(n == 0 for n, _ in pts)
    if origin:
        finite.insert(0, (0, 0.0))
    jump = n_jump = n_before = d_before = d_after = None
    for (n0, d0), (n1, d1) in zip(finite, finite[1:]):
        if jump is None or d1 - d0 > jump:
            jump, n_jump, n_before, d_before, d_after = d1 - d0, n1, n0, d0, d1
    rise = sharp = max_d = n_max = None
    if finite:
        n_max, max_d = max(finite, key=lambda p: (p[1], -p[0]))
        rise = max_d - min(d for _, d in finite)
        if jump is not None and rise > 0:
            sharp = max(jump, 0.0) / rise
    drops = [
        Drop(n0, d0, n1, d1)
        for (n0, d0), (n1, d1) in zip(finite, finite[1:])
        if d0 - d1 > tolerance
    ]
    worst: Drop | None = None
    peak: tuple[int, float] | None = None
    for n, d in finite:
        if peak is None or d > peak[1]:
            peak = (n, d)
        elif worst is None or peak[1] - d > worst.size:
            worst = Drop(peak[0], peak[1], n, d)
    if worst is not None and worst.size <= 0:
        worst = None
    return PhaseTransition(
        n_points=len(pts),
        jump=jump,
        n_jump=n_jump,
        n_before=n_before,
        delta_before=d_before,
        delta_after=d_after,
        rise=rise,
        sharpness=sharp,
        max_delta=max_d,
        n_max_delta=n_max,
        non_monotone=worst is not None and worst.size > tolerance,
        tolerance=tolerance,
        max_drawdown=worst,
        drops=drops,
        nonfinite_n=nonfinite,
        origin_included=origin,
    )


def summarize_points(points: Sequence[tuple[int, float]]) -> dict[str, int]:
    """Counts of finite and non-finite points of a curve."""
    bad = sum(1 for _, d in points if not math.isfinite(d))
    return {"points": len(points), "finite": len(points) - bad, "nonfinite": bad}

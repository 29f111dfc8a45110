"""The one interface every ranking method implements, and the ranking result.

A ranking method is a function ``(model, input_ids, pool, config) -> Scores``: one float32
score per unit (higher = more critical), optionally with the token position where it peaked.
:func:`rank_units` turns scores into a :class:`Ranking`, the typed result saved as
``ranking.json`` together with the configuration and environment that produced it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from achilles.errors import AchillesError
from achilles.model.units import Unit, UnitPool
from achilles.results.envelope import Envelope, run_id_of
from achilles.results.files import decode_float
from achilles.results.schema import require_fields


def reduce_positions(per_pos: torch.Tensor, reduce: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce ``[T, C]`` per-position scores to ``[C]`` as stage 1 does.

    Args:
        per_pos: float32 scores of each channel at each position.
        reduce: ``"max"`` (largest score over positions) or ``"mean"``.

    Returns:
        ``(values [C] float32, positions [C] long)``; the position is the arg-max over
        positions for both reductions, so reports can show where a unit peaked.
    """
    peak, pos = per_pos.max(0)
    if reduce == "max":
        return peak, pos
    if reduce == "mean":
        return per_pos.mean(0), pos
    raise ValueError(f"unknown reduce {reduce!r}: expected 'max' or 'mean'")


@dataclass
class Scores:
    """Per-site unit scores: ``values[module]`` is float32 ``[width]`` (higher = more critical).

    ``positions[module]`` (optional) is the token position where each unit's score peaked.
    """

    values: dict[str, torch.Tensor]
    positions: dict[str, torch.Tensor] | None = None

    @classmethod
    def from_positions(
        cls, pool: UnitPool, reduce: str, per_position: Callable[[str], torch.Tensor]
    ) -> Scores:
        """Reduce each site's ``per_position(module)`` scores ``[T, C]`` over positions."""
        values: dict[str, torch.Tensor] = {}
        positions: dict[str, torch.Tensor] = {}
        for s in pool.sites:
            values[s.module], positions[s.module] = reduce_positions(per_position(s.module), reduce)
        return cls(values, positions)

    def flat(self, pool: UnitPool) -> torch.Tensor:
        """All scores as one float32 CPU vector in pool order."""
        return torch.cat([self.values[s.module].float().cpu() for s in pool.sites])


@dataclass(frozen=True)
class RankedUnit:
    unit: Unit
    score: float | None
    position: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = self.unit.to_dict()
        d["score"] = self.score
        if self.position is not None:
            d["position"] = self.position
        return d


@dataclass
class Ranking(Envelope):
    """Units of a pool, best first, with the config and provenance that produced them."""

    KIND = "ranking"

    method: str
    neurons: list[RankedUnit]
    pool: dict[str, Any]
    tokens: int
    config: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    nonfinite: dict[str, int] | None = None
    """Counts of NaN/inf/-inf scores over the whole pool (before ``keep`` cut the list)."""
    run_id: str | None = None

    @property
    def units(self) -> list[Unit]:
        return [r.unit for r in self.neurons]

    def fields(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "pool": self.pool,
            "tokens": self.tokens,
            # the reference code's |N|: per-token channels × positions
            "n_triples": self.pool.get("n_units", 0) * self.tokens,
            "nonfinite": self.nonfinite,
            "neurons": [r.to_dict() for r in self.neurons],
        }

    @classmethod
    def load(cls, path: str) -> Ranking:
        d = cls.read(path, {"method": str, "pool": dict, "tokens": int, "neurons": list})
        if not d["neurons"]:
            raise AchillesError(f"{path} ranks no units: rank again (check --keep)")
        try:
            neurons = []
            for n in d["neurons"]:
                require_fields(n, path, {"score": (float, type(None))})
                pos = n.get("position")
                if pos is not None and _is_int(pos) is False:
                    raise ValueError(f"position {pos!r}")
                neurons.append(RankedUnit(Unit.from_dict(n), decode_float(n["score"]), pos))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise AchillesError(f"{path} is not a valid ranking file (bad unit: {e})") from None
        seen: set[tuple[str, int]] = set()
        for r in neurons:
            if r.unit.key in seen:
                raise AchillesError(f"{path} lists unit {r.unit} twice: the file is damaged, rank again")
            seen.add(r.unit.key)
        return cls(
            d["method"], neurons, d["pool"], d["tokens"], d.get("config", {}), d.get("env", {}),
            d.get("nonfinite"), run_id_of(d),
        )


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def rank_units(scores: Scores, pool: UnitPool, keep: int) -> list[RankedUnit]:
    """The top ``keep`` units by score, best first; ties keep pool order (stable sort)."""
    flat = scores.flat(pool)
    if flat.numel() != pool.n_units:
        raise ValueError(f"{flat.numel()} scores for a pool of {pool.n_units} units")
    # NaN scores would sort arbitrarily; rank them last and keep them visible as NaN.
    key = torch.nan_to_num(flat, nan=-torch.inf)
    order = torch.sort(key, descending=True, stable=True).indices[:keep]
    pos_flat = None
    if scores.positions is not None:
        pos_flat = torch.cat([scores.positions[s.module].cpu() for s in pool.sites])
    units = pool.units(order.tolist())
    vals = flat[order].tolist()
    poss = pos_flat[order].tolist() if pos_flat is not None else [None] * len(units)
    return [RankedUnit(u, v, p) for u, v, p in zip(units, vals, poss, strict=True)]


RankFn = Callable[..., Scores]

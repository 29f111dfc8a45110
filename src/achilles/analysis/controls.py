"""Controls the reviewers asked for, on the text of a run.

* **Mean-ablation** (:func:`mean_ablation`): replace each unit's channel by its mean over the
  positions of the clean pass, instead of zero. If Δ stays large, the damage is not just
  "zero is out of distribution"; if it vanishes, the set matters through its (large, often
  constant) value, as a bias term would.
* **Random sets** (:func:`random_sets`): sets of the same size drawn from the **same modules**
  (same layer and component kind, stratified: as many units per module as the set has
  there), excluding the set's own units, over several seeds: Δ mean / sd / max |Δ|.
* **fp32 recheck** (:func:`~achilles.method.recheck.recheck_fp32`, from the core, and
  :func:`fp32_delta`): Δ of the same set recomputed with float32 weights when the run used
  bfloat16/float16, to separate a real collapse from low-precision overflow.

Every Δ here goes through :class:`~achilles.method.identify.MaskEvaluator` (zero-ablation) or
:func:`~achilles.method.metrics.sequence_nll` + :func:`~achilles.method.metrics.delta` (mean-ablation).

A random set draws at most half of a module's other channels, so that seeds differ; a set
that covers most of its module is completed from other modules of the same kind
(:func:`random_like`), and ``RandomSets.drawn`` says what was drawn.
"""

from __future__ import annotations

import logging
import random
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from achilles.config import ModelSpec
from achilles.method.identify import MaskEvaluator
from achilles.method.metrics import delta, sequence_nll
from achilles.method.recheck import (  # re-exported: the core owns the re-check
    recheck_fp32,
)
from achilles.model.batching import input_device
from achilles.model.hooks import recorded
from achilles.model.loading import LoadedModel
from achilles.model.masking import set_channels
from achilles.model.units import Unit, UnitPool

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class MeanAblation:
    """Δ of a set under zero- and mean-ablation on the same text."""

    n_units: int
    delta_zero: float
    delta_mean: float
    means: list[float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RandomSets:
    """Δ of random sets of the same size, one per seed (``drawn`` says from where)."""

    n_units: int
    seeds: list[int]
    deltas: list[float]
    delta_set: float
    sets: list[list[dict[str, Any]]] = field(default_factory=list)
    drawn: str = "same-module"
    """What the sets are made of (:func:`describe_random_sets`), for labels."""

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.deltas) if self.deltas else None

    @property
    def sd(self) -> float | None:
        if len(self.deltas) <= 1:
            return None
        if not all(abs(d) < float("inf") for d in self.deltas):  # False for NaN too
            return float("nan")  # statistics.stdev raises on inf; a non-finite spread is reported
        return statistics.stdev(self.deltas)

    @property
    def max_abs(self) -> float | None:
        return max(abs(d) for d in self.deltas) if self.deltas else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": self.mean, "sd": self.sd, "max_abs": self.max_abs}


def _channel_means(
    model: torch.nn.Module, input_ids: torch.Tensor, units: Sequence[Unit]
) -> list[float]:
    return [statistics.fmean(t) for t in channel_traces(model, input_ids, units)]


def channel_traces(
    model: torch.nn.Module, input_ids: torch.Tensor, units: Sequence[Unit]
) -> list[list[float]]:
    """Each unit's activation at every token position of ``input_ids`` ``[1, T]`` (clean pass)."""
    names = list(dict.fromkeys(u.module for u in units))
    dev = input_device(model)
    with recorded(model, names) as rec, torch.no_grad():
        model(input_ids=input_ids.to(dev), use_cache=False)
    return [rec[u.module][1][0, :, u.channel].float().cpu().tolist() for u in units]


def mean_ablation(
    model: torch.nn.Module, pool: UnitPool, input_ids: torch.Tensor, units: Sequence[Unit],
    *, clean_nll: float | None = None,
) -> MeanAblation:
    """Δ of ``units`` zeroed and set to their clean mean over positions (same text);
    ``clean_nll``: the text's clean summed NLL when a prepared run has it."""
    units = list(units)
    ev = MaskEvaluator(model, pool, input_ids, batch_size=1, clean_nll=clean_nll)
    d_zero = ev.measure([units])[0].delta if units else 0.0
    means = _channel_means(model, input_ids, units) if units else []
    with set_channels(model, dict(zip(units, means, strict=True))):
        nll = float(sequence_nll(model, input_ids)[0])
    d_mean = delta(nll, ev.baseline_nll, ev.tokens)
    return MeanAblation(len(units), d_zero, d_mean, means)


def random_like(units: Sequence[Unit], pool: UnitPool, rng: random.Random) -> list[Unit]:
    """A random set of ``len(units)`` units from the same modules, excluding ``units`` itself.

    Per module of ``units``, as many units are drawn from its other channels as the set has
    there, but at most half of those other channels (:func:`same_module_quota`): a set that
    covers most of its module would otherwise leave one possible draw, identical for every
    seed. The remainder is filled from the other modules of the same component kind, in the
    same layer first, then in the other layers, then from any module of the pool.
    :func:`describe_random_sets` says what was drawn.
    """
    taken = {u.key for u in units}
    per_module: dict[str, int] = {}
    for u in units:
        per_module[u.module] = per_module.get(u.module, 0) + 1
    sites = {s.module: s for s in pool.sites}
    out: list[Unit] = []
    short = 0
    for module, k in per_module.items():
        s = sites[module]
        free = [c for c in range(s.width) if (module, c) not in taken]
        pick = rng.sample(free, same_module_quota(k, len(free)))
        short += k - len(pick)
        out += [Unit(module, c, s.layer, s.component) for c in pick]
    if not short:
        return out
    chosen = {u.key for u in out} | taken
    layers = {sites[m].layer for m in per_module}
    kinds = {sites[m].component for m in per_module}
    tiers = (
        [s for s in pool.sites if s.module not in per_module and s.component in kinds and s.layer in layers],
        [s for s in pool.sites if s.module not in per_module and s.component in kinds and s.layer not in layers],
        [s for s in pool.sites if s.module not in per_module and s.component not in kinds],
    )
    for tier in tiers:
        if not short:
            break
        spare = [
            Unit(s.module, c, s.layer, s.component)
            for s in tier
            for c in range(s.width)
            if (s.module, c) not in chosen
        ]
        drawn = rng.sample(spare, min(short, len(spare)))
        out += drawn
        short -= len(drawn)
    return out


def same_module_quota(k: int, free: int) -> int:
    """Units a random set draws from a module where the set has ``k`` of its ``free`` others."""
    return min(k, free // 2)


def describe_random_sets(units: Sequence[Unit], sets: Sequence[Sequence[Unit] | Sequence[dict]]) -> str:
    """What the random sets are, in words: ``"same-module"`` or the split with the fill."""
    own = {u.module for u in units}
    n = len(units)
    modules = [[(u["module"] if isinstance(u, dict) else u.module) for u in s] for s in sets]
    same = min((sum(m in own for m in ms) for ms in modules), default=n)
    size = min((len(ms) for ms in modules), default=n)
    if same == size == n:
        return "same-module"
    others = sorted({m for ms in modules for m in ms if m not in own})
    where = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
    text = f"{same} same-module + {size - same} from other modules ({where})"
    return text if size == n else f"{text}: only {size} of {n} units were free"


def random_sets(
    model: torch.nn.Module,
    pool: UnitPool,
    input_ids: torch.Tensor,
    units: Sequence[Unit],
    *,
    seeds: int | Sequence[int] = 10,
    keep_sets: bool = True,
    clean_nll: float | None = None,
) -> RandomSets:
    """Δ of random same-module sets of ``len(units)`` units, one per seed (batched);
    ``clean_nll``: the text's clean summed NLL when a prepared run has it."""
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    units = list(units)
    sets = [random_like(units, pool, random.Random(s)) for s in seed_list]
    ev = MaskEvaluator(model, pool, input_ids, rows_hint=len(sets) + 1, clean_nll=clean_nll)
    ms = ev.measure([units, *sets])
    return RandomSets(
        n_units=len(units),
        seeds=seed_list,
        deltas=[m.delta for m in ms[1:]],
        delta_set=ms[0].delta,
        sets=[[u.to_dict() for u in s] for s in sets] if keep_sets else [],
        drawn=describe_random_sets(units, sets),
    )


def fp32_delta(
    lm_or_spec: LoadedModel | ModelSpec,
    text: str,
    pool: UnitPool | None,
    units: Sequence[Unit],
) -> float:
    """Δ of ``units`` on ``text`` recomputed in float32 (see :func:`recheck_fp32`)."""
    return recheck_fp32(lm_or_spec, text, units, pool=pool).delta_fp32

"""Controls the reviewers asked for, on the text of a run.

* **Mean-ablation** (:func:`mean_ablation`): replace each unit's channel by its mean over the
  positions of the clean pass, instead of zero. If Δ stays large, the damage is not just
  "zero is out of distribution"; if it vanishes, the set matters through its (large, often
  constant) value, as a bias term would.
* **Random sets** (:func:`random_sets`): sets of the same size drawn from the **same modules**
  (same layer and component kind, stratified: as many units per module as the set has
  there), excluding the set's own units, over several seeds: Δ mean / sd / max |Δ|.
* **fp32 recheck** (:func:`recheck_fp32`, :func:`fp32_delta`): Δ of the same set recomputed
  with float32 weights when the run used bfloat16/float16, to separate a real collapse
  from low-precision overflow.

Every Δ here goes through :class:`~achilles.identify.MaskEvaluator` (zero-ablation) or
:func:`~achilles.metrics.sequence_nll` + :func:`~achilles.metrics.delta` (mean-ablation).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from achilles.batching import input_device
from achilles.config import ModelSpec
from achilles.hooks import recorded
from achilles.identify import MaskEvaluator
from achilles.loading import LoadedModel, load_model, tokenize
from achilles.masking import set_channels
from achilles.metrics import delta, sequence_nll
from achilles.units import Unit, UnitPool, build_pool

logger = logging.getLogger(__name__)

DEEPCOPY_MAX_PARAMS = 2_000_000_000
"""Models up to this size are upcast in memory (``deepcopy().float()``); larger ones reloaded."""


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
    """Δ of random same-module sets of the same size, one per seed."""

    n_units: int
    seeds: list[int]
    deltas: list[float]
    delta_set: float
    sets: list[list[dict[str, Any]]] = field(default_factory=list)

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


@dataclass(frozen=True)
class Fp32Check:
    """Δ of a set recomputed with float32 weights."""

    n_units: int
    dtype_run: str
    delta_fp32: float
    finite: bool
    baseline_nll_fp32: float
    method: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _channel_means(
    model: torch.nn.Module, input_ids: torch.Tensor, units: Sequence[Unit]
) -> list[float]:
    names = list(dict.fromkeys(u.module for u in units))
    dev = input_device(model)
    with recorded(model, names) as rec, torch.no_grad():
        model(input_ids=input_ids.to(dev), use_cache=False)
    return [float(rec[u.module][1][0, :, u.channel].mean()) for u in units]


def mean_ablation(
    model: torch.nn.Module, pool: UnitPool, input_ids: torch.Tensor, units: Sequence[Unit]
) -> MeanAblation:
    """Δ of ``units`` zeroed and set to their clean mean over positions (same text)."""
    units = list(units)
    ev = MaskEvaluator(model, pool, input_ids, batch_size=1)
    d_zero = ev.measure([units])[0].delta if units else 0.0
    means = _channel_means(model, input_ids, units) if units else []
    with set_channels(model, dict(zip(units, means, strict=True))):
        nll = float(sequence_nll(model, input_ids)[0])
    d_mean = delta(nll, ev.baseline_nll, ev.tokens)
    return MeanAblation(len(units), d_zero, d_mean, means)


def random_like(units: Sequence[Unit], pool: UnitPool, rng: random.Random) -> list[Unit]:
    """A random set with as many units per module as ``units``, excluding ``units`` itself.

    When a module has too few other channels, the remainder is drawn from the other modules
    of the same component kind and layers, then from any module of ``units``.
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
        pick = rng.sample(free, min(k, len(free)))
        short += k - len(pick)
        out += [Unit(module, c, s.layer, s.component) for c in pick]
    if short:
        chosen = {u.key for u in out} | taken
        spare = [
            Unit(m, c, sites[m].layer, sites[m].component)
            for m in per_module
            for c in range(sites[m].width)
            if (m, c) not in chosen
        ]
        out += rng.sample(spare, min(short, len(spare)))
    return out


def random_sets(
    model: torch.nn.Module,
    pool: UnitPool,
    input_ids: torch.Tensor,
    units: Sequence[Unit],
    *,
    seeds: int | Sequence[int] = 10,
    keep_sets: bool = True,
) -> RandomSets:
    """Δ of random same-module sets of ``len(units)`` units, one per seed (batched)."""
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    units = list(units)
    sets = [random_like(units, pool, random.Random(s)) for s in seed_list]
    ev = MaskEvaluator(model, pool, input_ids, rows_hint=len(sets) + 1)
    ms = ev.measure([units, *sets])
    return RandomSets(
        n_units=len(units),
        seeds=seed_list,
        deltas=[m.delta for m in ms[1:]],
        delta_set=ms[0].delta,
        sets=[[u.to_dict() for u in s] for s in sets] if keep_sets else [],
    )


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _fp32_model(lm_or_spec: LoadedModel | ModelSpec) -> tuple[LoadedModel, str]:
    if isinstance(lm_or_spec, ModelSpec):
        spec = dataclasses.replace(lm_or_spec, dtype="float32")
        return load_model(spec), "reloaded"
    lm = lm_or_spec
    if lm.dtype == torch.float32:
        return lm, "as run"
    if getattr(lm.model, "hf_device_map", None) or _n_params(lm.model) > DEEPCOPY_MAX_PARAMS:
        spec = dataclasses.replace(lm.spec, dtype="float32")
        return load_model(spec), "reloaded"
    model = copy.deepcopy(lm.model).float().eval()
    return LoadedModel(model, lm.tokenizer, dataclasses.replace(lm.spec, dtype="float32")), "upcast copy"


def recheck_fp32(
    lm_or_spec: LoadedModel | ModelSpec,
    text: str,
    units: Sequence[Unit],
    *,
    pool: UnitPool | None = None,
) -> Fp32Check:
    """Δ of ``units`` on ``text`` with float32 weights.

    Args:
        lm_or_spec: the run's loaded model (upcast in a copy when small, reloaded in float32
            when large or spread over devices; used as is when already float32), or the
            :class:`ModelSpec` to reload in float32.
        text: the text Δ is measured on.
        units: the set to mask.
        pool: the unit pool (default: built from the units' component kinds).
    """
    dtype_run = (
        str(lm_or_spec.dtype).removeprefix("torch.")
        if isinstance(lm_or_spec, LoadedModel)
        else lm_or_spec.dtype
    )
    lm32, how = _fp32_model(lm_or_spec)
    if pool is None:
        kinds = sorted({u.component for u in units}) or None
        pool = build_pool(lm32.model, components=kinds)
    units = pool.validate(list(units), source="the unit set")
    ids = tokenize(lm32.tokenizer, text)
    ev = MaskEvaluator(lm32.model, pool, ids, batch_size=1)
    m = ev.measure([units])[0]
    logger.info("fp32 recheck (%s): Δ = %s over %d units", how, m.delta, len(units))
    return Fp32Check(len(units), dtype_run, m.delta, math.isfinite(m.delta), ev.baseline_nll, how)


def fp32_delta(
    lm_or_spec: LoadedModel | ModelSpec,
    text: str,
    pool: UnitPool | None,
    units: Sequence[Unit],
) -> float:
    """Δ of ``units`` on ``text`` recomputed in float32 (see :func:`recheck_fp32`)."""
    return recheck_fp32(lm_or_spec, text, units, pool=pool).delta_fp32

"""The float32 re-check of a bfloat16/float16 run: Δ of the final set with float32 weights.

A collapse found in low precision could be overflow rather than the units' role, so a run
that was not float32 re-measures the final set in float32. No float32 copy of the model is
made: :func:`float32_forward` upcasts each decoder layer (and each weight-holding module
outside the layers: embeddings, final norm, LM head) in place just before its forward and
casts it back right after. bfloat16 → float32 → bfloat16 (and float16 → float32 → float16)
is exact, so the run's weights come back bit for bit, and the extra memory is one layer in
float32 at a time (about 0.9 GB for a Llama-3-8B layer) instead of 32 GB for a copy.

Offloaded weights (``meta`` outside their forward) cannot be upcast in place: the model is
then reloaded in float32 from its spec, once.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from achilles.config import ModelSpec
from achilles.method.identify import MaskEvaluator
from achilles.model.adapters import layer_list
from achilles.model.batching import is_oom
from achilles.model.derive import get_adapter
from achilles.model.hooks import around_forward
from achilles.model.loading import LoadedModel, load_model, tokenize
from achilles.model.units import Unit, UnitPool, build_pool

if TYPE_CHECKING:
    from achilles.method.identify import Identification

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fp32Check:
    """Δ of a set recomputed with float32 weights."""

    n_units: int
    dtype_run: str | None
    """The run's dtype; ``None`` for a spec that named none (the device default)."""
    delta_fp32: float
    finite: bool
    baseline_nll_fp32: float
    method: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _low_precision(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.dtype != torch.float32


def upcast_groups(
    model: torch.nn.Module, *, low_precision_only: bool = True
) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
    """What :func:`float32_forward` upcasts one at a time: the decoder layers (with their
    submodules), and every module outside them holding weights of its own (low-precision
    ones only, unless ``low_precision_only=False``, as a planner sizing a run wants)."""
    layers = list(layer_list(model, get_adapter(model)))
    inside = {id(m) for layer in layers for m in layer.modules()}
    others = [
        m for m in model.modules()
        if id(m) not in inside
        and any(
            t is not None and (_low_precision(t) or not low_precision_only)
            for t in (*m._parameters.values(), *m._buffers.values())
        )
    ]
    return layers, others


Cast = list[tuple[dict[str, Any], str, torch.dtype]]


def _upcast(module: torch.nn.Module, recurse: bool) -> Cast:
    """Upcast every low-precision parameter and buffer of ``module`` (and, with ``recurse``,
    of its submodules) in place.

    Returns what to restore: ``(store, name, original dtype)`` for each tensor changed.
    """
    done: Cast = []
    for m in module.modules() if recurse else (module,):
        for store in (m._parameters, m._buffers):
            for name, t in store.items():
                if t is not None and _low_precision(t):
                    done.append((store, name, t.dtype))
                    _set(store, name, t, t.data.float())
    return done


def _restore(done: Cast) -> None:
    for store, name, dtype in done:
        t = store[name]
        _set(store, name, t, t.data.to(dtype))


def _set(store: dict[str, Any], name: str, t: torch.Tensor, value: torch.Tensor) -> None:
    if isinstance(t, torch.nn.Parameter):
        t.data = value  # same Parameter object: tied weights stay tied
    else:
        store[name] = value


@contextmanager
def float32_forward(model: torch.nn.Module) -> Iterator[None]:
    """Run the block with every forward of ``model`` in float32, without a float32 copy.

    Each decoder layer (and each weight-holding module outside the layers) is upcast in place
    just before its forward and restored to its own dtypes right after; the embedding's
    float32 output makes every activation downstream float32. Raises ``ValueError`` for
    offloaded (``meta``) weights.
    """
    if any(p.device.type == "meta" for p in model.parameters()):
        raise ValueError("offloaded weights cannot be upcast in place")
    saved: dict[int, Cast] = {}
    layer_groups, others = upcast_groups(model)
    groups = layer_groups + others
    layers = {id(m) for m in layer_groups}

    def up(m: torch.nn.Module) -> None:
        # a layer with everything in it; a module outside the layers with its own tensors only
        saved[id(m)] = _upcast(m, recurse=id(m) in layers)

    def down(m: torch.nn.Module) -> None:
        _restore(saved.pop(id(m), []))

    try:
        with around_forward(groups, up, down):
            yield
    finally:
        for m in groups:  # a forward that never reached its post-hook
            down(m)


def recheck_fp32(
    lm_or_spec: LoadedModel | ModelSpec,
    text: str,
    units: Sequence[Unit],
    *,
    pool: UnitPool | None = None,
    input_ids: torch.Tensor | None = None,
) -> Fp32Check:
    """Δ of ``units`` on ``text`` with float32 weights.

    Args:
        lm_or_spec: the run's loaded model (upcast in place one layer at a time; used as is
            when already float32; reloaded in float32 when its weights are offloaded), or
            the :class:`ModelSpec` to load in float32.
        text: the text Δ is measured on.
        units: the set to mask.
        pool: the unit pool (default: built from the units' component kinds).
        input_ids: the text's token ids, when a prepared run has them (default: tokenized).
    """
    if isinstance(lm_or_spec, ModelSpec):
        dtype_run = lm_or_spec.dtype
        lm32 = load_model(dataclasses.replace(lm_or_spec, dtype="float32"))
        ctx: AbstractContextManager[None]
        how, ctx = "reloaded", nullcontext()
    else:
        lm = lm_or_spec
        dtype_run = str(lm.dtype).removeprefix("torch.")
        if lm.dtype == torch.float32:
            lm32, how, ctx = lm, "as run", nullcontext()
        elif any(p.device.type == "meta" for p in lm.model.parameters()):
            spec = dataclasses.replace(lm.spec, dtype="float32")
            lm32, how, ctx = load_model(spec, tokenizer=lm.tokenizer), "reloaded", nullcontext()
        else:
            lm32, how, ctx = lm, "in-place upcast", float32_forward(lm.model)
    if pool is None:
        kinds = sorted({u.component for u in units}) or None
        pool = build_pool(lm32.model, components=kinds)
    units = pool.validate(list(units), source="the unit set")
    ids = tokenize(lm32.tokenizer, text) if input_ids is None else input_ids
    with ctx:
        ev = MaskEvaluator(lm32.model, pool, ids, batch_size=1)
        m = ev.measure([units])[0]
    logger.info("fp32 recheck (%s): Δ = %s over %d units", how, m.delta, len(units))
    return Fp32Check(len(units), dtype_run, m.delta, math.isfinite(m.delta), ev.baseline_nll, how)


def fp32_check(
    lm: LoadedModel, text: str, pool: UnitPool, result: Identification, *,
    input_ids: torch.Tensor | None = None,
) -> dict[str, Any] | None:
    """Δ of the final set (minimal, else critical) of a non-float32 run, re-measured in float32.

    See :func:`recheck_fp32`. ``agree`` says whether float32 gives the same verdict (Δ ≥ ε
    or not) as the run's dtype. Returns ``None`` when no set was found. An out-of-memory
    error is recorded (``error``), not raised: the run's result stands.
    """
    units = result.minimal_set or result.critical_set
    if not units:
        return None
    which = "minimal" if result.minimal_set else "critical"
    delta_run = result.delta_minimal if result.minimal_set else result.delta_critical
    record: dict[str, Any] = {
        "dtype_run": str(lm.dtype).removeprefix("torch."),
        "set": which,
        "n": len(units),
        "epsilon": result.epsilon,
        "delta_run": delta_run,
    }
    try:
        check = recheck_fp32(lm, text, units, pool=pool, input_ids=input_ids)
    except Exception as e:  # noqa: BLE001 - only out-of-memory is recorded, the rest raises
        if not is_oom(e):
            raise
        logger.warning("fp32 check skipped: out of memory for the float32 layers")
        record.update(delta_fp32=None, agree=None, error="out of memory for the float32 model")
        return record
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    eps = result.epsilon
    record.update(
        delta_fp32=check.delta_fp32,
        baseline_nll_fp32=check.baseline_nll_fp32 / result.tokens,
        model_fp32=check.method,
        agree=(delta_run is not None and delta_run >= eps) == (check.delta_fp32 >= eps),
    )
    logger.info(
        "fp32 check: Δ %s=%.4g, float32=%.4g", record["dtype_run"], delta_run, check.delta_fp32
    )
    return record

"""Compression that spares the critical units: perplexity with and without their weights protected.

For each method: (a) the original model, (b) the method applied to every ``Linear``/``Conv1D``
weight of the decoder layers (embeddings and the LM head are left alone, as GPTQ/AWQ/Wanda
do), (c) the same with the critical units' weights protected, (d) the same with as many
random units of the same component kinds protected, over several seeds (the control).
Perplexity comes from one shared :class:`~achilles.evaluation.perplexity.PerplexityEvaluator`.

Weights are compressed in place and restored from a float copy after each evaluation; the
copy of the decoder's matrices costs one model's worth of host memory in the source dtype.
"""

from __future__ import annotations

import logging
import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from tqdm.auto import tqdm

from achilles.errors import AchillesError
from achilles.evaluation.perplexity import PerplexityEvaluator
from achilles.method.ranking.perturbation import decoder
from achilles.model.adapters import layer_list
from achilles.model.derive import get_adapter
from achilles.model.hooks import observed_io
from achilles.model.units import Unit, UnitPool
from achilles.results.envelope import Enveloped
from achilles.weights.compress.methods import Method
from achilles.weights.compress.ownership import keep_masks, weights_of

logger = logging.getLogger(__name__)


@dataclass
class CompressionResult(Enveloped):
    """Perplexity of the original and of each compression, with and without protection."""

    KIND = "compression"

    baseline: dict[str, Any]
    methods: dict[str, dict[str, Any]]
    protected: dict[str, Any]

    def fields(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
            "protected": self.protected,
            "methods": self.methods,
        }


def compressible(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """``Linear``/``Conv1D`` modules of the decoder layers, by dotted name."""
    adapter = get_adapter(model)
    out = {}
    for li, layer in enumerate(layer_list(model, adapter)):
        for name, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D":
                out[f"{adapter.layers}.{li}.{name}"] = mod
    if not out:
        raise AchillesError("the model's decoder layers hold no Linear/Conv1D weight to compress")
    return out


def _rows_view(mod: torch.nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` view of a weight-shaped tensor (``Conv1D`` stores ``[in, out]``)."""
    return t if isinstance(mod, torch.nn.Linear) else t.t()


@torch.no_grad()
def input_norms(
    model: torch.nn.Module, modules: dict[str, torch.nn.Module], calib_ids: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``‖x_j‖₂`` over the calibration tokens of every input feature of each module (Wanda)."""
    sq: dict[str, torch.Tensor] = {}

    def acc(name: str):  # noqa: ANN202 - closure
        def fn(x: torch.Tensor, _out: torch.Tensor) -> None:
            s = x.detach().float().pow(2).reshape(-1, x.shape[-1]).sum(0).cpu()
            sq[name] = sq[name] + s if name in sq else s

        return fn

    embed = cast(Any, model).get_input_embeddings()
    with observed_io(model, {n: acc(n) for n in modules}):
        decoder(model)(input_ids=calib_ids.to(embed.weight.device), use_cache=False)
    return {n: v.sqrt() for n, v in sq.items()}


def random_units(pool: UnitPool, like: Sequence[Unit], seed: int) -> list[Unit]:
    """One random unit of the same component kind per unit of ``like``, none of ``like``."""
    rng = random.Random(seed)
    taken = {u.key for u in like}
    by_kind: dict[str, list[int]] = {}
    for i, s in enumerate(pool.sites):
        by_kind.setdefault(s.component, []).append(i)
    out: list[Unit] = []
    for u in like:
        sites = by_kind.get(u.component)
        if not sites:
            raise AchillesError(f"the pool has no {u.component} units to draw a random control from")
        n = sum(pool.sites[i].width for i in sites)
        if n <= sum(1 for v in like if v.component == u.component) * 2:
            raise AchillesError(f"too few {u.component} units in the pool for a random control")
        while True:
            s = pool.sites[rng.choice(sites)]
            cand = Unit(s.module, rng.randrange(s.width), s.layer, s.component)
            if cand.key not in taken:
                taken.add(cand.key)
                out.append(cand)
                break
    return out


class _Compressor:
    """Applies a method to every compressible weight of a model and restores the originals."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.modules = compressible(model)
        self.originals = {n: cast(torch.Tensor, m.weight).detach().clone() for n, m in self.modules.items()}

    @torch.no_grad()
    def apply(self, method: Method, keep: dict[str, torch.Tensor],
              x_norms: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        changed = total = kept = 0
        for name, mod in self.modules.items():
            orig = self.originals[name]
            k = keep.get(f"{name}.weight")
            k = k.to(orig.device) if k is not None else torch.zeros_like(orig, dtype=torch.bool)
            w32 = _rows_view(mod, orig).float()
            new = method.apply(w32, _rows_view(mod, k), None if x_norms is None else x_norms[name].to(w32.device))
            new = _rows_view(mod, new).to(orig.dtype)
            new = torch.where(k, orig, new)  # protected: the source bits, whatever the cast did
            if not torch.equal(new[k], orig[k]):
                raise RuntimeError(f"protected weights of {name} changed")  # pragma: no cover
            cast(torch.Tensor, mod.weight).copy_(new)
            changed += int((new != orig).sum())
            total += orig.numel()
            kept += int(k.sum())
        return {"weights": total, "weights_changed": changed, "weights_protected": kept,
                "fraction_changed": changed / total}

    @torch.no_grad()
    def restore(self) -> None:
        for name, mod in self.modules.items():
            cast(torch.Tensor, mod.weight).copy_(self.originals[name])


def _ppl(res: Any) -> dict[str, Any]:
    s = res.summary()
    return {k: s[k] for k in ("nll", "ppl", "log10_ppl", "tokens", "nonfinite_windows")}


def compress_experiment(
    model: torch.nn.Module,
    pool: UnitPool,
    units: Sequence[Unit],
    evaluator: PerplexityEvaluator,
    methods: Sequence[Method],
    *,
    seeds: int = 3,
    calib_ids: torch.Tensor | None = None,
    progress: bool = False,
) -> CompressionResult:
    """Perplexity of (a) ``model``, and per method (b) whole, (c) ``units`` protected,
    (d) as many random units protected (``seeds`` draws). ``model`` is restored on return."""
    if not units:
        raise AchillesError("the mask is empty: there are no critical units to protect")
    if seeds < 1:
        raise AchillesError("--seeds must be >= 1 (the random-protection control)")
    if any(m.needs_activations for m in methods) and calib_ids is None:
        raise AchillesError("wanda needs calibration text")
    comp = _Compressor(model)
    critical = weights_of(model, units)
    controls = [random_units(pool, units, seed) for seed in range(seeds)]
    keeps = {"critical": keep_masks(model, critical)}
    control_keeps = [keep_masks(model, weights_of(model, c)) for c in controls]
    x_norms = input_norms(model, comp.modules, calib_ids) if calib_ids is not None and any(
        m.needs_activations for m in methods) else None
    total = 1 + len(methods) * (2 + seeds)
    bar = tqdm(total=total, desc="compress", disable=not progress)
    baseline = _ppl(evaluator.evaluate())
    bar.update()
    results: dict[str, dict[str, Any]] = {}
    try:
        for m in methods:
            xn = x_norms if m.needs_activations else None
            row: dict[str, Any] = {"method": m.name}
            for label, keep in (("whole", {}), ("critical", keeps["critical"])):
                stats = comp.apply(m, keep, xn)
                row[label] = {**_ppl(evaluator.evaluate()), **stats}
                comp.restore()
                bar.update()
            row["random"] = []
            for seed, keep in enumerate(control_keeps):
                stats = comp.apply(m, keep, xn)
                row["random"].append({"seed": seed, **_ppl(evaluator.evaluate()), **stats})
                comp.restore()
                bar.update()
            logs = [r["log10_ppl"] for r in row["random"]]
            finite = all(math.isfinite(x) for x in logs)
            row["random_log10_ppl_mean"] = statistics.fmean(logs)  # non-finite stays non-finite
            row["random_log10_ppl_sd"] = statistics.stdev(logs) if finite and len(logs) > 1 else None
            results[m.name] = row
            logger.info("%s: log10 ppl whole %.4f, critical protected %.4f, random protected %.4f",
                        m.name, row["whole"]["log10_ppl"], row["critical"]["log10_ppl"],
                        row["random_log10_ppl_mean"])
    finally:
        comp.restore()
        bar.close()
    protected = {
        "n_units": len(units),
        "units": [u.to_dict() for u in units],
        "n_weight_slices": len(critical),
        "n_weights": int(sum(int(k.sum()) for k in keeps["critical"].values())),
        "random_units": [[u.to_dict() for u in c] for c in controls],
        "random_n_weights": [int(sum(int(k.sum()) for k in ck.values())) for ck in control_keeps],
    }
    return CompressionResult(baseline=baseline, methods=results, protected=protected)

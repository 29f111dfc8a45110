"""Which weights belong to a unit, per component kind (see ``docs/compression.md``).

A unit's weights are the weight slices that produce it or that only it feeds:

=========================================  ===============================================
kind                                       its weights
=========================================  ===============================================
``attn.q/k/v/qkv/o``, ``mlp.gate/up/down``  the output row of the projection (column of a
``mlp.gate_up``                            GPT-2 ``Conv1D``); ``attn.o``/``mlp.down`` rows
                                           write one residual-stream channel
``mlp.act``, ``mlp.neuron``                the gate and up rows producing the neuron (Phi-3:
                                           rows ``c`` and ``d_ff + c`` of ``gate_up_proj``)
                                           and the column of the down projection reading it
``norm.*``                                 the gain (and bias) entry of the norm
=========================================  ===============================================

Slices are expressed on parameters (``dim`` 0 = row, 1 = column, in the stored layout), so
the same list drives protection during compression and the quantizer keep-list.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch

from achilles.errors import AchillesError
from achilles.model.derive import get_adapter
from achilles.model.hooks import split_site
from achilles.model.units import Unit


@dataclass(frozen=True, order=True)
class WeightSlice:
    """Row (``dim`` 0) or column (``dim`` 1) ``index`` of parameter ``param`` (entry, if 1-D)."""

    param: str
    dim: int
    index: int


def _is_conv1d(mod: torch.nn.Module) -> bool:
    return type(mod).__name__ == "Conv1D"


def _out_slices(model: torch.nn.Module, path: str, c: int) -> list[WeightSlice]:
    """The weight slice (and bias entry) producing output channel ``c`` of ``path``."""
    mod = model.get_submodule(path)
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise AchillesError(f"{path} has no weight: no weights belong to its channels")
    if w.dim() == 1 or isinstance(mod, torch.nn.Linear):
        dim = 0
    elif _is_conv1d(mod):
        dim = 1
    else:
        raise AchillesError(f"no rule for the weights of a {type(mod).__name__} ({path})")
    out = [WeightSlice(f"{path}.weight", dim, c)]
    if getattr(mod, "bias", None) is not None:
        out.append(WeightSlice(f"{path}.bias", 0, c))
    return out


def _in_slice(model: torch.nn.Module, path: str, c: int) -> WeightSlice:
    """The weight column of ``path`` reading its input channel ``c``."""
    mod = model.get_submodule(path)
    if isinstance(mod, torch.nn.Linear):
        return WeightSlice(f"{path}.weight", 1, c)
    if _is_conv1d(mod):
        return WeightSlice(f"{path}.weight", 0, c)
    raise AchillesError(f"no rule for the input weights of a {type(mod).__name__} ({path})")


def _neuron_slices(model: torch.nn.Module, layer: int, c: int) -> list[WeightSlice]:
    adapter = get_adapter(model)
    at = f"{adapter.layers}.{layer}."
    comp = adapter.components
    out: list[WeightSlice] = []
    for kind in ("mlp.gate", "mlp.up"):
        if kind in comp:
            out += _out_slices(model, at + comp[kind], c)
    if "mlp.gate_up" in comp:  # Phi-3: gate is the first half, up the second
        path = at + comp["mlp.gate_up"]
        half = cast(int, model.get_submodule(path).out_features) // 2
        out += _out_slices(model, path, c) + _out_slices(model, path, half + c)
    out.append(_in_slice(model, at + split_site(comp["mlp.down"])[0], c))
    return out


def unit_slices(model: torch.nn.Module, unit: Unit) -> list[WeightSlice]:
    """The weight slices that belong to ``unit`` (``unit.layer``/``component`` must be set)."""
    if unit.component in ("mlp.act", "mlp.neuron"):
        return _neuron_slices(model, unit.layer, unit.channel)
    path, is_input = split_site(unit.module)
    if is_input:
        return [_in_slice(model, path, unit.channel)]
    return _out_slices(model, path, unit.channel)


def weights_of(model: torch.nn.Module, units: Sequence[Unit]) -> list[WeightSlice]:
    """The union of :func:`unit_slices` over ``units``, sorted, without duplicates."""
    return sorted({s for u in units for s in unit_slices(model, u)})


def keep_masks(model: torch.nn.Module, slices: Sequence[WeightSlice]) -> dict[str, torch.Tensor]:
    """Boolean masks (True = protected) per parameter, in the parameter's stored layout."""
    masks: dict[str, torch.Tensor] = {}
    for s in slices:
        p = model.get_parameter(s.param)
        m = masks.get(s.param)
        if m is None:
            m = masks[s.param] = torch.zeros(p.shape, dtype=torch.bool)
        m.narrow(s.dim, s.index, 1).fill_(True)
    return masks

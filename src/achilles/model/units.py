"""Units (neurons) and the unit pool.

A unit is one **output channel of one module**: ``(module, channel)``, with the layer index
and component kind carried along for reports. Token positions are never separate units; a
mask zeroes the channel at every position of every batch row.

A :class:`UnitPool` is the ordered list of :class:`Site` (hookable modules with their
widths) that a ranking covers. Units are addressed by a flat index: the pool concatenates
the channels of its sites in order, so rankings are plain ``topk`` over one vector.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, cast

import torch

from achilles.errors import AchillesError
from achilles.model.adapters import COMPONENT_KINDS, ArchAdapter, layer_list
from achilles.model.derive import get_adapter
from achilles.model.hooks import split_site


@dataclass(frozen=True, order=True)
class Unit:
    """One neuron: output ``channel`` of the module at dotted path ``module``."""

    module: str
    channel: int
    layer: int = -1
    component: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "layer": self.layer,
            "component": self.component,
            "channel": self.channel,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Unit:
        """Build a unit; a channel that is not a whole number (``113.7``, ``"7"``) is a ``ValueError``."""
        ch = d["channel"]
        if isinstance(ch, bool) or not isinstance(ch, int):
            raise ValueError(f"channel {ch!r} is not an integer")
        if not isinstance(d["module"], str):
            raise ValueError(f"module {d['module']!r} is not a string")
        return cls(
            module=d["module"],
            channel=ch,
            layer=int(d.get("layer", -1)),
            component=str(d.get("component", "")),
        )

    @property
    def key(self) -> tuple[str, int]:
        """Identity of the unit: ``(module, channel)``."""
        return (self.module, self.channel)

    def __str__(self) -> str:
        return f"L{self.layer}.{self.component}[{self.channel}]"


@dataclass(frozen=True)
class Site:
    """A module whose output channels are units: its path, layer, kind and width."""

    module: str
    layer: int
    component: str
    width: int


@dataclass(frozen=True)
class UnitPool:
    """The ordered sites a ranking covers; units are addressed by a flat index."""

    model_type: str
    sites: tuple[Site, ...]
    components: tuple[str, ...]

    @cached_property
    def offsets(self) -> torch.Tensor:
        """``offsets[i]`` is the flat index of site ``i``'s channel 0 (length ``len(sites)+1``)."""
        widths = torch.tensor([0] + [s.width for s in self.sites], dtype=torch.long)
        return torch.cumsum(widths, 0)

    @cached_property
    def by_module(self) -> dict[str, int]:
        return {s.module: i for i, s in enumerate(self.sites)}

    @property
    def n_units(self) -> int:
        return int(self.offsets[-1])

    @cached_property
    def fingerprint(self) -> str:
        """A hash of the model type and every site's path and width.

        Two models with the same architecture and shapes share it; a ranking made on a
        different architecture or size does not match.
        """
        h = hashlib.sha256(self.model_type.encode())
        for s in self.sites:
            h.update(f"|{s.module}:{s.width}".encode())
        return h.hexdigest()[:16]

    def unit(self, flat_index: int) -> Unit:
        """The unit at ``flat_index``."""
        i = int(torch.searchsorted(self.offsets, torch.tensor(flat_index), right=True)) - 1
        s = self.sites[i]
        return Unit(s.module, flat_index - int(self.offsets[i]), s.layer, s.component)

    def units(self, flat_indices: Iterable[int]) -> list[Unit]:
        idx = torch.as_tensor(list(flat_indices), dtype=torch.long)
        site_idx = torch.searchsorted(self.offsets, idx, right=True) - 1
        out = []
        for f, i in zip(idx.tolist(), site_idx.tolist(), strict=True):
            s = self.sites[i]
            out.append(Unit(s.module, f - int(self.offsets[i]), s.layer, s.component))
        return out

    def validate(self, units: Sequence[Unit], source: str = "ranking") -> list[Unit]:
        """Check every unit exists in this pool's model; return them with layer/kind filled."""
        known = {s.module: s for s in self.sites}
        out = []
        seen: set[tuple[str, int]] = set()
        for u in units:
            if u.key in seen:
                raise AchillesError(f"{source} lists unit {u} twice: each unit may appear once")
            seen.add(u.key)
            s = known.get(u.module)
            if s is None:
                raise AchillesError(
                    f"{source} names module {u.module!r}, which this model does not have in the "
                    f"unit pool: it was made for another model (or another --pool)"
                )
            if not 0 <= u.channel < s.width:
                raise AchillesError(
                    f"{source} names channel {u.channel} of {u.module!r}, which has {s.width} "
                    "channels: it was made for another model"
                )
            out.append(Unit(u.module, u.channel, s.layer, s.component))
        return out

    def summary(self) -> dict[str, Any]:
        per_kind: dict[str, int] = {}
        for s in self.sites:
            per_kind[s.component] = per_kind.get(s.component, 0) + s.width
        return {
            "model_type": self.model_type,
            "components": list(self.components),
            "n_modules": len(self.sites),
            "n_layers": len({s.layer for s in self.sites}),
            "n_units": self.n_units,
            "units_per_component": per_kind,
            "fingerprint": self.fingerprint,
        }


def resolve_components(
    adapter: ArchAdapter, pool: str = "paper", components: Sequence[str] | None = None
) -> tuple[str, ...]:
    """The component kinds selected by ``--pool`` or an explicit ``--components`` list."""
    if not components:
        return adapter.preset(pool)
    for c in components:
        if c not in COMPONENT_KINDS:
            raise AchillesError(
                f"unknown component {c!r}: choose from {', '.join(COMPONENT_KINDS)}"
            )
        if c not in adapter.components:
            raise AchillesError(
                f"component {c!r} does not exist in this architecture; it has "
                f"{', '.join(adapter.components)}"
            )
    return tuple(dict.fromkeys(components))


def _output_width(module: torch.nn.Module) -> int | None:
    """Output width from the module's parameters, or ``None`` if it has none."""
    if isinstance(module, torch.nn.Linear):
        return module.out_features
    nf = getattr(module, "nf", None)  # transformers' Conv1D
    if isinstance(nf, int):
        return nf
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 1:
        return int(w.shape[0])
    return None


def _input_width(module: torch.nn.Module) -> int | None:
    """Input width of a ``Linear`` or ``Conv1D`` (weight ``[in, out]``)."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features
    if type(module).__name__ == "Conv1D":
        return int(cast(torch.Tensor, module.weight).shape[0])
    return None


def _activation_width(layer: torch.nn.Module, adapter: ArchAdapter, kind: str) -> int:
    """Width of a parameter-free module (an activation) from the MLP projection feeding it."""
    for src in ("mlp.gate", "mlp.up"):
        if src in adapter.components:
            w = _output_width(layer.get_submodule(adapter.components[src]))
            if w is not None:
                return w
    if "mlp.gate_up" in adapter.components:
        w = _output_width(layer.get_submodule(adapter.components["mlp.gate_up"]))
        if w is not None:
            return w // 2
    raise AchillesError(f"cannot infer the width of {kind}: the adapter has no MLP projection")


def build_pool(
    model: torch.nn.Module, pool: str = "paper", components: Sequence[str] | None = None
) -> UnitPool:
    """Resolve the unit pool of ``model`` through its architecture adapter."""
    adapter = get_adapter(model)
    kinds = resolve_components(adapter, pool, components)
    prefix = adapter.layers
    sites = []
    for li, layer in enumerate(layer_list(model, adapter)):
        for kind in kinds:
            rel = adapter.components[kind]
            path, is_input = split_site(rel)
            try:
                mod = layer.get_submodule(path)
            except AttributeError:
                raise AchillesError(
                    f"layer {li} has no module {path!r} ({kind}); the adapter does not match "
                    "this model's code"
                ) from None
            width = _input_width(mod) if is_input else _output_width(mod)
            if width is None and not is_input:
                width = _activation_width(layer, adapter, kind)
            if width is None:
                raise AchillesError(f"cannot tell the width of {rel!r} ({kind})")
            sites.append(Site(f"{prefix}.{li}.{rel}", li, kind, width))
    return UnitPool(cast(Any, model.config).model_type, tuple(sites), kinds)

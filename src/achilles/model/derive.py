"""Which adapter a model gets (:func:`get_adapter`): its table row, else one derived from its module tree.

A decoder that spells its layers exactly like a known family gets that family's adapter
(:mod:`achilles.model.adapters`), with the path of its own layer list. The known spellings, tried on
every homogeneous ``ModuleList`` of the model:

============  ===============================================================================
``gemma2``    ``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, four norms:
              ``input_layernorm``, ``post_attention_layernorm``, ``pre_feedforward_layernorm``,
              ``post_feedforward_layernorm``
``llama``     the same projections, two norms: ``input_layernorm``, ``post_attention_layernorm``
``gpt2``      ``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``, ``ln_1``, ``ln_2``
``gpt_neox``  ``attention.query_key_value``, ``attention.dense``, ``mlp.dense_h_to_4h``,
              ``mlp.dense_4h_to_h``, ``input_layernorm``, ``post_attention_layernorm``
============  ===============================================================================

A layout matches only if every one of its modules exists in layer 0 and nothing with weights
is left over: a module holding parameters outside the attention block that the layout does
not place (a third norm, an extra projection) means the layer computes something
the layout does not describe, so the model is refused instead of guessed. Extra weights
*inside* the attention block (per-head ``q_norm``/``k_norm``, attention sinks) are allowed:
the projections' outputs are still exactly the units. The activation
module (``mlp.act_fn`` / ``mlp.act``) is optional: without it the ``mlp.act`` kind is dropped.

Mixture-of-experts layers are refused: their experts are routed per token, so a channel of
one expert is not a unit of the dense pool (it is not computed for every token), and masking
a fused expert tensor's channel is not a channel of any module output.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, replace

import torch

from achilles.errors import AchillesError
from achilles.model.adapters import (
    _GEMMA2,
    _GPT2,
    _LLAMA,
    _NEOX,
    ArchAdapter,
    supported_model_types,
    table_row,
)
from achilles.model.hooks import split_site

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """A known spelling: its name, the adapter it yields, and its optional module kinds."""

    name: str
    adapter: ArchAdapter
    optional: tuple[str, ...] = ("mlp.act",)

    def modules(self) -> dict[str, str]:
        """Component kind -> module path (``:input`` sites name their module)."""
        return {k: split_site(v)[0] for k, v in self.adapter.components.items()}


LAYOUTS: tuple[Layout, ...] = (
    Layout("gemma2", _GEMMA2),  # before llama: llama's modules are a subset of Gemma-2's
    Layout("llama", _LLAMA),
    Layout("gpt2", _GPT2),
    Layout("gpt_neox", _NEOX),
)

_EXPERT_CONFIG_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")

_DERIVED: weakref.WeakKeyDictionary[torch.nn.Module, ArchAdapter] = weakref.WeakKeyDictionary()


def _holds_params(module: torch.nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def _expert_modules(model: torch.nn.Module) -> list[str]:
    """Paths of modules that look like routed experts (by name or class name)."""
    found = []
    for name, m in model.named_modules():
        leaf = name.rsplit(".", 1)[-1].lower()
        cls = type(m).__name__.lower()
        if "expert" in leaf or "expert" in cls or "moe" in cls:
            found.append(name)
    return found


def _moe_reason(model: torch.nn.Module) -> str | None:
    """Why ``model`` is a mixture of experts, or ``None``."""
    config = getattr(model, "config", None)
    for key in _EXPERT_CONFIG_KEYS:
        n = getattr(config, key, None)
        if isinstance(n, int) and not isinstance(n, bool) and n > 1:
            return f"its config sets {key} = {n}"
    modules = _expert_modules(model)
    if modules:
        return f"it has expert modules ({modules[0]})"
    return None


def _match(layer: torch.nn.Module, layout: Layout) -> tuple[ArchAdapter | None, str, int]:
    """The adapter ``layout`` gives for ``layer``, else ``None``, what does not fit, and how
    many of the layout's modules are missing (0 when all exist but others are left over)."""
    present = dict(layer.named_modules())
    wanted = layout.modules()
    missing = list(dict.fromkeys(
        p for k, p in wanted.items() if p not in present and k not in layout.optional))
    if missing:
        return None, f"no {', '.join(missing)}", len(missing)
    kept = {k: v for k, v in layout.adapter.components.items() if split_site(v)[0] in present}
    placed = {split_site(v)[0] for v in kept.values()}
    inside_attention = layout.adapter.attention + "."
    unplaced = [
        name for name, m in layer.named_modules()
        if name and name not in placed and not name.startswith(inside_attention)
        and _holds_params(m)
    ]
    if unplaced:
        return None, f"modules with weights it does not place: {', '.join(unplaced[:4])}", 0
    if kept.keys() == layout.adapter.components.keys():
        return layout.adapter, "", 0
    paper = tuple(k for k in layout.adapter.paper if k in kept)
    return replace(layout.adapter, components=kept, paper=paper), "", 0


def _layer_lists(model: torch.nn.Module) -> list[tuple[str, torch.nn.ModuleList]]:
    """Non-empty ``ModuleList`` s whose entries all have one class (candidate layer lists)."""
    return [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, torch.nn.ModuleList) and len(m) > 0
        and len({type(c) for c in m}) == 1
    ]


def derive_adapter(model: torch.nn.Module) -> tuple[ArchAdapter, str, str]:
    """Map ``model``'s module tree onto a known layout: ``(adapter, layout name, layer path)``.

    Raises :class:`AchillesError` (one line) for mixture-of-experts models, for trees that
    match no layout, and for trees where more than one layer list matches.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    moe = _moe_reason(model)
    if moe is not None:
        raise AchillesError(
            f"model_type {model_type!r} is a mixture of experts ({moe}): its experts are routed "
            "per token, so a channel of one expert is not a unit of the dense pool; critical "
            "neurons are searched in dense decoders only"
        )
    matches: list[tuple[str, Layout, ArchAdapter]] = []
    misses: list[tuple[int, str]] = []
    lists = _layer_lists(model)
    for path, layers in lists:
        for layout in LAYOUTS:
            adapter, why, n_missing = _match(layers[0], layout)
            if adapter is not None:
                got = adapter if adapter.layers == path else replace(adapter, layers=path)
                matches.append((path, layout, got))
                break
            if n_missing < len(layout.modules()) // 2:  # most of the layout is there
                misses.append((n_missing, f"{layout.name} at {path}: {why}"))
    if len(matches) == 1:
        path, layout, adapter = matches[0]
        return adapter, layout.name, path
    known = ", ".join(supported_model_types())
    if len(matches) > 1:
        where = "; ".join(f"{lay.name} at {p}" for p, lay, _ in matches)
        raise AchillesError(
            f"model_type {model_type!r} is not in the table and several layer lists match a "
            f"known layout ({where}); register the right one with "
            f"achilles.register_adapter({model_type!r}, ArchAdapter(layers=..., components=..., "
            "paper=...))"
        )
    near = [why for _, why in sorted(misses)]
    layer0 = ""
    if lists:
        names = [n for n, c in lists[0][1][0].named_modules() if n and not list(c.children())]
        layer0 = f"; its first layer list {lists[0][0]} holds " + ", ".join(names[:10]) + (
            ", ..." if len(names) > 10 else "")
    raise AchillesError(
        f"unsupported architecture {model_type!r}: it is not in the table ({known}) and its "
        "module tree matches no known layout (llama, gemma2, gpt2, gpt_neox)"
        + (f" ({near[0]})" if near else "") + layer0
        + f"; register one with achilles.register_adapter({model_type!r}, "
        "ArchAdapter(layers=..., components=..., paper=...))"
    )


def derived_adapter(model: torch.nn.Module) -> ArchAdapter:
    """:func:`derive_adapter` once per model, saying in one log line what it derived and why."""
    adapter = _DERIVED.get(model)
    if adapter is None:
        adapter, layout, path = derive_adapter(model)
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        logger.warning(
            "model_type %r is not in the table; derived the %s layout from its module tree "
            "(layers at %s)", model_type, layout, path,
        )
        _DERIVED[model] = adapter
    return adapter


def get_adapter(model: torch.nn.Module) -> ArchAdapter:
    """The adapter for ``model``: its ``config.model_type`` row, else one derived from its tree.

    A type missing from the table is mapped by :func:`derive_adapter` (once per
    model, logged in one line) or refused with one line saying why.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    adapter = table_row(model_type)
    if adapter is not None:
        return adapter
    return derived_adapter(model)

"""Architecture adapters: where each component kind lives in each Hugging Face family.

One declarative table maps a model's ``config.model_type`` to an :class:`ArchAdapter`: the
path of the decoder-layer list and, for each *component kind*, the path of the module
(relative to one decoder layer) whose **output** channels are the units of that kind.
Nothing here guesses from name substrings, and nothing here touches hooks.

Component kinds (the vocabulary shared by the CLI, results and reports):

=============  ====================================================================
``attn.q``     query projection output          (Llama ``self_attn.q_proj``)
``attn.k``     key projection output
``attn.v``     value projection output
``attn.qkv``   fused q/k/v projection output    (Phi-3 ``qkv_proj``, GPT-2 ``c_attn``)
``attn.o``     attention output projection      (``o_proj``; a residual-stream channel)
``mlp.gate``   gate projection output           (an MLP intermediate unit, pre-activation)
``mlp.up``     up projection output
``mlp.gate_up`` fused gate/up projection output (Phi-3)
``mlp.act``    activation-function output
``mlp.down``   down projection output           (a residual-stream channel)
``mlp.neuron`` input of the down projection      (``act(gate) · up``: the classic MLP neuron)
``norm.attn``  norm in front of attention       (``input_layernorm``)
``norm.mlp``   norm in front of the MLP         (``post_attention_layernorm`` in Llama)
=============  ====================================================================

``mlp.neuron`` is a module *input* (path ``mlp.down_proj:input``, hooked by a pre-hook): in
gated MLPs no module outputs ``act(gate) · up``. It is in ``--pool all`` and ``--components``
only; for GPT-2 and GPT-NeoX it equals ``mlp.act``.

Gemma-2 has extra norms around each sub-block; its ``post_attention_layernorm`` normalises
the attention *output* (kind ``norm.attn_out``), and its MLP input norm is
``pre_feedforward_layernorm`` (``norm.mlp``).

Each adapter also lists ``paper``: exactly the tensors the reference implementation hooks for
that family (its name filter keeps leaves whose dotted name contains ``mlp``, ``ffn``,
``feed_forward``, ``attention`` or ``self_attn``), minus exact duplicates such as Phi-3's
``resid_mlp_dropout`` (identity on ``down_proj``'s output in eval mode).

A ``model_type`` missing from the table is mapped from its module tree when the tree spells
one of the known layouts exactly (:mod:`achilles.model.derive`: Llama, Gemma-2, GPT-2, GPT-NeoX);
mixture-of-experts models are refused. To support any other family, call
:func:`register_adapter` with its ``model_type``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from achilles.errors import AchillesError

COMPONENT_KINDS: tuple[str, ...] = (
    "attn.q",
    "attn.k",
    "attn.v",
    "attn.qkv",
    "attn.o",
    "mlp.gate",
    "mlp.up",
    "mlp.gate_up",
    "mlp.act",
    "mlp.down",
    "mlp.neuron",
    "norm.attn",
    "norm.mlp",
    "norm.attn_out",
    "norm.mlp_out",
)

POOL_PRESETS: tuple[str, ...] = ("paper", "mlp", "down", "all")


@dataclass(frozen=True)
class ArchAdapter:
    """How one Hugging Face family spells its decoder layers.

    Attributes:
        layers: dotted path, from the ``*ForCausalLM`` root, of the ``ModuleList`` of layers.
        components: component kind -> module path relative to one layer.
        paper: the kinds the reference code hooks for this family (``--pool paper``).
        attention: path, relative to one layer, of the attention module (``achilles explain``
            reads its attention probabilities; its ``attn.o`` input is split by head).
        mlp: path, relative to one layer, of the MLP module whose output joins the residual.
    """

    layers: str
    components: Mapping[str, str]
    paper: tuple[str, ...]
    notes: str = ""
    attention: str = "self_attn"
    mlp: str = "mlp"

    def __post_init__(self) -> None:
        unknown = set(self.components) - set(COMPONENT_KINDS)
        if unknown:
            raise ValueError(f"unknown component kinds {sorted(unknown)}")
        missing = set(self.paper) - set(self.components)
        if missing:
            raise ValueError(f"paper pool names kinds the adapter lacks: {sorted(missing)}")
        object.__setattr__(self, "components", MappingProxyType(dict(self.components)))

    def preset(self, name: str) -> tuple[str, ...]:
        """The component kinds of a ``--pool`` preset, in table order."""
        if name == "paper":
            return self.paper
        if name == "mlp":
            return tuple(k for k in self.components if k.startswith("mlp.") and k != "mlp.neuron")
        if name == "down":
            return ("mlp.down",)
        if name == "all":
            return tuple(self.components)
        raise AchillesError(f"unknown pool {name!r}: choose one of {', '.join(POOL_PRESETS)}")


_LLAMA_COMPONENTS = {
    "attn.q": "self_attn.q_proj",
    "attn.k": "self_attn.k_proj",
    "attn.v": "self_attn.v_proj",
    "attn.o": "self_attn.o_proj",
    "mlp.gate": "mlp.gate_proj",
    "mlp.up": "mlp.up_proj",
    "mlp.act": "mlp.act_fn",
    "mlp.down": "mlp.down_proj",
    "mlp.neuron": "mlp.down_proj:input",
    "norm.attn": "input_layernorm",
    "norm.mlp": "post_attention_layernorm",
}
_LLAMA_PAPER = (
    "attn.q", "attn.k", "attn.v", "attn.o",
    "mlp.gate", "mlp.up", "mlp.act", "mlp.down", "norm.mlp",
)  # fmt: skip

_LLAMA = ArchAdapter(layers="model.layers", components=_LLAMA_COMPONENTS, paper=_LLAMA_PAPER)

_GEMMA2 = ArchAdapter(
    layers="model.layers",
    components={
        **{k: v for k, v in _LLAMA_COMPONENTS.items() if k != "norm.mlp"},
        "norm.attn_out": "post_attention_layernorm",
        "norm.mlp": "pre_feedforward_layernorm",
        "norm.mlp_out": "post_feedforward_layernorm",
    },
    # The reference filter matches post_attention_layernorm ("attention" is a substring) but
    # not pre/post_feedforward_layernorm ("feedforward" is not "feed_forward").
    paper=(*_LLAMA_PAPER[:-1], "norm.attn_out"),
)

_PHI3 = ArchAdapter(
    layers="model.layers",
    components={
        "attn.qkv": "self_attn.qkv_proj",
        "attn.o": "self_attn.o_proj",
        "mlp.gate_up": "mlp.gate_up_proj",
        "mlp.act": "mlp.activation_fn",
        "mlp.down": "mlp.down_proj",
        "mlp.neuron": "mlp.down_proj:input",
        "norm.attn": "input_layernorm",
        "norm.mlp": "post_attention_layernorm",
    },
    paper=("attn.qkv", "attn.o", "mlp.gate_up", "mlp.act", "mlp.down", "norm.mlp"),
    notes="resid_mlp_dropout duplicates mlp.down_proj in eval mode and is left out.",
)

_GPT2 = ArchAdapter(
    layers="transformer.h",
    components={
        "attn.qkv": "attn.c_attn",
        "attn.o": "attn.c_proj",
        "mlp.up": "mlp.c_fc",
        "mlp.act": "mlp.act",
        "mlp.down": "mlp.c_proj",
        "mlp.neuron": "mlp.c_proj:input",
        "norm.attn": "ln_1",
        "norm.mlp": "ln_2",
    },
    # GPT-2's attention modules are named "attn.*", which none of the reference filter's
    # substrings matches; it hooks only the MLP (mlp.dropout duplicates mlp.c_proj).
    paper=("mlp.up", "mlp.act", "mlp.down"),
    notes="Conv1D layers: weight is [in, out]. The reference filter hooks only GPT-2's MLP.",
    attention="attn",
)

_NEOX = ArchAdapter(
    layers="gpt_neox.layers",
    components={
        "attn.qkv": "attention.query_key_value",
        "attn.o": "attention.dense",
        "mlp.up": "mlp.dense_h_to_4h",
        "mlp.act": "mlp.act",
        "mlp.down": "mlp.dense_4h_to_h",
        "mlp.neuron": "mlp.dense_4h_to_h:input",
        "norm.attn": "input_layernorm",
        "norm.mlp": "post_attention_layernorm",
    },
    # post_attention_dropout / post_mlp_dropout duplicate attention.dense / the MLP output.
    paper=("attn.qkv", "attn.o", "mlp.up", "mlp.act", "mlp.down", "norm.mlp"),
    attention="attention",
)

REFERENCE_FILTER: tuple[str, ...] = ("mlp", "ffn", "feed_forward", "attention", "self_attn")
"""The substrings of the reference implementation's name filter (a hooked leaf contains one)."""


def reference_paper_kinds(components: Mapping[str, str]) -> tuple[str, ...]:
    """The kinds, in table order, that the reference name filter hooks: ``--pool paper``.

    A kind is in when the module path of its output contains a :data:`REFERENCE_FILTER`
    substring; ``path:input`` sites (``mlp.neuron``) are never hooked by the reference.
    """
    return tuple(
        kind for kind, rel in components.items()
        if not rel.endswith(":input") and any(f in rel for f in REFERENCE_FILTER)
    )


_GEMMA3 = ArchAdapter(
    layers="model.layers",
    components=_GEMMA2.components,
    paper=_GEMMA2.paper,
    notes="Gemma3RMSNorm scales by 1 + w. q_norm/k_norm act per head (shared over heads): "
          "no channel of theirs is a unit, so they are not sites.",
)

_OLMO2_COMPONENTS = {
    **{k: v for k, v in _LLAMA_COMPONENTS.items() if not k.startswith("norm.")},
    "norm.attn_out": "post_attention_layernorm",
    "norm.mlp_out": "post_feedforward_layernorm",
}
_OLMO2 = ArchAdapter(
    layers="model.layers",
    components=_OLMO2_COMPONENTS,
    paper=reference_paper_kinds(_OLMO2_COMPONENTS),
    notes="Norms come after attention and the MLP (no input norms). The reference filter would "
          "also hook self_attn.q_norm/k_norm; they are not sites here.",
)

_GRANITE = ArchAdapter(
    layers="model.layers",
    components=_LLAMA_COMPONENTS,
    paper=_LLAMA_PAPER,
    notes="The embedding, attention, residual and logit multipliers are scalars inside the "
          "forward pass: they scale but never mix channels, so a zeroed channel stays zero.",
)

_PHI_COMPONENTS = {
    "attn.q": "self_attn.q_proj",
    "attn.k": "self_attn.k_proj",
    "attn.v": "self_attn.v_proj",
    "attn.o": "self_attn.dense",
    "mlp.up": "mlp.fc1",
    "mlp.act": "mlp.activation_fn",
    "mlp.down": "mlp.fc2",
    "mlp.neuron": "mlp.fc2:input",
    "norm.attn": "input_layernorm",
}
_PHI = ArchAdapter(
    layers="model.layers",
    components=_PHI_COMPONENTS,
    paper=reference_paper_kinds(_PHI_COMPONENTS),
    notes="Attention and MLP run in parallel on one LayerNorm (input_layernorm, kind norm.attn, "
          "feeds both). resid_dropout is identity in eval mode. With qk_layernorm the per-head "
          "q/k LayerNorms are not sites.",
)

_STARCODER2_COMPONENTS = {
    **{k: v for k, v in _LLAMA_COMPONENTS.items() if k.startswith("attn.")},
    "mlp.up": "mlp.c_fc",
    "mlp.act": "mlp.act",
    "mlp.down": "mlp.c_proj",
    "mlp.neuron": "mlp.c_proj:input",
    "norm.attn": "input_layernorm",
    "norm.mlp": "post_attention_layernorm",
}
_STARCODER2 = ArchAdapter(
    layers="model.layers",
    components=_STARCODER2_COMPONENTS,
    paper=reference_paper_kinds(_STARCODER2_COMPONENTS),
    notes="Linear layers with biases (not GPT-2's Conv1D) and LayerNorms with biases.",
)

_ADAPTERS: dict[str, ArchAdapter] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA3,
    "olmo2": _OLMO2,
    "smollm3": _LLAMA,
    "granite": _GRANITE,
    "phi": _PHI,
    "phi3": _PHI3,
    "starcoder2": _STARCODER2,
    "gpt2": _GPT2,
    "gpt_neox": _NEOX,
}


def register_adapter(model_type: str, adapter: ArchAdapter, *, overwrite: bool = False) -> None:
    """Register ``adapter`` for models whose ``config.model_type`` is ``model_type``."""
    if model_type in _ADAPTERS and not overwrite:
        raise ValueError(f"an adapter for {model_type!r} exists; pass overwrite=True to replace it")
    _ADAPTERS[model_type] = adapter


def table_row(model_type: str | None) -> ArchAdapter | None:
    """The table's adapter for ``model_type`` (``None`` when the table has no row for it)."""
    return _ADAPTERS.get(model_type) if model_type is not None else None


def supported_model_types() -> tuple[str, ...]:
    """The ``model_type`` values that have an adapter."""
    return tuple(sorted(_ADAPTERS))


def layer_list(model: torch.nn.Module, adapter: ArchAdapter) -> torch.nn.ModuleList:
    """The decoder-layer ``ModuleList`` named by ``adapter.layers``."""
    try:
        layers = model.get_submodule(adapter.layers)
    except AttributeError:
        raise AchillesError(
            f"model has no module {adapter.layers!r}; its adapter does not match this model"
        ) from None
    if not isinstance(layers, torch.nn.ModuleList):
        raise AchillesError(f"{adapter.layers!r} is not a ModuleList of decoder layers")
    return layers


NORM_GAIN_OFFSET: Mapping[str, float] = MappingProxyType({
    "LayerNorm": 0.0,
    "LlamaRMSNorm": 0.0,
    "MistralRMSNorm": 0.0,
    "Qwen2RMSNorm": 0.0,
    "Qwen3RMSNorm": 0.0,
    "Phi3RMSNorm": 0.0,
    "SmolLM3RMSNorm": 0.0,
    "GraniteRMSNorm": 0.0,
    "Olmo2RMSNorm": 0.0,
    "GemmaRMSNorm": 1.0,
    "Gemma2RMSNorm": 1.0,
    "Gemma3RMSNorm": 1.0,
})
"""Norm class name -> ``o`` where the norm's output channel ``c`` is ``(o + w_c) · x̂_c (+ b_c)``.

Gemma's RMSNorm (Gemma 1, 2 and 3) scales by ``1 + w``, so its channel is zeroed by ``w_c = -1`` (exact: ``1 + -1``
is 0 in every float format), not by ``w_c = 0``. A weight edit of a norm class missing here is
refused rather than guessed (:func:`achilles.model.masking.weight_edits`).
"""

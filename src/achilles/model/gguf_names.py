"""Hugging Face parameter names -> GGUF tensor names, as data.

llama.cpp's converter renames every weight (``model.layers.11.mlp.down_proj.weight`` becomes
``blk.11.ffn_down.weight``) and, for the ``llama`` architecture only, permutes the rows of the
query and key projections for its rotary kernel. This module holds both facts as tables, per
GGUF architecture (the file's ``general.architecture``), and the row map the permutation
implies. Nothing here reads a file or imports torch.

GGUF stores a 2-D weight with its dimensions reversed: ``ne[0]`` is the row length (torch's
``in_features``) and ``ne[1]`` the number of rows (``out_features``). A torch row is a GGUF row,
a run of ``ne[0]`` contiguous elements; a torch column is one element in every GGUF row.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

LLAMA_NAMES: Mapping[str, str] = MappingProxyType({
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
})
"""Module path inside one Llama-style decoder layer -> GGUF tensor base name (``blk.N.<base>``)."""

QWEN3_NAMES: Mapping[str, str] = MappingProxyType({
    **LLAMA_NAMES,
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
})


@dataclass(frozen=True)
class GGUFArch:
    """How llama.cpp's converter stores one architecture's decoder layers.

    Attributes:
        hf_layers: dotted path of the decoder-layer list in the transformers model.
        names: module path inside one layer -> GGUF tensor base name.
        permuted: base names whose rows the converter permuted for rotary embeddings.
    """

    hf_layers: str
    names: Mapping[str, str]
    permuted: tuple[str, ...] = ()


GGUF_ARCHS: Mapping[str, GGUFArch] = MappingProxyType({
    # convert_hf_to_gguf.py LlamaModel.modify_tensors permutes q_proj/k_proj (and their biases)
    "llama": GGUFArch("model.layers", LLAMA_NAMES, permuted=("attn_q", "attn_k")),
    # Qwen2Model / Qwen3Model keep the Hugging Face row order
    "qwen2": GGUFArch("model.layers", LLAMA_NAMES),
    "qwen3": GGUFArch("model.layers", QWEN3_NAMES),
})
"""GGUF ``general.architecture`` -> its layout. Only these are exported byte-exactly; others
(Gemma stores its norm gains as ``1 + w``, GPT-2 fuses q/k/v) are refused, not guessed."""

HF_TO_GGUF_ARCH: Mapping[str, str] = MappingProxyType({
    "llama": "llama",
    "mistral": "llama",  # llama.cpp converts Mistral as "llama" (permuted q/k)
    "qwen2": "qwen2",
    "qwen3": "qwen3",
})
"""transformers ``config.model_type`` -> the GGUF architecture llama.cpp converts it to."""

_PARAM = re.compile(r"^(?P<layers>.+)\.(?P<layer>\d+)\.(?P<module>.+)\.(?P<kind>weight|bias)$")


def gguf_tensor_name(param: str, arch: str) -> str | None:
    """The GGUF tensor holding the transformers parameter ``param``, or ``None`` if unmapped.

    ``model.layers.11.mlp.down_proj.weight`` -> ``blk.11.ffn_down.weight`` for ``llama``.
    """
    layout = GGUF_ARCHS.get(arch)
    m = _PARAM.match(param)
    if layout is None or m is None or m["layers"] != layout.hf_layers:
        return None
    base = layout.names.get(m["module"])
    return None if base is None else f"blk.{m['layer']}.{base}.{m['kind']}"


def gguf_module_name(module: str, arch: str) -> str | None:
    """The GGUF tensor name stem (no ``.weight``) of a transformers module path, if mapped."""
    name = gguf_tensor_name(f"{module}.weight", arch)
    return None if name is None else name.removesuffix(".weight")


def is_permuted(tensor: str, arch: str) -> bool:
    """Whether the converter permuted ``tensor``'s rows (Llama's ``attn_q``/``attn_k``)."""
    layout = GGUF_ARCHS.get(arch)
    parts = tensor.split(".")
    return layout is not None and len(parts) == 4 and parts[2] in layout.permuted


def permuted_row(row: int, n_rows: int, n_heads: int) -> int:
    """The GGUF row holding Hugging Face row ``row`` of a rotary-permuted q/k projection.

    llama.cpp's ``permute`` reshapes the rows as ``[heads, 2, head_dim/2]`` and swaps the last
    two axes, so HF row ``(h, s, j)`` (head, half, index in the half) lands at GGUF row
    ``(h, j, s)``. ``n_heads`` is the number of query heads for ``attn_q`` and of key/value
    heads for ``attn_k``.
    """
    if n_heads <= 0 or n_rows % (2 * n_heads):
        raise ValueError(f"{n_rows} rows do not split into {n_heads} heads of two halves")
    head_dim = n_rows // n_heads
    half = head_dim // 2
    h, rem = divmod(row, head_dim)
    s, j = divmod(rem, half)
    return h * head_dim + 2 * j + s


LLAMA_QUANTIZE_TYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k", "q4_k")
"""Types offered for the keep-list's llama-quantize overrides (``ggml_type_name``, lowercase)."""


def tensor_type_overrides(modules: list[str], model_type: str, qtype: str = "q8_0") -> dict[str, object] | None:
    """llama-quantize ``--tensor-type`` overrides keeping ``modules``' weights at ``qtype``.

    ``modules`` are transformers module paths (a keep-list's ``modules``). llama-quantize
    lowercases each ``PATTERN=TYPE``, then matches PATTERN as a regular expression
    (``std::regex_search``) against every full tensor name (``blk.11.ffn_down.weight``), the
    last match winning. Each pattern here is that one name, dots escaped and anchored
    (``^blk\\.11\\.ffn_down\\.weight$``), so it can match no other tensor (an unescaped
    ``blk.1.ffn_down`` is a regex that other names could match too) and holds no character a
    shell would expand. ``None`` when the family has no GGUF name table.
    """
    arch = HF_TO_GGUF_ARCH.get(model_type)
    if arch is None:
        return None
    if qtype not in LLAMA_QUANTIZE_TYPES:
        raise ValueError(f"unknown llama-quantize type {qtype!r}")
    tensors = []
    for m in modules:
        name = gguf_tensor_name(f"{m}.weight", arch)
        if name is None:
            raise ValueError(f"{m} has no GGUF name for {arch}")
        tensors.append(name)
    patterns = ["^" + re.escape(t) + "$" for t in tensors]
    return {
        "architecture": arch,
        "type": qtype,
        "tensors": tensors,
        "tensor_types": [f"{p}={qtype}" for p in patterns],
        "llama_quantize_args": [a for p in patterns for a in ("--tensor-type", f"{p}={qtype}")],
    }

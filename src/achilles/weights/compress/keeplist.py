"""A keep-list for quantizers: the weights of the critical units that must stay high precision.

Per unit: the weight rows/columns that belong to it (:mod:`achilles.weights.compress.ownership`).
Per model: the modules holding them, in the forms transformers' quantization configs take
(``llm_int8_skip_modules`` for bitsandbytes, ``modules_to_not_convert`` for AWQ/GPTQ/others:
full dotted names, which match exactly), plus the output embedding, which those configs skip
by default and a user-supplied list would otherwise drop; and, for families with a GGUF name
table, llama.cpp's ``llama-quantize --tensor-type`` overrides for the same tensors
(:func:`achilles.model.gguf_names.tensor_type_overrides`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch

from achilles.model.gguf_names import tensor_type_overrides
from achilles.model.units import Unit
from achilles.results.envelope import envelope
from achilles.weights.compress.ownership import unit_slices


def _output_embedding_name(model: torch.nn.Module) -> str | None:
    head = cast(Any, model).get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((n for n, m in model.named_modules() if m is head), None) if head is not None else None


def keep_list(model: torch.nn.Module, units: Sequence[Unit], *, gguf_type: str = "q8_0",
              run_id: str | None = None) -> dict[str, Any]:
    """The keep-list of ``units`` (works on a meta-device model: only names and shapes), of
    the run ``run_id`` (the mask's; ``None`` for a set made before run ids).

    ``gguf_type``: the type the ``llama_quantize`` overrides keep the modules at (``None``
    there when the family has no GGUF name table).
    """
    entries = []
    modules: dict[str, None] = {}
    for u in units:
        weights = []
        for s in unit_slices(model, u):
            module, _, pname = s.param.rpartition(".")
            p = model.get_parameter(s.param)
            layout = "[out, in]" if p.dim() == 2 and type(model.get_submodule(module)).__name__ != "Conv1D" else (
                "[in, out]" if p.dim() == 2 else "[features]")
            what = {0: "row", 1: "column"}[s.dim] if p.dim() == 2 else "entry"
            weights.append({"module": module, "param": pname, what: s.index, "shape": list(p.shape),
                            "layout": layout})
            if pname == "weight" and p.dim() == 2:
                modules[module] = None
        entries.append({**u.to_dict(), "weights": weights})
    head = _output_embedding_name(model)
    skip = sorted(modules) + ([head] if head and head not in modules else [])
    return {
        **envelope("keep_list", run_id=run_id),
        "model_type": cast(Any, model.config).model_type,
        "n_units": len(units),
        "units": entries,
        "modules": sorted(modules),
        "llm_int8_skip_modules": skip,
        "modules_to_not_convert": skip,
        "llama_quantize": tensor_type_overrides(sorted(modules), cast(Any, model.config).model_type, gguf_type),
    }

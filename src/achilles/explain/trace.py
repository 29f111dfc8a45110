"""One traced forward pass of the clean and the masked model, and the residual-stream analysis.

The trace runs two batch rows, row 0 clean and row 1 with the set masked (one
:class:`~achilles.model.masking.ChannelMasker` row each), and records in the same pass:

* the residual stream: the input of the first block (the embeddings, ``layer = -1``) and
  every block's output, float32 on the CPU, ``[2, L+1, T, D]``;
* each head's attention mass on the sink position, averaged over the later query positions
  (needs attention probabilities: see :func:`eager_attention`);
* the patching sources: every layer's ``o_proj`` input (the heads' outputs side by side) and
  every MLP's output, in the model's dtype on their own devices;
* per position: next-token NLL and entropy (float32 from the logits) and the top-1 token.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F

from achilles.errors import AchillesError
from achilles.model.adapters import layer_list
from achilles.model.batching import input_device
from achilles.model.derive import get_adapter
from achilles.model.hooks import hooked, observed_outputs
from achilles.model.masking import ChannelMasker
from achilles.model.units import _input_width

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """Where the residual stream, attention and MLP of each layer live in this model."""

    layers: tuple[str, ...]
    attention: tuple[str, ...]
    o_proj: tuple[str, ...]
    mlp: tuple[str, ...]
    heads: int
    head_dim: int

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @classmethod
    def of(cls, model: torch.nn.Module) -> Layout:
        adapter = get_adapter(model)
        blocks = layer_list(model, adapter)
        if "attn.o" not in adapter.components:
            raise AchillesError("the architecture adapter names no attn.o module: explain needs it")
        layers = tuple(f"{adapter.layers}.{i}" for i in range(len(blocks)))
        o_rel = adapter.components["attn.o"]
        o_mod = blocks[0].get_submodule(o_rel)
        width = _input_width(o_mod)
        heads = int(getattr(model.config, "num_attention_heads", 0) or 0)
        if width is None or heads <= 0 or width % heads:
            raise AchillesError(
                f"cannot split {o_rel!r} by head ({width} inputs, {heads} heads)"
            )
        return cls(
            layers=layers,
            attention=tuple(f"{p}.{adapter.attention}" for p in layers),
            o_proj=tuple(f"{p}.{o_rel}" for p in layers),
            mlp=tuple(f"{p}.{adapter.mlp}" for p in layers),
            heads=heads,
            head_dim=width // heads,
        )


@contextmanager
def eager_attention(model: torch.nn.Module) -> Iterator[bool]:
    """Run the block with eager attention (the only kernel that returns probabilities).

    Yields whether the kernel had to be switched; the model's own kernel (sdpa, flash) is
    restored on exit. Eager attention materialises ``[B, heads, T, T]`` probabilities per
    layer and is slower than fused kernels: achilles uses it for one two-row pass only.
    """
    before = getattr(model.config, "_attn_implementation", None)
    switch = before not in (None, "eager")
    if switch:
        cast(Any, model).set_attn_implementation("eager")
    try:
        yield switch
    finally:
        if switch:
            cast(Any, model).set_attn_implementation(before)


@dataclass
class Trace:
    """What one clean (row 0) + masked (row 1) pass recorded (see the module docstring)."""

    residual: torch.Tensor  # [2, L+1, T, D] float32 CPU; index 0 = embeddings
    sink: torch.Tensor  # [2, L, H] float32 CPU
    o_inputs: list[torch.Tensor]  # per layer [2, T, H*head_dim], model dtype, module device
    mlp_outputs: list[torch.Tensor]  # per layer [2, T, D]
    nll: torch.Tensor  # [2, T-1] float32 CPU
    entropy: torch.Tensor  # [2, T-1] float32 CPU
    top1: torch.Tensor  # [2, T-1] long CPU
    eager_switched: bool


@torch.no_grad()
def trace(
    model: torch.nn.Module,
    layout: Layout,
    input_ids: torch.Tensor,
    masker: ChannelMasker,
    sink_position: int,
    mask_modules: list[str] | None = None,
) -> Trace:
    """The two-row traced pass; ``masker`` must hold an empty row 0 and the set in row 1."""
    L = layout.n_layers
    resid: list[torch.Tensor | None] = [None] * (L + 1)
    sink: list[torch.Tensor | None] = [None] * L
    o_in: list[torch.Tensor | None] = [None] * L
    mlp_out: list[torch.Tensor | None] = [None] * L

    def keep_resid(i: int):  # noqa: ANN202 - closure
        def fn(x: torch.Tensor) -> None:
            resid[i] = x.detach().float().cpu()

        return fn

    def keep(store: list, i: int):  # noqa: ANN202, ANN001 - closure
        def fn(x: torch.Tensor) -> None:
            store[i] = x.detach().clone()

        return fn

    def keep_sink(i: int):  # noqa: ANN202 - closure
        def fn(out: object) -> None:
            w = out[1] if isinstance(out, tuple) and len(out) > 1 else None
            if not isinstance(w, torch.Tensor):
                raise AchillesError(
                    f"{layout.attention[i]} returned no attention probabilities in eager mode; "
                    "explain cannot measure attention sinks for this model"
                )
            # [B, H, Tq, Tk]: mass on the sink key, mean over the queries after it
            sink[i] = w[:, :, sink_position + 1 :, sink_position].float().mean(-1).cpu()

        return fn

    fns = {f"{layout.layers[0]}:input": keep_resid(0)}
    for i in range(L):
        fns[layout.layers[i]] = keep_resid(i + 1)
        fns[f"{layout.o_proj[i]}:input"] = keep(o_in, i)
        fns[layout.mlp[i]] = keep(mlp_out, i)
    ids = input_ids.expand(2, -1).to(input_device(model))
    with eager_attention(model) as switched, masker.installed(mask_modules), hooked(model, fns), \
            observed_outputs(model, {layout.attention[i]: keep_sink(i) for i in range(L)}):
        logits = model(input_ids=ids, use_cache=False).logits  # [2, T, V]
    nll, ent, top1 = [], [], []
    targets = ids[0, 1:]
    for r in range(2):
        lg = logits[r, :-1].float()  # [T-1, V]
        logp = F.log_softmax(lg, -1)
        nll.append(-logp.gather(-1, targets.to(lg.device)[:, None])[:, 0].cpu())
        ent.append(-(logp.exp() * logp).sum(-1).cpu())
        top1.append(lg.argmax(-1).cpu())
    return Trace(
        residual=torch.stack([torch.stack([r[b] for r in resid]) for b in range(2)]),  # type: ignore[index]
        sink=torch.stack(sink, 1),  # type: ignore[arg-type]
        o_inputs=o_in,  # type: ignore[arg-type]
        mlp_outputs=mlp_out,  # type: ignore[arg-type]
        nll=torch.stack(nll),
        entropy=torch.stack(ent),
        top1=torch.stack(top1),
        eager_switched=switched,
    )


def massive_activations(
    residual: torch.Tensor, *, ratio: float, min_abs: float, top: int
) -> tuple[list[dict], torch.Tensor]:
    """Flag massive activations in one row's residual stream ``[L+1, T, D]``.

    Per layer the median |h| over every position and channel is the yardstick; per position
    the ``top`` largest |h| channels are candidates, flagged when ``|h| ≥ ratio · median``
    and ``|h| ≥ min_abs``. Returns the flagged entries (``layer`` -1 = embeddings) and the
    per-layer medians.
    """
    mag = residual.abs()
    med = mag.flatten(1).median(1).values  # [L+1]
    vals, chans = mag.topk(min(top, mag.shape[-1]), dim=-1)  # [L+1, T, k]
    r = vals / med[:, None, None].clamp_min(torch.finfo(torch.float32).tiny)
    out = []
    flag = (r >= ratio) & (vals >= min_abs)
    for layer, pos, k in flag.nonzero().tolist():
        c = int(chans[layer, pos, k])
        out.append({
            "layer": layer - 1, "position": pos, "channel": c,
            "value": float(residual[layer, pos, c]), "ratio": float(r[layer, pos, k]),
        })
    out.sort(key=lambda d: (-d["ratio"], d["layer"]))
    return out, med


def residual_profile(residual: torch.Tensor, sink_position: int, top: int = 3) -> dict:
    """Per layer: the ``top`` largest |h| at the sink position, the largest elsewhere, median."""
    mag = residual.abs()  # [L+1, T, D]
    at = mag[:, sink_position].topk(min(top, mag.shape[-1]), -1).values
    rest = torch.cat([mag[:, :sink_position], mag[:, sink_position + 1 :]], 1)
    rest_top = rest.flatten(1).topk(min(top, rest[0].numel()), -1).values if rest.shape[1] else at * 0
    return {
        "sink_top": at.tolist(),
        "rest_top": rest_top.tolist(),
        "median": mag.flatten(1).median(1).values.tolist(),
    }


SPLIT_JUMP = 0.5
"""A flagged run of layers is split where the clean value jumps, between consecutive layers,
by at least this fraction of its magnitude more than the masked value does: a new writer."""


def _spans(layers: list[int], clean: torch.Tensor, masked: torch.Tensor) -> list[list[int]]:
    """Split sorted flagged ``layers`` into spans: at a gap, or where the writer changes.

    ``clean`` and ``masked`` are the channel's values at the position, per layer ``[L+1]``
    (index 0 = embeddings). The writer changes at layer ``l`` when the clean jump from
    ``l-1`` differs from the masked jump by ``SPLIT_JUMP`` of the larger |clean| value of the
    two layers: what a layer adds there is removed (or added) by the mask.
    """
    spans: list[list[int]] = []
    for layer in layers:
        i = layer + 1
        new = not spans or layer != spans[-1][-1] + 1
        if not new:
            jump = float((clean[i] - clean[i - 1]) - (masked[i] - masked[i - 1]))
            new = abs(jump) >= SPLIT_JUMP * float(torch.maximum(clean[i].abs(), clean[i - 1].abs()))
        if new:
            spans.append([layer])
        else:
            spans[-1].append(layer)
    return spans


def massive_groups(
    clean: list[dict], residual_clean: torch.Tensor, residual: torch.Tensor, med_masked: torch.Tensor,
    ratio: float, min_abs: float, erase_factor: float = 10.0,
) -> list[dict]:
    """Massive activations as spans of layers, each erased by the mask or surviving it.

    ``clean`` are the clean run's flags; ``residual_clean`` and ``residual`` the clean and
    masked rows ``[L+1, T, D]``. The flagged layers of one (position, channel) are split into
    spans at a gap or where the writer changes (:func:`_spans`), so an early activation and a
    later, separately written one in the same channel are judged apart. A span is ``erased``
    when the mask divides its value at its peak layer by ``erase_factor`` or more
    (``reduction`` = |clean| / |masked| there); ``survives`` is its negation.
    ``masked_peak_ratio`` is the largest masked |h| / median over the span's layers.
    ``positions`` lists, for each span, the positions where the same channel has a span
    overlapping it in layers with the same fate (erased or not), this one included.
    """
    flags: dict[tuple[int, int], dict[int, dict]] = {}
    for m in clean:
        flags.setdefault((m["position"], m["channel"]), {})[m["layer"]] = m
    out = []
    n_layers = residual.shape[0] - 1
    tiny = torch.finfo(torch.float32).tiny
    for (pos, ch), by_layer in flags.items():
        vc, vm = residual_clean[:, pos, ch], residual[:, pos, ch]
        masked_ratio = vm.abs() / med_masked.clamp_min(tiny)
        for layers in _spans(sorted(by_layer), vc, vm):
            peak = max((by_layer[x] for x in layers), key=lambda m: m["ratio"])
            masked_value = float(vm[peak["layer"] + 1])
            reduction = abs(peak["value"]) / abs(masked_value) if masked_value else math.inf
            idx = torch.tensor([x + 1 for x in layers])
            erased = layers[-1] + 1 if layers[-1] + 1 < n_layers else None
            out.append({
                "position": pos, "channel": ch, "first_layer": layers[0], "last_layer": layers[-1],
                "layers": layers, "erased_at": erased, "peak_layer": peak["layer"],
                "peak_value": peak["value"], "peak_ratio": peak["ratio"],
                "masked_value": masked_value,
                "masked_peak_ratio": float(masked_ratio[idx].max()),
                "reduction": reduction,
                "erased": reduction >= erase_factor,
                "survives": reduction < erase_factor,
            })
    for g in out:
        g["positions"] = sorted({
            o["position"] for o in out
            if o["channel"] == g["channel"] and o["erased"] == g["erased"]
            and o["first_layer"] <= g["last_layer"] and g["first_layer"] <= o["last_layer"]
        })
    out.sort(key=lambda g: (-g["peak_ratio"], g["first_layer"]))
    return out

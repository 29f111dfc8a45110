"""Activation patching over components: each head's slice of the ``o_proj`` input, each MLP output.

A component is restored in one batch row by replacing its activation with a *source* value
(the clean run's when denoising a masked model, the masked run's when noising a clean one);
every row of a batch patches its own components, so ``L·(H+1)`` single-component patches
take ``L·(H+1)`` rows, batched. NLL is float32 from the logits (:func:`sequence_nll`).

A head's contribution to the residual stream is ``W_o[:, slice_h] · x[slice_h]`` where
``x`` is the ``o_proj`` input and ``slice_h`` the head's ``head_dim`` channels (query heads:
under GQA every query head has its own slice); the contributions of all heads plus the bias
sum to the attention output (:func:`head_contributions`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from achilles.explain.trace import Layout
from achilles.method.metrics import sequence_nll
from achilles.model.batching import choose_batch_size, run_batched
from achilles.model.hooks import hooked
from achilles.model.masking import ChannelMasker


@dataclass(frozen=True, order=True)
class Component:
    """A head (``head`` ≥ 0: its slice of the ``o_proj`` input) or an MLP (``head`` = -1)."""

    layer: int
    head: int = -1

    @property
    def name(self) -> str:
        return f"L{self.layer}.mlp" if self.head < 0 else f"L{self.layer}.attn.h{self.head}"

    @classmethod
    def parse(cls, name: str) -> Component:
        layer, rest = name[1:].split(".", 1)
        return cls(int(layer), -1 if rest == "mlp" else int(rest.removeprefix("attn.h")))


def all_components(layout: Layout) -> list[Component]:
    """Every head of every layer, then the layer's MLP, layer by layer."""
    return [
        Component(i, h) for i in range(layout.n_layers) for h in [*range(layout.heads), -1]
    ]


def head_contributions(
    o_proj: torch.nn.Module, x: torch.Tensor, heads: int, only: Sequence[int] | None = None
) -> torch.Tensor:
    """Each head's write into the residual stream: ``[..., n, D]`` from ``x [..., H*hd]``.

    Head ``h``'s write is ``o_proj(x_h) - o_proj(0)``, with ``x_h`` zero outside the head's
    slice: the module is called, not its weight read, so offloaded (``meta``) weights and
    ``Conv1D`` work as they do in the forward pass; the bias belongs to no head. ``only``
    picks the heads (default: all).
    """
    picked = list(range(heads)) if only is None else list(only)
    hd = x.shape[-1] // heads
    keep = torch.zeros(len(picked), x.shape[-1], dtype=torch.bool, device=x.device)
    for i, h in enumerate(picked):
        keep[i, h * hd : (h + 1) * hd] = True
    xs = x.unsqueeze(-2) * keep.to(x.dtype)  # [..., n, H*hd]
    return o_proj(xs) - o_proj(torch.zeros_like(x[..., :1, :]).unsqueeze(-2))


class ComponentPatcher:
    """Per-row component patches: row ``r`` takes ``sources`` on the components of ``rows[r]``.

    Args:
        layout: the model's layout.
        o_sources: per layer, the ``o_proj`` input ``[T, H*hd]`` to patch in.
        mlp_sources: per layer, the MLP output ``[T, D]`` to patch in.
    """

    def __init__(
        self, layout: Layout, o_sources: Sequence[torch.Tensor], mlp_sources: Sequence[torch.Tensor]
    ) -> None:
        self.layout = layout
        self.sources = {f"{p}:input": s for p, s in zip(layout.o_proj, o_sources, strict=True)}
        self.sources.update(dict(zip(layout.mlp, mlp_sources, strict=True)))
        self._masks: dict[str, torch.Tensor] = {}

    def set_rows(self, rows: Sequence[Sequence[Component]]) -> None:
        masks: dict[str, torch.Tensor] = {}
        hd = self.layout.head_dim
        for r, comps in enumerate(rows):
            for c in comps:
                site = self.layout.mlp[c.layer] if c.head < 0 else f"{self.layout.o_proj[c.layer]}:input"
                src = self.sources[site]
                m = masks.get(site)
                if m is None:
                    m = masks[site] = torch.zeros(len(rows), src.shape[-1], dtype=torch.bool)
                if c.head < 0:
                    m[r] = True
                else:
                    m[r, c.head * hd : (c.head + 1) * hd] = True
        self._masks = {k: v.to(self.sources[k].device) for k, v in masks.items()}

    def _hook(self, site: str) -> Callable[[torch.Tensor], torch.Tensor | None]:
        def fn(x: torch.Tensor) -> torch.Tensor | None:
            m = self._masks.get(site)
            if m is None:
                return None
            src = self.sources[site].to(device=x.device, dtype=x.dtype)
            return torch.where(m[: x.shape[0], None, :].to(x.device), src[None], x)

        return fn

    @contextmanager
    def installed(self, model: torch.nn.Module) -> Iterator[None]:
        with hooked(model, {s: self._hook(s) for s in self.sources}):
            yield


def patched_nll(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    patcher: ComponentPatcher,
    rows: Sequence[Sequence[Component]],
    *,
    masker: ChannelMasker | None = None,
    mask_modules: Sequence[str] | None = None,
    batch_size: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> list[float]:
    """Summed NLL of the text with row ``r`` patched on ``rows[r]`` (and ``masker``'s row 0
    mask on every row, when given)."""
    T = int(input_ids.shape[1])
    width = max(s.shape[-1] for s in patcher.sources.values())
    bs = choose_batch_size(model, T, len(rows), width, batch_size)
    out: list[float] = []

    def run(chunk: Sequence[Sequence[Component]]) -> None:
        patcher.set_rows(chunk)
        ids = input_ids.expand(len(chunk), -1)
        if masker is None:
            with patcher.installed(model):
                nll = sequence_nll(model, ids)
        else:
            with masker.installed(mask_modules), patcher.installed(model):
                nll = sequence_nll(model, ids)
        out.extend(nll.tolist())

    run_batched(list(rows), run, bs, on_progress=on_progress)
    return out

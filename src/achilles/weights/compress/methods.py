"""Compression methods behind one interface: ``Method.apply(w, keep, x_norm) -> w'``.

Names: ``rtn-wB`` (round-to-nearest, symmetric absmax, one scale per output channel),
``rtn-wB-gG`` (one scale per group of ``G`` consecutive inputs of an output channel),
``rtn-wB-t`` (one scale per matrix, where one outlier sets everyone's step),
``magnitude-S`` (unstructured: the ``S`` % smallest ``|w|`` of each matrix set to 0) and
``wanda-S`` (Sun et al. 2023: per output row, the ``S`` % smallest ``|w_ij| · ‖x_j‖₂`` set to 0).
``B`` is 2-8 bits, ``S`` a percentage in (0, 100).

Quantization is simulated (fake-quant: quantize then dequantize in float32), because the
question is what the rounding does to the function, and a protected weight must keep its
exact source value *inside* an otherwise quantized row: optimum-quanto and torchao quantize
whole modules (a module can be excluded, a row or column cannot).

Protection (``keep``, True = protected): protected weights are returned bit-identical; they
are left out of the absmax that sets their group's scale (the point of sparing an outlier)
and are never pruned; the pruning budget (``S`` of the matrix, or of each row for Wanda) is
spent on the other weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from achilles.errors import AchillesError

DEFAULT_METHODS = ("rtn-w8", "rtn-w4-g128", "magnitude-50", "wanda-50")

_RTN = re.compile(r"rtn-w(\d+)(?:-g(\d+)|-(t))?")
_PRUNE = re.compile(r"(magnitude|wanda)-(\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class Method:
    """One compression method, parsed from its name."""

    name: str
    kind: Literal["rtn", "magnitude", "wanda"]
    bits: int | None = None
    group: int | None = None
    sparsity: float | None = None
    per_tensor: bool = False

    @property
    def needs_activations(self) -> bool:
        return self.kind == "wanda"

    def apply(
        self, w: torch.Tensor, keep: torch.Tensor | None = None, x_norm: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The compressed copy of ``w [out, in]`` (float32); ``keep`` entries stay bit-identical.

        Args:
            w: weight, output channels as rows.
            keep: bool ``[out, in]``, True = protected (None: nothing protected).
            x_norm: ``‖x_j‖₂`` of each input feature over the calibration tokens (Wanda).
        """
        keep = torch.zeros_like(w, dtype=torch.bool) if keep is None else keep
        if self.kind == "rtn":
            if self.per_tensor:  # one scale for the matrix: a row of one group of all its weights
                new = fake_quant(w.reshape(1, -1), self.bits, exclude=keep.reshape(1, -1)).reshape(w.shape)  # type: ignore[arg-type]
            else:
                new = fake_quant(w, self.bits, self.group, exclude=keep)  # type: ignore[arg-type]
        elif self.kind == "magnitude":
            new = prune(w, w.abs(), self.sparsity, keep, per_row=False)  # type: ignore[arg-type]
        else:
            if x_norm is None:
                raise ValueError("wanda needs the input norms of the calibration tokens")
            new = prune(w, w.abs() * x_norm.unsqueeze(0), self.sparsity, keep, per_row=True)  # type: ignore[arg-type]
        return torch.where(keep, w, new)


def parse_method(name: str) -> Method:
    """``rtn-w4-g128`` -> ``Method(kind="rtn", bits=4, group=128)``; a clear error otherwise."""
    name = name.strip()
    m = _RTN.fullmatch(name)
    if m:
        bits = int(m.group(1))
        if not 2 <= bits <= 8:
            raise AchillesError(f"{name}: bits must be between 2 and 8 (e.g. rtn-w4)")
        group = int(m.group(2)) if m.group(2) else None
        if group is not None and group < 1:
            raise AchillesError(f"{name}: the group size must be >= 1 (e.g. rtn-w4-g128)")
        return Method(name, "rtn", bits=bits, group=group, per_tensor=bool(m.group(3)))
    m = _PRUNE.fullmatch(name)
    if m:
        pct = float(m.group(2))
        if not 0 < pct < 100:
            raise AchillesError(f"{name}: sparsity must be in (0, 100) percent (e.g. wanda-50)")
        return Method(name, m.group(1), sparsity=pct / 100)  # type: ignore[arg-type]
    raise AchillesError(
        f"unknown compression method {name!r}: use rtn-wB[-gG|-t] (B in 2-8 bits, G the group "
        "size, t per tensor), magnitude-S or wanda-S (S the sparsity in percent), e.g. rtn-w4-g128,wanda-50"
    )


def parse_methods(spec: str) -> list[Method]:
    """A comma-separated list of method names, each checked, duplicates removed."""
    names = list(dict.fromkeys(n.strip() for n in spec.split(",") if n.strip()))
    if not names:
        raise AchillesError("--methods is empty: e.g. --methods rtn-w8,rtn-w4-g128,magnitude-50,wanda-50")
    return [parse_method(n) for n in names]


def fake_quant(
    w: torch.Tensor, bits: int, group: int | None = None, *, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric absmax round-to-nearest: ``s = max|w| / (2^(B-1) - 1)``, ``w' = s·round(w/s)``.

    One scale per output row (``group`` None) or per ``group`` consecutive inputs of a row (a
    ragged last group is its own group). ``exclude`` entries do not count in the absmax.
    """
    out_f, in_f = w.shape
    g = in_f if group is None else min(group, in_f)
    pad = (-in_f) % g
    stats = w if exclude is None else w.masked_fill(exclude, 0)
    wg = F.pad(w, (0, pad)).reshape(out_f, -1, g)  # [out, n_groups, g]
    sg = F.pad(stats, (0, pad)).reshape(out_f, -1, g)
    qmax = 2 ** (bits - 1) - 1
    scale = sg.abs().amax(dim=-1, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(wg / scale), -qmax, qmax) * scale
    return q.reshape(out_f, -1)[:, :in_f]


def prune(
    w: torch.Tensor, score: torch.Tensor, sparsity: float, keep: torch.Tensor, *, per_row: bool
) -> torch.Tensor:
    """Zero the ``sparsity`` fraction of lowest-``score`` entries (per row or per matrix).

    Protected entries are never chosen; the count is taken over the whole row (or matrix), so
    protection moves the budget onto other weights instead of lowering the sparsity.
    """
    score = score.masked_fill(keep, float("inf"))
    if per_row:
        k = int(w.shape[1] * sparsity)
        k_row = torch.clamp((~keep).sum(dim=1), max=k)  # a fully protected row prunes nothing
        order = score.argsort(dim=1)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(w.shape[1]).expand_as(order))
        drop = ranks < k_row.unsqueeze(1)
    else:
        k = min(int(w.numel() * sparsity), int((~keep).sum()))
        drop = torch.zeros(w.numel(), dtype=torch.bool)
        drop[score.flatten().argsort()[:k]] = True
        drop = drop.reshape(w.shape)
    return w.masked_fill(drop, 0)

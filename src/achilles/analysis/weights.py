"""The weights behind a critical unit, and whether it is a massive-activation channel.

For a unit that is output channel ``c`` of a ``Linear`` (row ``c`` of ``weight``) or of a
transformers ``Conv1D`` (column ``c``, GPT-2), this module reports:

* the ``top_k`` largest ``|w|`` entries of that row (input index and signed value) and
  ``max|w| / median|w|`` over the row: a **super weight** check (Yu et al. 2024), where a
  single scalar dominates the row that writes a critical channel;
* the **driving input channel** on the text: with the module's input ``x`` captured on a
  clean pass, at the position ``p`` where ``|y_c|`` peaks, the ``j`` maximising
  ``|W[c, j] · x[p, j]|``, its contribution and its share of ``Σ_j |W[c, j] · x[p, j]|``;
* the **massive-activation** check (Sun et al. 2024): ``|y_c[p]|`` divided by the median
  ``|y|`` of the whole module output (all positions, all channels). ``massive`` is
  ``ratio >= MASSIVE_RATIO`` (100×; massive activations in real LLMs are ~10^3-10^4×).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from achilles.model.batching import input_device, weights_on_device
from achilles.model.hooks import recorded
from achilles.model.units import Unit

logger = logging.getLogger(__name__)

WEIGHT_KINDS: tuple[str, ...] = ("mlp.down", "attn.o")
"""Component kinds whose units are residual-stream channels written by one weight row."""

MASSIVE_RATIO = 100.0
"""|output| at the peak over the module's median |output| at or above which a unit is massive."""


@dataclass(frozen=True)
class UnitWeights:
    """Weight row and activation facts of one unit (see the module docstring)."""

    unit: Unit
    top_inputs: list[int]
    top_weights: list[float]
    max_over_median_weight: float
    peak_position: int
    peak_output: float
    driver_input: int
    driver_contribution: float
    driver_share: float
    driver_in_top_weights: bool
    massive_ratio: float
    massive: bool
    delta_row: float | None = None
    """Δ on the text with the unit's whole weight row (and bias entry) zeroed."""
    delta_top_weight: float | None = None
    """Δ on the text with only the row's largest |w| zeroed (the super-weight ablation)."""
    delta_driver_weight: float | None = None
    """Δ on the text with only the weight from the driving input zeroed (``W[c, driver]``)."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(self.unit.to_dict())
        del d["unit"]
        return d


def weight_row(module: torch.nn.Module, channel: int) -> torch.Tensor | None:
    """The weights producing output ``channel`` (float32 CPU), or ``None`` if unsupported.

    Offloaded weights (on ``meta`` outside a forward) are read on their execution device.
    """
    with weights_on_device(module):
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            return None
        if isinstance(module, torch.nn.Linear):
            return w[channel].detach().float().cpu()
        if type(module).__name__ == "Conv1D":  # transformers' GPT-2 layer: weight [in, out]
            return w[:, channel].detach().float().cpu()
        return None


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else float("inf")


def unit_weights(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    units: Sequence[Unit],
    *,
    kinds: Sequence[str] = WEIGHT_KINDS,
    top_k: int = 5,
    massive_ratio: float = MASSIVE_RATIO,
    ablate: bool = False,
    progress: bool = False,
    clean_nll: float | None = None,
) -> list[UnitWeights]:
    """Weight rows, driving inputs and massive-activation ratios of ``units`` of ``kinds``.

    Units of other kinds, or whose module is not a ``Linear``/``Conv1D``, are skipped (logged).
    One clean forward pass over ``input_ids`` ``[1, T]`` records the modules' inputs/outputs.
    With ``ablate``, two more passes per unit measure Δ with its weight row zeroed and with
    only the row's largest |w| zeroed (weights restored after each), against ``clean_nll``
    (the text's clean summed NLL, when a prepared run has it; default: one pass measures it).
    """
    chosen = []
    for u in units:
        if u.component not in kinds:
            continue
        if weight_row(model.get_submodule(u.module), u.channel) is None:
            logger.info("skipping %s: its module has no weight row", u)
            continue
        chosen.append(u)
    if not chosen:
        return []
    names = list(dict.fromkeys(u.module for u in chosen))
    dev = input_device(model)
    with recorded(model, names) as rec, torch.no_grad():
        model(input_ids=input_ids.to(dev), use_cache=False)
    out: list[UnitWeights] = []
    for u in chosen:
        row = weight_row(model.get_submodule(u.module), u.channel)
        assert row is not None
        x, y = rec[u.module]  # [1, T, in], [1, T, out]
        x, y = x[0], y[0]
        absw = row.abs()
        k = min(top_k, absw.numel())
        top = torch.topk(absw, k).indices
        yc = y[:, u.channel]
        p = int(yc.abs().argmax())
        contrib = row * x[p]
        j = int(contrib.abs().argmax())
        total = float(contrib.abs().sum())
        med_out = float(y.abs().median())
        ratio = _ratio(float(yc[p].abs()), med_out)
        out.append(
            UnitWeights(
                unit=u,
                top_inputs=top.tolist(),
                top_weights=row[top].tolist(),
                max_over_median_weight=_ratio(float(absw.max()), float(absw.median())),
                peak_position=p,
                peak_output=float(yc[p]),
                driver_input=j,
                driver_contribution=float(contrib[j]),
                driver_share=_ratio(float(contrib[j].abs()), total) if total > 0 else 0.0,
                driver_in_top_weights=j in set(top.tolist()),
                massive_ratio=ratio,
                massive=ratio >= massive_ratio,
            )
        )
    if ablate:
        from tqdm.auto import tqdm

        from achilles.method.metrics import sequence_nll

        if clean_nll is None:  # measured once, not once per unit
            clean_nll = float(sequence_nll(model, input_ids.to(input_device(model)))[0])
        out = [_with_ablations(model, input_ids, w, clean_nll)
               for w in tqdm(out, desc="weights: row and top-weight ablations", disable=not progress)]
    return out


def _with_ablations(
    model: torch.nn.Module, input_ids: torch.Tensor, w: UnitWeights, base: float
) -> UnitWeights:
    """``w`` with :attr:`UnitWeights.delta_row` and :attr:`UnitWeights.delta_top_weight`,
    against the clean summed NLL ``base``; the weights are edited through
    :mod:`achilles.model.masking` and restored bit for bit."""
    import dataclasses

    from achilles.method.metrics import delta, sequence_nll
    from achilles.model.masking import restore_weights_, zero_weight_entry_, zero_weights_

    ids = input_ids.to(input_device(model))
    tokens = int(ids.shape[1]) - 1
    saved = zero_weights_(model, [w.unit])
    try:
        d_row = delta(float(sequence_nll(model, ids)[0]), base, tokens)
    finally:
        restore_weights_(model, saved)
    def zeroed(j: int) -> float:
        saved = zero_weight_entry_(model, w.unit, j)
        try:
            return delta(float(sequence_nll(model, ids)[0]), base, tokens)
        finally:
            restore_weights_(model, saved)

    d_one = zeroed(w.top_inputs[0])
    d_driver = d_one if w.driver_input == w.top_inputs[0] else zeroed(w.driver_input)
    return dataclasses.replace(w, delta_row=d_row, delta_top_weight=d_one, delta_driver_weight=d_driver)


def zeroed_weight_nll(
    model: torch.nn.Module, input_ids: torch.Tensor, module: str, channel: int, inputs: Sequence[int]
) -> list[float]:
    """Summed NLL of ``input_ids`` ``[1, T]`` with one weight ``W[channel, j]`` zeroed per row,
    ``j`` in ``inputs`` (one batch row each).

    The weight is not edited: the module's output channel loses ``W[channel, j] · x_j``, which
    is what zeroing that weight does, so offloaded (``meta``) weights work as in the forward.
    """
    from achilles.method.metrics import sequence_nll
    from achilles.model.hooks import hooked

    row = weight_row(model.get_submodule(module), channel)
    if row is None:
        raise ValueError(f"{module} has no weight row for channel {channel}")
    idx = torch.tensor(list(inputs))
    w = row[idx]  # [R]
    seen: dict[str, torch.Tensor] = {}

    def keep(x: torch.Tensor) -> None:
        seen["x"] = x

    def drop(y: torch.Tensor) -> torch.Tensor:
        x = seen.pop("x")[:, :, idx.to(y.device)]  # [R, T, R]: row r needs its own input j_r
        own = x.diagonal(dim1=0, dim2=2).T  # [R, T]
        y = y.clone()
        y[:, :, channel] -= (w.to(y.device, y.dtype)[:, None] * own.to(y.dtype))
        return y

    with hooked(model, {f"{module}:input": keep, module: drop}):
        return sequence_nll(model, input_ids.expand(len(idx), -1)).tolist()

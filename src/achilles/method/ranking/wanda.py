"""Channel-level Wanda scores (Sun et al. 2023, "pruning by weights and activations").

One clean forward pass of the decoder stack (no LM head) records each site's input ``x``
``[T, d_in]`` and output ``a`` ``[T, C]``. Wanda scores a weight ``W[c, j]`` by
``|W[c, j]| · ‖x_j‖₂`` (the norm of input feature ``j`` over the ``T`` positions); a unit is
one output channel, so its score sums the scores of the weights that produce it:

* ``Linear`` (weight ``[C, d_in]``): ``score_c = Σ_j |W[c, j]| · ‖x_j‖₂``.
* GPT-2 ``Conv1D`` (weight ``[d_in, C]``): the same with the weight transposed,
  ``score_c = Σ_j |W[j, c]| · ‖x_j‖₂``. Biases are not scored (Wanda prunes weights).
* Norms (a 1-D per-channel gain ``γ``; LayerNorm/RMSNorm, Gemma's ``1 + w`` included):
  the norm's output channel is ``γ_c · x̂_c (+ β_c)``, where ``x̂`` is the normalised input,
  so the Wanda product of the gain and the feature it multiplies is
  ``score_c = |γ_c| · ‖x̂_c‖₂ = ‖a_c − β_c‖₂``, computed from the output so that every
  family's normalisation formula (and gain parameterisation) is honoured as is.
* Parameter-free sites (``mlp.act``): there is no weight to score, so
  ``score_c = ‖a_c‖₂``, the output's norm over positions (it does not depend on which
  weights read the unit downstream).

The score is per channel over the whole text, so ``config.reduce`` does not apply; the
position reported is where ``|a_c|`` peaks, for reports.
"""

from __future__ import annotations

import logging
from typing import cast

import torch

from achilles.config import RankConfig
from achilles.method.ranking.base import Scores
from achilles.method.ranking.perturbation import decoder
from achilles.model.batching import input_device, weights_on_device
from achilles.model.hooks import observed_io
from achilles.model.units import UnitPool

logger = logging.getLogger(__name__)


def _is_conv1d(module: torch.nn.Module | None) -> bool:
    """transformers' ``Conv1D``: a linear map whose weight is stored ``[d_in, d_out]``."""
    w = getattr(module, "weight", None)
    nf = getattr(module, "nf", None)
    return isinstance(nf, int) and isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[1] == nf


def channel_scores(module: torch.nn.Module | None, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Wanda score ``[C]`` of each output channel of ``module`` (see the module docstring).

    Args:
        module: the site's module (None for a parameter-free `path:input` site).
        x: its input, float32 ``[T, d_in]``.
        a: its output, float32 ``[T, C]``.
    """
    w = getattr(module, "weight", None)
    if isinstance(module, torch.nn.Linear):
        return cast(torch.Tensor, w).detach().float().abs() @ x.norm(dim=0)  # [C, d_in] @ [d_in]
    if _is_conv1d(module):
        return x.norm(dim=0) @ cast(torch.Tensor, w).detach().float().abs()  # [d_in] @ [d_in, C]
    if isinstance(w, torch.Tensor) and w.dim() == 1 and w.shape[0] == a.shape[-1]:
        b = getattr(module, "bias", None)
        if isinstance(b, torch.Tensor) and b.shape == w.shape:
            a = a - b.detach().float()
        return a.norm(dim=0)  # |γ_c|·‖x̂_c‖ = ‖a_c − β_c‖
    if w is not None:
        raise ValueError(
            f"wanda: no rule for {type(module).__name__} with a weight of shape {tuple(w.shape)}"
        )
    return a.norm(dim=0)


@torch.no_grad()
def wanda_scores(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    pool: UnitPool,
    config: RankConfig,
    *,
    progress: bool = False,
) -> Scores:
    """Channel-level Wanda score of every unit of ``pool`` on the text ``input_ids [1, T]``.

    Args:
        model: a causal LM in eval mode (left unchanged).
        input_ids: token ids ``[1, T]``.
        pool: the units to score.
        config: unused (the score is already one number per channel).
        progress: unused (a single forward pass).

    Returns:
        One float32 score per unit, with the position of its largest ``|a|``.
    """
    input_ids = input_ids.to(input_device(model))
    modules = dict(model.named_modules())  # ``path:input`` sites are parameter-free: None
    values: dict[str, torch.Tensor] = {}
    positions: dict[str, torch.Tensor] = {}

    def score(name: str):  # noqa: ANN202
        # Reduce inside the hook, so no site's input is kept after its forward.
        def fn(x: torch.Tensor, out: torch.Tensor) -> None:
            a = out[0].float()
            mod = modules.get(name)
            if mod is None:
                values[name] = channel_scores(None, x[0].float(), a)
            else:  # offloaded weights went back to ``meta`` after the forward: bring them in
                with weights_on_device(mod):
                    values[name] = channel_scores(mod, x[0].float(), a)
            positions[name] = a.abs().argmax(0)

        return fn

    with observed_io(model, {s.module: score(s.module) for s in pool.sites}):
        decoder(model)(input_ids=input_ids, use_cache=False)
    logger.debug("wanda: scored %d units on %d tokens", pool.n_units, input_ids.shape[1])
    return Scores(values, positions)

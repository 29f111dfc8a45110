"""Negative log-likelihood and the degradation metric Δ, computed honestly.

* Logits are upcast to float32 before ``log_softmax``; NLL is **summed** over the predicted
  tokens (positions 1..T-1 of each sequence, i.e. ``T - 1`` targets) in float32.
* Δ(S) = log10(PPL_masked / PPL_clean) = (NLL_masked - NLL_clean) / (n_tokens · ln 10) is
  computed from the NLL sums in log space; perplexities are never exponentiated to get it.
* A non-finite NLL is kept as such (``finite=False``). For the search it counts as collapse
  (Δ = +inf); in result files it is written as ``"nan"``/``"inf"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from achilles.batching import input_device

LN10 = math.log(10.0)


@dataclass(frozen=True)
class NLLResult:
    """Summed negative log-likelihood of one sequence (nats, float32 arithmetic)."""

    nll_sum: float
    tokens: int

    @property
    def finite(self) -> bool:
        return math.isfinite(self.nll_sum)

    @property
    def mean(self) -> float:
        """Mean NLL per predicted token: log PPL in nats."""
        return self.nll_sum / self.tokens

    @property
    def log10_ppl(self) -> float:
        return self.mean / LN10


@torch.no_grad()
def sequence_nll(
    model: torch.nn.Module, input_ids: torch.Tensor, *, logit_chunk: int = 8
) -> torch.Tensor:
    """Summed NLL of each row of ``input_ids`` ``[B, T]`` (float32 ``[B]``, on CPU).

    Every row is scored on its ``T - 1`` next-token predictions. Logits are upcast to
    float32 ``logit_chunk`` rows at a time, so the float32 copy never holds the whole batch.
    """
    input_ids = input_ids.to(input_device(model))
    logits = model(input_ids=input_ids, use_cache=False).logits  # [B, T, V]
    targets = input_ids[:, 1:]
    out = []
    for i in range(0, logits.shape[0], logit_chunk):
        lg = logits[i : i + logit_chunk, :-1].float()  # [b, T-1, V]
        nll = F.cross_entropy(
            lg.reshape(-1, lg.shape[-1]), targets[i : i + logit_chunk].reshape(-1).to(lg.device),
            reduction="none",
        ).view(lg.shape[0], -1)
        out.append(nll.sum(1))
    return torch.cat(out).cpu()  # one device sync per batch, not one per chunk


def delta(nll_masked_sum: float, nll_clean_sum: float, tokens: int) -> float:
    """Δ = log10(PPL_masked / PPL_clean) from NLL sums over the same ``tokens`` targets.

    Returns ``+inf`` when the masked NLL is not finite (``nan`` included): collapse.
    """
    if not math.isfinite(nll_masked_sum):
        return math.inf
    return (nll_masked_sum - nll_clean_sum) / (tokens * LN10)

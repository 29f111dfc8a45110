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
from typing import Any, cast

import torch
import torch.nn.functional as F

from achilles.model.batching import LOGIT_CHUNK, input_device

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


_LOGIT_RESCALES = ("logit_scale", "logits_scaling", "output_multiplier_scale")
"""Config fields of families whose CausalLM rescales the head's output in ways
:func:`sequence_nll`'s head-only path does not reproduce: these run the whole model."""


def _split_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """``(decoder stack, LM head)`` when the logits are ``head(last_hidden_state)`` (Gemma-2's
    final soft-capping included), else ``None``."""
    body = getattr(model, "base_model", None)
    head = cast(Any, model).get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is None or body is model or head is None:
        return None
    cfg = getattr(model, "config", None)
    if any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in _LOGIT_RESCALES):
        return None
    return body, head


@torch.no_grad()
def sequence_nll(
    model: torch.nn.Module, input_ids: torch.Tensor, *, logit_chunk: int = LOGIT_CHUNK
) -> torch.Tensor:
    """Summed NLL of each row of ``input_ids`` ``[B, T]`` (float32 ``[B]``, on CPU).

    Every row is scored on its ``T - 1`` next-token predictions. The decoder stack runs on
    the whole batch; the LM head then runs ``logit_chunk`` rows at a time on its own device
    (the last GPU under a ``device_map``), where the float32 log-softmax and the per-row sums
    are taken, so neither the full logits nor their float32 copy ever exist, and only ``[B]``
    sums leave that device.
    """
    input_ids = input_ids.to(input_device(model))
    split = _split_head(model)
    if split is None:
        return _full_nll(model, input_ids, logit_chunk)
    body, head = split
    hidden = body(input_ids=input_ids, use_cache=False).last_hidden_state  # [B, T, d]
    cap = getattr(model.config, "final_logit_softcapping", None)
    out = []
    for i in range(0, hidden.shape[0], logit_chunk):
        lg = head(hidden[i : i + logit_chunk, :-1])  # [b, T-1, V], model dtype, head's device
        if cap is not None:  # as the model's own forward does, in the model dtype
            lg = torch.tanh(lg / cap) * cap
        lg = lg.float()
        nll = F.cross_entropy(
            lg.reshape(-1, lg.shape[-1]),
            input_ids[i : i + logit_chunk, 1:].reshape(-1).to(lg.device),
            reduction="none",
        ).view(lg.shape[0], -1)
        out.append(nll.sum(1))
    return torch.cat([o.to(out[0].device) for o in out]).cpu()


def _full_nll(model: torch.nn.Module, input_ids: torch.Tensor, logit_chunk: int) -> torch.Tensor:
    """:func:`sequence_nll` through the model's own forward (full logits)."""
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

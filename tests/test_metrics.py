"""NLL and Δ against hand computations in float64."""

from __future__ import annotations

import math

import torch
from tiny import make_model

from achilles.method.metrics import LN10, delta, sequence_nll


def _hand_nll(logits: torch.Tensor, ids: torch.Tensor) -> list[float]:
    out = []
    for b in range(ids.shape[0]):
        total = 0.0
        for t in range(ids.shape[1] - 1):
            row = logits[b, t].double()
            logz = math.log(sum(math.exp(v) for v in (row - row.max()).tolist())) + float(row.max())
            total += logz - float(row[ids[b, t + 1]])
        out.append(total)
    return out


def test_sequence_nll_equals_hand_computation() -> None:
    model = make_model("llama")
    ids = torch.randint(0, 300, (3, 14))
    with torch.no_grad():
        logits = model(ids).logits
    got = sequence_nll(model, ids, logit_chunk=2)
    assert got.dtype == torch.float32 and got.shape == (3,)
    for g, h in zip(got.tolist(), _hand_nll(logits, ids), strict=True):
        assert math.isclose(g, h, rel_tol=1e-5)


def test_delta_is_log10_ppl_ratio_in_log_space() -> None:
    # PPL = exp(nll/T): Δ = log10(exp(a/T) / exp(b/T))
    a, b, t = 520.0, 410.0, 97
    assert math.isclose(delta(a, b, t), math.log10(math.exp(a / t) / math.exp(b / t)), rel_tol=1e-12)
    assert math.isclose(delta(a, b, t), (a - b) / (t * LN10))
    # far beyond exp overflow (PPL ratio 10^5000) Δ stays exact
    assert math.isclose(delta(1e6, 0.0, 86), 1e6 / (86 * LN10))


def test_non_finite_nll_is_collapse() -> None:
    assert delta(float("nan"), 10.0, 5) == math.inf
    assert delta(float("inf"), 10.0, 5) == math.inf

"""Paths a GPU user walks, held on CPU: offloaded weights, masker sizing, chunked-head NLL,
noise prefetch, batch-invariant stage 1, the fp32 re-check in the core, dtype choice,
version spellings and Gemma's embedding scale."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import cpu_offload

from achilles.analysis.weights import unit_weights
from achilles.config import RankConfig
from achilles.errors import AchillesError
from achilles.experiments.probe import ProbeConfig, probe
from achilles.identify import Identification, MaskEvaluator
from achilles.loading import LoadedModel
from achilles.masking import zero_weights_
from achilles.ranking import METHODS, get_method
from achilles.units import build_pool
from tiny import TEXT, make_model


def _offloaded(model: torch.nn.Module) -> torch.nn.Module:
    """A copy whose weights sit on ``meta`` outside each module's forward (accelerate)."""
    off = cpu_offload(copy.deepcopy(model), execution_device=torch.device("cpu"))
    assert all(p.device.type == "meta" for p in off.parameters())
    return off


@pytest.fixture(scope="module")
def plain_and_offloaded():  # noqa: ANN201
    model = make_model("llama")
    return model, _offloaded(model)


@pytest.fixture(scope="module")
def ids(tokenizer) -> torch.Tensor:  # noqa: ANN001
    return tokenizer(TEXT, return_tensors="pt").input_ids


# 1. offloaded weights ---------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_gives_the_same_scores_offloaded(plain_and_offloaded, ids, method: str) -> None:  # noqa: ANN001
    model, off = plain_and_offloaded
    pool = build_pool(model)
    cfg = RankConfig(method=method, samples=4)
    want = get_method(method)(model, ids, pool, cfg).flat(pool)
    got = get_method(method)(off, ids, pool, cfg).flat(pool)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert all(p.device.type == "meta" for p in off.parameters())  # weights went back


def test_weight_analysis_and_masking_agree_offloaded(plain_and_offloaded, ids) -> None:  # noqa: ANN001
    model, off = plain_and_offloaded
    pool = build_pool(model)
    units = pool.units([3, 40, 77, 150, 300])
    want = [w.to_dict() for w in unit_weights(model, ids, units, kinds=["attn.o", "mlp.down"])]
    got = [w.to_dict() for w in unit_weights(off, ids, units, kinds=["attn.o", "mlp.down"])]
    assert want and got == want
    a = MaskEvaluator(model, pool, ids, batch_size=2).measure([units, units[:2]])
    b = MaskEvaluator(off, pool, ids, batch_size=2).measure([units, units[:2]])
    assert a == b


def test_probe_offloaded(plain_and_offloaded, tokenizer) -> None:  # noqa: ANN001
    model, off = plain_and_offloaded
    pool = build_pool(model)
    units = pool.units([5, 60])
    ident = Identification(
        epsilon=1.0, n_star=2, critical_set=units, minimal_set=units, delta_critical=1.0,
        delta_minimal=1.0, necessity=[0.5, 0.5], curve=[], n_star_by_epsilon={},
        baseline_nll=1.0, tokens=10, n_units=pool.n_units, forward_passes=1,
    )
    cfg = ProbeConfig(prompt="The river", target=" ran", max_new_tokens=3, top_k=4)
    from achilles.config import ModelSpec

    spec = ModelSpec(model="tiny")
    want = probe(LoadedModel(model, tokenizer, spec), ident, cfg).to_dict()
    got = probe(LoadedModel(off, tokenizer, spec), ident, cfg).to_dict()
    assert got["levels"] == want["levels"]


def test_zero_weights_refuses_offloaded_parameters(plain_and_offloaded) -> None:  # noqa: ANN001
    model, off = plain_and_offloaded
    unit = build_pool(model).units([1])
    with pytest.raises(AchillesError, match="offloaded"):
        zero_weights_(off, unit)

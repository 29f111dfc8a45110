"""Single-weight (super-weight) ablation beside the row ablation; pooled ranking over texts."""

from __future__ import annotations

import copy

import pytest
import torch

from achilles import LoadedModel, ModelSpec, build_pool, tokenize
from achilles.analysis.weights import unit_weights
from achilles.identify import MaskEvaluator
from achilles.metrics import delta, sequence_nll
from tiny import TEXT, make_model, make_tokenizer


def test_row_and_top_weight_ablation_match_independent_oracles() -> None:
    model, tok = make_model("llama"), make_tokenizer()
    ids = tokenize(tok, TEXT)
    pool = build_pool(model, components=("mlp.down",))
    units = pool.units([3, 40])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ws = unit_weights(model, ids, units, ablate=True)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights restored
    ev = MaskEvaluator(model, pool, ids, batch_size=1)
    base = float(sequence_nll(model, ids)[0])
    for w in ws:
        # row ablation of a bias-free Linear == masking its output channel (hook path)
        assert w.delta_row == pytest.approx(ev.measure([[w.unit]])[0].delta, abs=1e-6)
        edited = copy.deepcopy(model)
        with torch.no_grad():
            edited.get_submodule(w.unit.module).weight[w.unit.channel, w.top_inputs[0]] = 0
        ref = delta(float(sequence_nll(edited, ids)[0]), base, ids.shape[1] - 1)
        assert w.delta_top_weight == pytest.approx(ref, abs=1e-9)
        assert w.delta_top_weight != w.delta_row
    assert unit_weights(model, ids, units)[0].delta_row is None  # off unless asked

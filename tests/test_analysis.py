"""Analyses of a run: locations, phase transition, weights, controls (tiny models)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from tiny import TEXT, make_model, make_tokenizer

from achilles import IdentifyConfig, LoadedModel, ModelSpec, RankConfig, build_pool, find, tokenize
from achilles.analysis import (
    analyze_run,
    fp32_delta,
    layer_distribution,
    mean_ablation,
    phase_transition,
    random_like,
    random_sets,
    recheck_fp32,
    unit_weights,
)
from achilles.analysis.weights import weight_row
from achilles.method.identify import MaskEvaluator
from achilles.method.metrics import sequence_nll
from achilles.model.masking import set_channels
from achilles.model.units import Unit
from achilles.results.schema import read_json

KINDS = ("mlp.down", "attn.o")


@pytest.fixture(scope="module")
def run(tmp_path_factory):  # noqa: ANN001, ANN201
    lm = LoadedModel(make_model("llama"), make_tokenizer(), ModelSpec(model="tiny"))
    ranking, ident = find(
        lm, TEXT, RankConfig(samples=4, keep=100, components=KINDS),
        IdentifyConfig(epsilon=0.001, max_neurons=30),
    )
    d = tmp_path_factory.mktemp("run")
    ranking.save(d / "ranking.json")
    ident.save(d / "identification.json")
    return lm, ranking, ident, d


# ------------------------------------------------------------------ phase transition


def test_step_curve_is_sharp() -> None:
    pt = phase_transition([(1, 0.0), (2, 0.01), (3, 4.0), (4, 4.02), (5, 4.01)])
    assert (pt.n_jump, pt.n_before) == (3, 2)
    assert pt.jump == pytest.approx(3.99)
    assert pt.sharpness == pytest.approx(3.99 / 4.02)
    assert not pt.non_monotone and pt.nonfinite_n == []


def test_ramp_curve_is_not_sharp() -> None:
    pt = phase_transition([(n, 0.5 * n) for n in range(1, 11)])
    assert pt.jump == pytest.approx(0.5)
    assert pt.sharpness == pytest.approx(0.1)  # 10 equal steps from the origin
    assert not pt.non_monotone


def test_non_monotone_curve_reports_where_and_how_much() -> None:
    # Qwen2.5-0.5B's shape (PAPER.md §3.4): 4.3 at n=3, back to 1.44 at n=8
    curve = [(1, 0.0), (2, 0.23), (3, 4.31), (5, 4.32), (7, 4.31), (8, 1.44), (10, 1.53), (100, 2.89)]
    pt = phase_transition(curve, tolerance=0.1)
    assert pt.non_monotone
    assert pt.n_jump == 3
    dd = pt.max_drawdown
    assert (dd.from_n, dd.n) == (5, 8) and dd.size == pytest.approx(4.32 - 1.44)
    assert [(d.from_n, d.n) for d in pt.drops] == [(7, 8)]
    # a small wiggle under the tolerance is not non-monotone
    assert not phase_transition([(1, 1.0), (2, 0.95), (3, 2.0)], tolerance=0.1).non_monotone


def test_nonfinite_points_are_listed_and_left_out() -> None:
    curve = [{"n": 1, "delta": 0.0}, {"n": 2, "delta": 22.3}, {"n": 3, "delta": "inf"},
             {"n": 4, "delta": float("nan")}, {"n": 5, "delta": 22.9}]
    pt = phase_transition(curve)
    assert pt.nonfinite_n == [3, 4]
    assert pt.n_points == 5
    assert pt.jump == pytest.approx(22.3) and pt.n_jump == 2
    assert math.isfinite(pt.max_delta) and pt.max_delta == pytest.approx(22.9)
    assert not pt.non_monotone


def test_flat_curve_has_no_sharpness() -> None:
    pt = phase_transition([(1, 0.0), (2, 0.0)])
    assert pt.sharpness is None


# ------------------------------------------------------------------ locations


def test_layer_distribution_counts_and_shares() -> None:
    units = [Unit("a", 0, 0, "mlp.down"), Unit("b", 1, 3, "mlp.down"), Unit("c", 2, 4, "attn.o"),
             Unit("d", 3, 7, "attn.o")]
    d = layer_distribution(units, n_layers=8)  # outer: layers 0,1 and 6,7
    assert d.counts == {"attn.o": [0, 0, 0, 0, 1, 0, 0, 1], "mlp.down": [1, 0, 0, 1, 0, 0, 0, 0]}
    assert d.down_share == 0.5 and d.outer_share == 0.5
    assert layer_distribution([], 8).down_share is None


# ------------------------------------------------------------------ controls


def test_mean_ablation_of_empty_set_is_zero(run) -> None:  # noqa: ANN001
    lm, ranking, _, _ = run
    pool = build_pool(lm.model, components=KINDS)
    ids = tokenize(lm.tokenizer, TEXT)
    ma = mean_ablation(lm.model, pool, ids, [])
    assert ma.delta_zero == 0.0 and ma.delta_mean == 0.0


def test_mean_ablation_uses_channel_means(run) -> None:  # noqa: ANN001
    lm, ranking, ident, _ = run
    pool = build_pool(lm.model, components=KINDS)
    ids = tokenize(lm.tokenizer, TEXT)
    units = ranking.units[:3]
    ma = mean_ablation(lm.model, pool, ids, units)
    ev = MaskEvaluator(lm.model, pool, ids, batch_size=1)
    assert ma.delta_zero == pytest.approx(ev.measure([units])[0].delta, abs=1e-9)
    # setting a channel to a constant changes the output; setting it to zero equals masking
    with set_channels(lm.model, {u: 0.0 for u in units}):
        nll0 = float(sequence_nll(lm.model, ids)[0])
    assert nll0 == pytest.approx(ev.nll([units])[0], rel=1e-6)
    assert len(ma.means) == 3 and ma.delta_mean != ma.delta_zero


def test_random_sets_come_from_the_same_modules(run) -> None:  # noqa: ANN001
    lm, ranking, ident, _ = run
    pool = build_pool(lm.model, components=KINDS)
    units = ranking.units[:6]
    for seed in range(5):
        r = random_like(units, pool, random.Random(seed))
        assert len(r) == len(units)
        assert sorted(u.module for u in r) == sorted(u.module for u in units)
        assert {(u.layer, u.component) for u in r} <= {(u.layer, u.component) for u in units}
        assert not {u.key for u in r} & {u.key for u in units}
        assert len({u.key for u in r}) == len(r)
    ids = tokenize(lm.tokenizer, TEXT)
    rs = random_sets(lm.model, pool, ids, units, seeds=3)
    assert len(rs.deltas) == 3 and rs.sd is not None
    assert rs.max_abs == max(abs(d) for d in rs.deltas)


def test_fp32_recheck_of_a_bf16_model_matches_fp32(run) -> None:  # noqa: ANN001
    lm, ranking, _, _ = run
    units = ranking.units[:4]
    ref = fp32_delta(lm, TEXT, None, units)  # float32 already: used as is
    low = LoadedModel(make_model("llama").to(torch.bfloat16), lm.tokenizer, ModelSpec(model="tiny"))
    chk = recheck_fp32(low, TEXT, units)
    assert chk.dtype_run == "bfloat16" and chk.method == "in-place upcast"
    assert chk.delta_fp32 == pytest.approx(ref, abs=1e-4)  # bf16 weights are exact in fp32
    assert next(low.model.parameters()).dtype == torch.bfloat16  # the run's model is untouched


# ------------------------------------------------------------------ weights


def test_unit_weights_driver_and_row(run) -> None:  # noqa: ANN001
    lm, ranking, _, _ = run
    ids = tokenize(lm.tokenizer, TEXT)
    units = ranking.units[:8]
    ws = unit_weights(lm.model, ids, units, top_k=3)
    assert ws and all(w.unit.component in KINDS for w in ws)
    for w in ws:
        row = lm.model.get_submodule(w.unit.module).weight[w.unit.channel].detach()
        assert w.top_weights[0] == pytest.approx(float(row[w.top_inputs[0]]))
        assert abs(w.top_weights[0]) == pytest.approx(float(row.abs().max()))
        assert 0 < w.driver_share <= 1 and w.massive == (w.massive_ratio >= 100)


def test_weight_row_of_gpt2_conv1d_is_a_column() -> None:
    model = make_model("gpt2")
    mod = model.get_submodule("transformer.h.0.mlp.c_proj")
    assert torch.equal(weight_row(mod, 5), mod.weight[:, 5].float())
    ids = tokenize(make_tokenizer(), TEXT)
    u = Unit("transformer.h.0.mlp.c_proj", 5, 0, "mlp.down")
    (w,) = unit_weights(model, ids, [u])
    assert len(w.top_inputs) == 5 and math.isfinite(w.massive_ratio)


# ------------------------------------------------------------------ analyze_run


def test_analyze_run_writes_analysis_json(run) -> None:  # noqa: ANN001
    lm, ranking, ident, d = run
    free = analyze_run(d)
    assert free["weights"] is None and free["controls"] is None
    assert free["locations"]["critical"]["n_units"] == len(ident.critical_set)
    assert free["locations"]["ranking"]["n_units"] == min(100, len(ranking.neurons))
    full = analyze_run(d, lm, seeds=3)
    saved = read_json(d / "analysis.json", kind="analysis")
    assert saved["phase"]["n_jump"] == full["phase"]["n_jump"]
    c = saved["controls"]
    assert c["n_units"] == len(ident.minimal_set or ident.critical_set)
    assert c["mean_ablation"]["delta_zero"] == pytest.approx(ident.delta_minimal, abs=1e-9)
    assert c["fp32"] is None  # the run is float32
    assert len(c["random_sets"]["deltas"]) == 3

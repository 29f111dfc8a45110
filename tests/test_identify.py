"""Stage 2 on a model with a planted collapse unit, checked against hand computations."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from tiny import TEXT, make_model

from achilles import IdentifyConfig, Unit, build_pool, identify, zero_weights_
from achilles.method.identify import Identification, MaskEvaluator
from achilles.model.loading import tokenize
from achilles.model.masking import restore_weights_

PLANT = Unit("transformer.h.0.mlp.c_proj", 5, 0, "mlp.down")


def planted_gpt2() -> torch.nn.Module:
    """Tiny GPT-2 whose layer-0 MLP writes +M into residual channel 5 and layer 1 removes it.

    Intact, the two cancel. With layer 0's channel masked, -M dominates the final LayerNorm
    and a strong unembedding column for channel 5 makes every prediction the same token.
    """
    model = make_model("gpt2")
    with torch.no_grad():
        model.get_submodule("transformer.h.0.mlp.c_proj").bias[5] += 300.0
        model.get_submodule("transformer.h.1.mlp.c_proj").bias[5] -= 300.0
        model.lm_head.weight[:, 5] = torch.randn(model.lm_head.weight.shape[0]) * 4.0
    return model


def hand_nll(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].double()
    return float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))


def ranking_with_plant_at(pool, index: int, length: int = 30) -> list[Unit]:  # noqa: ANN001
    others = [pool.unit(i) for i in range(0, pool.n_units, 7) if pool.unit(i).key != PLANT.key]
    units = others[:length]
    units.insert(index, PLANT)
    return pool.validate(units)


@pytest.mark.parametrize("search", ["linear", "bisect"])
def test_finds_and_minimises_the_planted_unit(search: str, tokenizer) -> None:  # noqa: ANN001
    model = planted_gpt2()
    ids = tokenize(tokenizer, TEXT)
    pool = build_pool(model, "paper")
    ranking = ranking_with_plant_at(pool, 3)
    res = identify(model, ids, pool, ranking, IdentifyConfig(search=search, max_neurons=30))
    assert res.n_star == 4
    assert [u.key for u in res.critical_set] == [u.key for u in ranking[:4]]
    assert [u.key for u in res.minimal_set] == [PLANT.key]
    assert all(d < 1.0 for d in res.necessity)
    # Δ of the minimal set equals a hand computation with the weights zeroed instead
    clean = hand_nll(model, ids)
    saved = zero_weights_(model, [PLANT])
    masked_nll = hand_nll(model, ids)
    restore_weights_(model, saved)
    expected = (masked_nll - clean) / ((ids.shape[1] - 1) * math.log(10))
    assert expected > 1.0
    assert math.isclose(res.delta_minimal, expected, rel_tol=1e-4)
    assert math.isclose(res.baseline_nll, clean, rel_tol=1e-5)


def test_curve_points_equal_hand_computation(tokenizer) -> None:  # noqa: ANN001
    model = planted_gpt2()
    ids = tokenize(tokenizer, TEXT)
    pool = build_pool(model, components=["mlp.down", "attn.o", "mlp.up"])
    ranking = ranking_with_plant_at(pool, 6, length=12)
    res = identify(model, ids, pool, ranking, IdentifyConfig(max_neurons=12, curve_until=math.inf))
    assert [p["n"] for p in res.curve] == list(range(1, 13))
    clean = hand_nll(model, ids)
    for p in res.curve[::3]:
        saved = zero_weights_(model, ranking[: p["n"]])
        nll = hand_nll(model, ids)
        restore_weights_(model, saved)
        assert p["finite"]
        assert math.isclose(p["nll"], nll, rel_tol=1e-4)
        assert math.isclose(p["delta"], (nll - clean) / ((ids.shape[1] - 1) * math.log(10)),
                            rel_tol=1e-3, abs_tol=1e-4)
    assert res.n_star_by_epsilon["1"] == 7
    assert res.n_star_by_epsilon["0.5"] == 7


def test_batched_evaluator_matches_one_mask_at_a_time(tokenizer) -> None:  # noqa: ANN001
    model = planted_gpt2()
    ids = tokenize(tokenizer, TEXT)
    pool = build_pool(model, "paper")
    ranking = ranking_with_plant_at(pool, 2, length=10)
    masks = [ranking[:n] for n in range(0, 11)]
    wide = MaskEvaluator(model, pool, ids, batch_size=11).measure(masks)
    narrow = MaskEvaluator(model, pool, ids, batch_size=1).measure(masks)
    for a, b in zip(wide, narrow, strict=True):
        assert math.isclose(a.nll, b.nll, rel_tol=1e-5)
    assert abs(wide[0].delta) < 1e-5


def test_non_finite_nll_is_recorded_and_counts_as_collapse(tokenizer, monkeypatch, tmp_path) -> None:  # noqa: ANN001
    """Simulate an fp16 overflow: collapsed rows come back as NaN NLL."""
    ident_mod = importlib.import_module("achilles.method.identify")

    real = ident_mod.sequence_nll

    def overflowing(model, ids, **kw):  # noqa: ANN001, ANN202
        nll = real(model, ids, **kw)
        return torch.where(nll > 2 * nll.min(), torch.full_like(nll, float("nan")), nll)

    monkeypatch.setattr(ident_mod, "sequence_nll", overflowing)
    model = planted_gpt2()
    ids = tokenize(tokenizer, TEXT)
    pool = build_pool(model, "paper")
    ranking = ranking_with_plant_at(pool, 1, length=8)
    res = identify(model, ids, pool, ranking, IdentifyConfig(max_neurons=8))
    assert res.n_star == 2
    point = next(p for p in res.curve if p["n"] == 2)
    assert point["finite"] is False and math.isnan(point["nll"]) and point["delta"] == math.inf
    res.save(tmp_path / "i.json")
    text = (tmp_path / "i.json").read_text()
    assert '"nan"' in text and '"inf"' in text and "NaN" not in text
    back = Identification.load(tmp_path / "i.json")
    assert math.isnan(next(p for p in back.curve if p["n"] == 2)["nll"])


def test_no_collapse_is_reported_as_not_found(tokenizer) -> None:  # noqa: ANN001
    model = make_model("llama")
    ids = tokenize(tokenizer, TEXT)
    pool = build_pool(model, "paper")
    ranking = [pool.unit(i) for i in range(20)]
    res = identify(model, ids, pool, ranking, IdentifyConfig(max_neurons=20))
    assert res.n_star is None and not res.found
    assert res.critical_set == [] and res.minimal_set == []
    assert len(res.curve) == 20 and all(v is None for v in res.n_star_by_epsilon.values())


@pytest.mark.parametrize("epsilon", ["nan", "inf", "-inf", 0, -1.0])
def test_saved_epsilon_must_be_a_number_above_zero(epsilon, tokenizer, tmp_path) -> None:  # noqa: ANN001
    """Issue 21: an identification whose epsilon is the string "nan" was accepted, and report
    and explain then died on it after writing files. The loader refuses it, as the
    collapse threshold a run can be made with (``IdentifyConfig`` requires ε > 0)."""
    import json

    from achilles.errors import AchillesError

    model = make_model("llama")
    pool = build_pool(model, "paper")
    res = identify(model, tokenize(tokenizer, TEXT), pool, [pool.unit(i) for i in range(3)],
                   IdentifyConfig(max_neurons=3))
    res.save(tmp_path / "i.json")
    assert Identification.load(tmp_path / "i.json").epsilon == 1.0
    d = json.loads((tmp_path / "i.json").read_text())
    d["epsilon"] = epsilon
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(AchillesError, match=f"its epsilon is {epsilon!r}, not a number > 0"):
        Identification.load(tmp_path / "bad.json")
    with pytest.raises(AchillesError, match="--epsilon must be > 0"):
        IdentifyConfig(epsilon=float(epsilon))

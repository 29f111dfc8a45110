"""Single-weight (super-weight) ablation beside the row ablation; pooled ranking over texts."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import TEXT, make_model, make_tokenizer

from achilles import LoadedModel, ModelSpec, build_pool, tokenize
from achilles.analysis.weights import unit_weights
from achilles.method.identify import MaskEvaluator
from achilles.method.metrics import delta, sequence_nll


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


def test_pooled_ranking_sums_the_per_text_scores(tmp_path) -> None:  # noqa: ANN001
    from achilles import RankConfig
    from achilles.method.pipeline import rank, rank_texts

    lm = LoadedModel(make_model("llama"), make_tokenizer(), ModelSpec(model="tiny"))
    other = "Perplexity is the exponential of the mean negative log-likelihood per token of a text."
    cfg = RankConfig(samples=3, keep=10_000, components=("mlp.down", "attn.o"))
    a, pool = rank(lm, TEXT, cfg)
    b, _ = rank(lm, other, cfg)
    oracle: dict = {}
    for r in (a, b):
        for n in r.neurons:
            oracle[n.unit.key] = oracle.get(n.unit.key, 0.0) + n.score
    pooled, _ = rank_texts(lm, [TEXT, other], cfg)
    assert len(pooled.neurons) == pool.n_units
    for n in pooled.neurons:
        assert n.score == pytest.approx(oracle[n.unit.key], rel=1e-6)
    assert [n.score for n in pooled.neurons] == sorted((n.score for n in pooled.neurons), reverse=True)
    assert pooled.config["texts"] == [TEXT, other] and pooled.tokens == a.tokens + b.tokens


def test_rank_cli_takes_several_text_files(tmp_path, tiny_dir) -> None:  # noqa: ANN001
    from achilles.cli import main
    from achilles.results.schema import read_json

    fa, fb = tmp_path / "a.txt", tmp_path / "b.txt"
    fa.write_text(TEXT)
    fb.write_text(TEXT.upper())
    out = tmp_path / "r.json"
    assert main(["rank", "--model", str(tiny_dir), "--text-file", str(fa), "--text-file",
                 str(fb), "--samples", "2", "--keep", "20", "--out", str(out), "--quiet"]) == 0
    d = read_json(out)
    assert d["config"]["texts"] == [TEXT, TEXT.upper()] and len(d["neurons"]) == 20


def test_channel_traces_are_the_channel_at_every_position() -> None:
    from achilles.analysis.controls import channel_traces

    model, tok = make_model("llama"), make_tokenizer()
    ids = tokenize(tok, TEXT)
    pool = build_pool(model, components=("mlp.down",))
    units = pool.units([5, 60])
    seen: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(u.module).register_forward_hook(
        lambda m, i, o, name=u.module: seen.__setitem__(name, o.detach())) for u in units]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    traces = channel_traces(model, ids, units)
    for u, t in zip(units, traces, strict=True):
        assert len(t) == ids.shape[1]
        assert t == pytest.approx(seen[u.module][0, :, u.channel].tolist(), abs=1e-6)


def test_comparison_keeps_each_methods_ranked_units() -> None:
    from achilles import RankConfig
    from achilles.evaluation.perplexity import PerplexityEvaluator
    from achilles.experiments.compare import compare
    from achilles.method.pipeline import rank

    lm = LoadedModel(make_model("llama"), make_tokenizer(), ModelSpec(model="tiny"))
    cfg = RankConfig(samples=2, keep=50, components=("mlp.down",))
    ev = PerplexityEvaluator(lm.model, lm.tokenizer, [TEXT * 3], max_length=32)
    c = compare(lm, TEXT, cfg, ["perturbation", "random"], [1, 3], ev, random_runs=2).to_dict()
    ref, _ = rank(lm, TEXT, cfg)
    assert c["ranked"]["perturbation"] == [n.to_dict() for n in ref.neurons[:3]]
    assert "random" not in c["ranked"] and len(c["random"]["ranked"]) == 2
    assert c["random"]["ranked"][0] != c["random"]["ranked"][1]  # two seeds, two rankings

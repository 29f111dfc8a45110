"""``explain`` on models nobody planted: massive activations judged per span of layers, the
writer named, the mediation profile, the driver weight, patch scopes and continuations.

The split-group case is built by hand on a tiny Llama: one residual channel holds an early
activation (written by layer 0's MLP) and a later, much larger one written in the same
channel by layer 2's ``down_proj``; masking that unit must erase the late span only.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers as T
from tiny import TEXT, VOCAB, make_model

from achilles import LoadedModel, ModelSpec, tokenize
from achilles.analysis.weights import zeroed_weight_nll
from achilles.explain import ExplainConfig, explain
from achilles.explain.mediation import layer_bands, mediation_profile
from achilles.explain.patching import Component
from achilles.explain.trace import massive_groups
from achilles.method.metrics import sequence_nll
from achilles.model.units import Unit, build_pool

MARK, CH, K = 0, 5, 7  # marker channel, massive channel, the MLP neuron that writes it
SPLIT_TEXT = "The river ran. The mill stood. The children played on its banks every summer."


def split_model(tokenizer) -> T.LlamaForCausalLM:
    """A 4-layer tiny Llama whose channel CH at the BOS and at every '.' is written twice.

    Attention writes nothing (``o_proj`` = 0). The marker channel MARK is 1 in the embeddings
    of BOS and '.', 0 elsewhere; the MLP neuron K of layers 0 and 2 fires only where the
    marker is (SiLU(0)·0 = 0) and writes channel CH: about 95 in layer 0, about 5,000 more in
    layer 2. Layers 1 and 3 write nothing.
    """
    cfg = T.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=0, eos_token_id=1, pad_token_id=1, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(cfg).eval()
    dot = tokenizer.convert_tokens_to_ids(".")
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[:, MARK] = 0
        emb[[0, dot], MARK] = 1.0
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.o_proj.weight.zero_()
            mlp = layer.mlp
            for w in (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight):
                w.zero_()
            if i in (0, 2):
                a, w_out = (1.0, 3.0) if i == 0 else (100.0, 150.0)
                mlp.gate_proj.weight[K, MARK] = a
                mlp.up_proj.weight[K, MARK] = a
                mlp.down_proj.weight[CH, K] = w_out
    return model


def _hidden(model, ids) -> torch.Tensor:
    """Block outputs 0..L-2 from transformers' own ``output_hidden_states`` (the last entry is
    after the final norm, so the last block is not compared)."""
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    return torch.stack(hs[1:-1])[:, 0]  # [L-1, T, D]


@pytest.fixture(scope="module")
def split(tokenizer):
    model = split_model(tokenizer)
    lm = LoadedModel(model, tokenizer, ModelSpec(model="tiny-split"))
    pool = build_pool(model)
    unit = Unit("model.layers.2.mlp.down_proj", CH, 2, "mlp.down")
    return lm, explain(lm, SPLIT_TEXT, pool.validate([unit]), pool, ExplainConfig(generate_tokens=4))


def test_one_channel_two_writers_is_two_spans_the_late_one_erased(split, tokenizer) -> None:
    lm, m = split
    ids = tokenize(tokenizer, SPLIT_TEXT)
    toks = ids[0].tolist()
    dots = [i for i, t in enumerate(toks) if t == tokenizer.convert_tokens_to_ids(".")]
    assert toks[0] == 0 and len(dots) == 3
    # independent oracle: transformers' hidden states, clean and with the weight row zeroed
    clean = _hidden(lm.model, ids)
    edited = split_model(tokenizer)
    with torch.no_grad():
        edited.model.layers[2].mlp.down_proj.weight[CH] = 0
    masked = _hidden(edited, ids)
    assert 50 < clean[0, 0, CH] < 200 and clean[2, 0, CH] > 20 * clean[0, 0, CH]
    assert masked[2, 0, CH] == pytest.approx(clean[1, 0, CH], rel=1e-5)

    spans = {(g["position"], tuple(g["layers"])): g for g in m.massive_groups if g["channel"] == CH}
    for q in [0, *dots]:
        early, late = spans[(q, (0, 1))], spans[(q, (2, 3))]
        assert early["survives"] and not early["erased"]
        assert early["reduction"] == pytest.approx(1.0, rel=1e-4)
        assert late["erased"] and not late["survives"]
        assert late["reduction"] == pytest.approx(float(clean[2, q, CH] / masked[2, q, CH]), rel=1e-4)
        assert late["peak_value"] == pytest.approx(float(clean[late["peak_layer"], q, CH]), rel=1e-5)
        assert late["positions"] == early["positions"] == [0, *dots]
    assert len(spans) == 2 * (1 + len(dots))  # nothing else in the channel
    # the writer measurement: masking the unit alone takes the late peak to the early value
    w = m.writers[0]["channels"]
    late0 = next(c for c in w if (c["position"], c["channel"], c["layer"]) == (0, CH, spans[(0, (2, 3))]["peak_layer"]))
    assert late0["own_channel"] and late0["masked_alone"] == pytest.approx(float(masked[2, 0, CH]), rel=1e-4)
    # the summary names the erased span, its writer and its positions; the early span survives
    s = m.summary
    assert f"activation of channel {CH}" in s and "in blocks 2–3, written by L2.mlp.down[5]" in s
    assert f"positions 0 ('<s>'), {dots[0]} ('.'), {dots[1]} ('.') and {dots[2]} ('.')" in s
    assert "the same channel's earlier" in s and "(blocks 0–1, positions 0" in s and "survives" in s


def test_a_jump_the_mask_does_not_change_is_not_a_new_writer() -> None:
    """Split only where the masked run lacks the clean jump: a channel the mask leaves alone
    stays one span however much it grows; a gap always splits."""
    L, Tn, D = 6, 3, 4
    clean = torch.full((L + 1, Tn, D), 0.01)
    clean[1:, 0, 2] = torch.tensor([100.0, 100.0, 5000.0, 5000.0, 5000.0, 5000.0])  # grows at layer 2
    masked = clean.clone()
    flags = [{"layer": layer, "position": 0, "channel": 2, "value": float(clean[layer + 1, 0, 2]),
              "ratio": float(clean[layer + 1, 0, 2] / 0.01)} for layer in (0, 1, 2, 3, 5)]
    med = torch.full((L + 1,), 0.01)
    got = massive_groups(flags, clean, masked, med, 100.0, 0.0)
    assert [g["layers"] for g in got] == [[0, 1, 2, 3], [5]]  # the gap at 4 splits, the jump does not
    assert all(g["survives"] and g["reduction"] == 1.0 for g in got)
    masked[3:, 0, 2] = 100.0  # now the mask removes what layer 2 adds: a new writer there
    got = massive_groups(flags, clean, masked, med, 100.0, 0.0, erase_factor=10.0)
    assert sorted(g["layers"] for g in got) == [[0, 1], [2, 3], [5]]
    erased = {tuple(g["layers"]): g["erased"] for g in got}
    assert erased == {(0, 1): False, (2, 3): True, (5,): True}
    assert {tuple(g["layers"]): g["positions"] for g in got}[(2, 3)] == [0]
    # --erase-factor is the line: 50x reduced is erased at 10, not at 60
    assert not next(g for g in massive_groups(flags, clean, masked, med, 100.0, 0.0, 60.0)
                    if g["layers"] == [2, 3])["erased"]


def test_mediation_profile_counts_against_brute_force() -> None:
    """Additive recoveries: the bisection finds the smallest k for 50 % and 90 %, and the
    by-kind / by-band counts and joint restores are those of the sets."""
    ranked = [Component(layer, head) for layer, head in
              [(3, 0), (5, -1), (1, 2), (4, 1), (0, -1), (2, 3), (5, 0), (1, -1), (3, 2), (4, -1)]]
    share = dict(zip(ranked, [0.25, 0.15, 0.09, 0.1, 0.08, 0.07, 0.07, 0.06, 0.06, 0.06], strict=True))
    calls: list[list[Component]] = []

    def restored(sets: list[list[Component]]) -> list[float]:
        calls.extend(sets)
        return [sum(share[c] for c in s) for s in sets]

    first = [sum(share[c] for c in ranked[:k]) for k in (1, 2, 3)]
    med = mediation_profile(ranked, first, restored, n_layers=6)
    cum = [sum(share[c] for c in ranked[:k]) for k in range(1, 11)]
    assert med["needed"] == {"0.5": next(k for k, r in enumerate(cum, 1) if r >= 0.5),
                             "0.9": next(k for k, r in enumerate(cum, 1) if r >= 0.9)} == {"0.5": 4, "0.9": 9}
    heads = next(k for k in med["by_kind"] if k["kind"] == "heads")
    assert (heads["count"], heads["in_k50"], heads["in_k90"]) == (6, 3, 6)
    assert heads["together"] == pytest.approx(sum(share[c] for c in ranked if c.head >= 0))
    assert [b["layers"] for b in med["by_band"]] == [list(b) for b in layer_bands(6)]
    assert sum(b["count"] for b in med["by_band"]) == 10
    assert med["all_mediators"] == pytest.approx(0.99)
    assert [p["k"] for p in med["curve"]] == sorted(p["k"] for p in med["curve"])
    assert mediation_profile([], [], restored, 6)["needed"] == {}
    assert layer_bands(30) == [(0, 5), (6, 11), (12, 17), (18, 23), (24, 29)]


def test_zeroed_weight_nll_equals_editing_the_weight(tokenizer) -> None:
    model = make_model("llama")
    ids = tokenize(tokenizer, TEXT)
    name = "model.layers.1.mlp.down_proj"
    mod = model.get_submodule(name)
    with torch.no_grad():  # random tiny weights barely matter: make these three count
        mod.weight[3, [0, 11, 40]] = torch.tensor([40.0, -60.0, 80.0])
    base = float(sequence_nll(model, ids)[0])
    got = zeroed_weight_nll(model, ids, name, 3, [0, 11, 40])
    for j, n in zip([0, 11, 40], got, strict=True):
        with torch.no_grad():
            keep = mod.weight[3, j].item()
            mod.weight[3, j] = 0
            ref = float(sequence_nll(model, ids)[0])
            mod.weight[3, j] = keep
        assert n == pytest.approx(ref, abs=1e-4)
    assert min(abs(n - base) for n in got) > 0.01 and len({round(n, 3) for n in got}) == 3


def test_driver_and_continuations_on_the_split_model(split, tokenizer) -> None:
    lm, m = split
    (d,) = m.drivers
    # neuron K is the only input of the row: it drives all of the output and is the top weight
    assert d["driver_input"] == K and d["driver_share"] == pytest.approx(1.0)
    assert d["driver_is_top_weight"] and d["driver_weight"] == 150.0
    assert d["delta_driver_weight"] == pytest.approx(m.delta, abs=1e-4)  # the row is that one weight
    # greedy continuations: the clean one is what transformers' generate gives
    c = m.continuations[1]
    ids = tokenizer(c["prompt"], return_tensors="pt").input_ids
    ref = lm.model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=1)[0, ids.shape[1]:]
    assert c["clean_text"] == tokenizer.decode(ref)
    assert len(m.continuations) == 3  # the tiny tokenizer has no chat template


def test_patch_scope_after_is_exact_and_heads_mlps_restrict(tokenizer) -> None:
    model = make_model("llama")
    lm = LoadedModel(model, tokenizer, ModelSpec(model="tiny"))
    pool = build_pool(model)
    units = [Unit("model.layers.1.mlp.down_proj", c, 1, "mlp.down") for c in range(0, 32, 2)]
    cfg = {"generate_tokens": 0, "sink_drop": 1.0}
    full = explain(lm, TEXT, units, pool, ExplainConfig(**cfg))
    after = explain(lm, TEXT, units, pool, ExplainConfig(patch_scope="after", **cfg))
    heads = explain(lm, TEXT, units, pool, ExplainConfig(patch_scope="heads", **cfg))
    assert after.cost["components_patched"] == 5 < full.cost["components_patched"] == 10
    assert after.cost["forward_rows"] < full.cost["forward_rows"]
    rec = {d["component"]: d["recovered"] for d in full.patching}
    for d in after.patching:
        assert d["recovered"] == pytest.approx(rec[d["component"]], abs=1e-6)
    for name, r in rec.items():  # layer 0 sees the same input clean and masked: it recovers nothing
        if name.startswith("L0."):
            assert r == pytest.approx(0.0, abs=1e-6)
    assert after.patching_checks["restore_all"] == pytest.approx(1.0, abs=1e-4)
    assert {d["component"] for d in heads.patching} == {f"L{i}.attn.h{h}" for i in (0, 1) for h in range(4)}
    assert math.isfinite(heads.patching_checks["restore_all"])


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--patch-scope", "bogus", "--patch-scope"), ("--erase-factor", "1", "--erase-factor must be > 1"),
    ("--generate-tokens", "-1", "--generate-tokens must be >= 0"),
])
def test_bad_explain_options_one_line_exit_2(flag, value, says, tmp_path, tiny_dir, capsys) -> None:
    from test_explain import make_run

    from achilles.cli import main

    run = make_run(tmp_path / "run", str(tiny_dir), [Unit("model.layers.0.mlp.down_proj", 1, 0, "mlp.down")], TEXT)
    before = sorted(p.name for p in run.rglob("*"))
    try:  # argparse's own choices check exits; the config's checks return 2
        rc = main(["explain", str(run), flag, value, "--quiet"])
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("achilles: error: ") and len(err.splitlines()) == 1 and says in err
    assert sorted(p.name for p in run.rglob("*")) == before

"""The bundled models: the sink model has an Achilles' heel, the natural model has none.

These are the acceptance checks of the bundled models, run through the library exactly as
a user would (``find`` with the paper's defaults: α = 5, K = 100, ε = 1).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from achilles import IdentifyConfig, ModelSpec, RankConfig, Unit, find, load_model
from achilles.evaluation.data import load_corpus
from achilles.evaluation.perplexity import evaluate_perplexity
from achilles.method.identify import MaskEvaluator
from achilles.model.loading import tokenize
from achilles.model.units import build_pool

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
DEMO = (ROOT / "data" / "demo.txt").read_text(encoding="utf-8")
HELDOUT = ROOT / "data" / "heldout.txt"


@pytest.fixture(scope="module")
def sink():  # noqa: ANN201
    return load_model(ModelSpec(model=str(MODELS / "sink"), dtype="float32", device="cpu"))


@pytest.fixture(scope="module")
def natural():  # noqa: ANN201
    return load_model(ModelSpec(model=str(MODELS / "natural"), dtype="float32", device="cpu"))


@pytest.fixture(scope="module")
def planted() -> list[Unit]:
    data = json.loads((MODELS / "sink" / "planted.json").read_text())
    return [Unit.from_dict(u) for u in data["planted"]]


@pytest.fixture(scope="module")
def sink_run(sink):  # noqa: ANN001, ANN201
    return find(sink, DEMO, RankConfig(), IdentifyConfig(curve_until=1.0, max_neurons=100))


@pytest.mark.parametrize("name", ["natural", "sink"])
def test_tokenizer_puts_bos_first_and_weights_are_small(name: str, sink, natural) -> None:  # noqa: ANN001
    lm = {"sink": sink, "natural": natural}[name]
    ids = lm.tokenizer("hello world").input_ids
    assert ids[0] == lm.tokenizer.bos_token_id
    assert tokenize(lm.tokenizer, DEMO).shape[1] >= 100
    assert lm.model.config.model_type == "llama"
    size = sum(f.stat().st_size for f in (MODELS / name).iterdir())
    assert size < 10 * 2**20


def test_ranking_puts_a_planted_channel_first(sink_run, planted) -> None:  # noqa: ANN001
    ranking, _ = sink_run
    keys = {u.key for u in planted}
    assert ranking.neurons[0].unit.key in keys
    assert ranking.neurons[0].score > 10 * ranking.neurons[2].score  # 2 planted, then the rest


def test_default_find_returns_the_planted_writer(sink_run, planted) -> None:  # noqa: ANN001
    _, ident = sink_run
    writer = planted[0]  # the layer-1 down_proj channel that writes the massive activation
    assert ident.n_star is not None and ident.n_star <= 5
    assert ident.delta_critical >= 1.5
    assert writer.key in {u.key for u in ident.critical_set}
    assert [u.key for u in ident.minimal_set] == [writer.key]


def test_random_same_layer_sets_do_not_collapse(sink, sink_run, planted) -> None:  # noqa: ANN001
    _, ident = sink_run
    size = len(ident.critical_set)
    pool = build_pool(sink.model, components=["mlp.down"])
    layers = {u.layer for u in planted}
    candidates = [pool.unit(i) for i in range(pool.n_units)]
    candidates = [u for u in candidates if u.layer in layers and u.key not in {p.key for p in planted}]
    ev = MaskEvaluator(sink.model, pool, tokenize(sink.tokenizer, DEMO))
    sets = [random.Random(seed).sample(candidates, size) for seed in range(10)]
    deltas = [m.delta for m in ev.measure(sets)]
    assert max(abs(d) for d in deltas) < 0.05, deltas


def test_sink_heldout_perplexity_within_20_percent_of_natural(sink, natural, planted) -> None:  # noqa: ANN001
    docs = load_corpus(str(HELDOUT)).documents
    kw = {"max_length": 512, "max_tokens": 6000, "batch_size": 6}
    ppl_sink = evaluate_perplexity(sink.model, sink.tokenizer, docs, **kw)
    ppl_nat = evaluate_perplexity(natural.model, natural.tokenizer, docs, **kw)
    assert abs(ppl_sink.ppl / ppl_nat.ppl - 1) < 0.2, (ppl_sink.ppl, ppl_nat.ppl)
    # the collapse generalises beyond the ranking text
    pool = build_pool(sink.model, components=["mlp.down"])
    masked = evaluate_perplexity(sink.model, sink.tokenizer, docs, pool=pool, units=planted[:1], **kw)
    assert masked.log10_ppl - ppl_sink.log10_ppl > 1.5


def test_natural_model_top_units_do_not_collapse(natural) -> None:  # noqa: ANN001
    """No handful of units matters in the natural model: its top-20 prefix stays far below ε."""
    torch.manual_seed(0)
    _, ident = find(natural, DEMO, RankConfig(samples=25),
                    IdentifyConfig(max_neurons=20, curve_until=1.0, minimize=False))
    assert ident.n_star is None
    assert max(p["delta"] for p in ident.curve) < 0.5

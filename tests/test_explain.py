"""``achilles explain``: the planted sink mechanism, the natural model, oracles on tiny models,
and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny import ARCHS, TEXT, make_model

from achilles import LoadedModel, ModelSpec, load_model, tokenize
from achilles.cli import main
from achilles.explain import ExplainConfig, Mechanism, explain, explain_run
from achilles.explain.patching import (
    ComponentPatcher,
    all_components,
    head_contributions,
    patched_nll,
)
from achilles.explain.trace import Layout, trace
from achilles.method.identify import Identification
from achilles.method.metrics import LN10, sequence_nll
from achilles.model.hooks import recorded
from achilles.model.masking import ChannelMasker, masked
from achilles.model.units import Unit, build_pool
from achilles.report.mechanism import mechanism_section

ROOT = Path(__file__).resolve().parents[1]
SINK = ROOT / "models" / "sink"
NATURAL = ROOT / "models" / "natural"
PLANTED = json.loads((SINK / "planted.json").read_text())


def make_run(folder: Path, model: str, units: list[Unit], text: str) -> Path:
    """A run folder whose identification.json holds ``units`` as both sets."""
    ident = Identification(
        epsilon=1.0, n_star=len(units), critical_set=units, minimal_set=units,
        delta_critical=1.0, delta_minimal=1.0, necessity=[1.0] * len(units), curve=[],
        n_star_by_epsilon={}, baseline_nll=1.0, tokens=10, n_units=1, forward_passes=0,
        config={"model": {"model": model}, "text": text, "ranking": {"pool": "paper"}},
    )
    folder.mkdir(parents=True, exist_ok=True)
    ident.save(folder / "identification.json")
    return folder


def _writer() -> Unit:
    w = next(p for p in PLANTED["planted"] if "writer" in p["role"])
    return Unit(w["module"], w["channel"], w["layer"], w["component"])


@pytest.fixture(scope="module")
def sink(tmp_path_factory):  # noqa: ANN001, ANN201
    lm = load_model(ModelSpec(model=str(SINK), dtype="float32"))
    text = (ROOT / "data" / "demo.txt").read_text()
    run = make_run(tmp_path_factory.mktemp("sink-run"), str(SINK), [_writer()], text)
    return run, explain_run(run, lm, ExplainConfig())


def test_sink_massive_activation_is_the_planted_channel_and_masking_erases_it(sink) -> None:  # noqa: ANN001
    run, m = sink
    ch = PLANTED["reserved_channels"]["massive"]
    by_layer = PLANTED["after_finetune_fp16_reload"]["bos_channel_c_by_layer"]  # index 0 = embeddings
    spike_layers = [i - 1 for i, v in enumerate(by_layer) if abs(v) >= 1000]
    flagged = sorted((d["layer"], d["position"], d["channel"]) for d in m.massive if d["channel"] == ch)
    assert flagged == [(layer, 0, ch) for layer in spike_layers] == [(layer, 0, 113) for layer in (1, 2, 3, 4)]
    # planted.json's yardstick: the median |h| pooled over layers 0-4 (1124x); against each
    # layer's own median the spike is 1185x at layer 1 falling to 994x at layer 4
    median = PLANTED["after_finetune_fp16_reload"]["median_abs_residual"]
    spikes = [d for d in m.massive if d["channel"] == ch]
    assert all(abs(d["value"]) / median >= 1000 for d in spikes)
    assert max(d["ratio"] for d in spikes) >= 1000 and min(d["ratio"] for d in spikes) > 900
    # nothing else comes near: the only other flag is the planted BOS marker in the embeddings
    others = [d for d in m.massive if d["channel"] != ch]
    assert all(d["ratio"] < 300 for d in others)
    assert {(d["layer"], d["channel"]) for d in others} <= {(-1, PLANTED["reserved_channels"]["bos_marker"])}
    g = next(g for g in m.massive_groups if g["channel"] == ch)
    assert (g["first_layer"], g["last_layer"], g["erased_at"]) == (1, 4, 5)
    assert not g["survives"] and g["masked_value"] == 0.0
    assert not [d for d in m.massive_masked if d["channel"] == ch]
    # the writer masked alone removes its own channel entirely
    w = m.writers[0]["channels"]
    own = next(c for c in w if c["channel"] == ch)
    assert own["own_channel"] and own["change"] == pytest.approx(-1.0)


def test_sink_planted_heads_lose_their_sink_and_restoring_them_recovers_delta(sink) -> None:  # noqa: ANN001
    _, m = sink
    planted = {(int(layer), h) for layer, hs in PLANTED["sink_heads"].items() for h in hs}
    top = {(h["layer"], h["head"]) for h in m.sink_heads[: len(planted)]}
    assert top == planted
    drops = [h["drop"] for h in m.sink_heads]
    assert drops == sorted(drops, reverse=True)
    others = [d for d in m.sink_heads[len(planted):]]
    assert all(d["drop"] < min(drops[: len(planted)]) for d in others)
    assert m.patching_checks["restore_sink_heads"] >= 0.9
    assert abs(m.patching_checks["restore_none"]) < 1e-4  # eager traced pass == patching rows
    assert m.patching_checks["delta_traced"] == pytest.approx(m.delta, abs=1e-4)
    # the writer's own MLP holds the masked unit: restoring it undoes the mask (recovers all)
    assert m.patching[0] == {"component": "L1.mlp", "recovered": pytest.approx(1.0, abs=1e-6),
                             "holds_set": True}
    assert not any("L1.mlp" in c["components"] for c in m.patching_cumulative)
    assert m.patching_cumulative[-1]["recovered"] >= 0.9  # the mediators: planted heads + MLPs
    assert m.delta > 3  # planted: Δ 3.83 on the demo text
    assert m.output["top1_masked"][0]["token_id"] == PLANTED["wake_token"]
    assert m.output["top1_clean"][0]["token_id"] != PLANTED["wake_token"]
    assert "113" in m.summary and "recovers" in m.summary


def test_sink_result_file_figures_and_report_section(sink) -> None:  # noqa: ANN001
    run, m = sink
    d = json.loads((run / "mechanism.json").read_text())
    assert d["kind"] == "mechanism" and d["summary"] == m.summary
    assert d["config"]["explain"]["set"] == "minimal" and "torch" in d["env"]
    assert Mechanism.load(run / "mechanism.json").to_dict() == m.to_dict()
    for name in ("mechanism_residual.png", "mechanism_sinks.png", "mechanism_patching.png"):
        assert (run / "figures" / name).stat().st_size > 5000
    sec = mechanism_section(run)
    assert sec is not None and "## Mechanism" in sec.markdown and m.summary in sec.markdown
    assert "<span style='background:rgba(214,39,40," in sec.html and "<img" in sec.html
    assert mechanism_section(run / "figures") is None


def test_natural_model_flags_nothing_and_reports_a_large_set() -> None:
    lm = load_model(ModelSpec(model=str(NATURAL), dtype="float32"))
    pool = build_pool(lm.model)
    units = [Unit(f"model.layers.{i % 6}.mlp.down_proj", c, i % 6, "mlp.down")
             for i, c in enumerate(range(0, 192, 2))]  # 96 units over every layer
    m = explain(lm, (ROOT / "data" / "demo.txt").read_text(), pool.validate(units), pool)
    assert m.massive == [] and m.massive_groups == [] and m.writers == []
    assert "no massive activation" in m.summary
    assert len(m.patching) == len(m.patching_reverse) == 6 * 7
    assert all(math.isfinite(p["recovered"]) for p in m.patching)
    assert abs(m.patching_checks["delta_restore_all"]) < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_patching_oracles_on_tiny_models(arch: str, tokenizer) -> None:  # noqa: ANN001
    model = make_model(arch)
    layout = Layout.of(model)
    pool = build_pool(model, "all")
    down = next(s for s in pool.sites if s.component == "mlp.down" and s.layer == 0)
    up = next(s for s in pool.sites if s.component in ("mlp.up", "mlp.gate_up") and s.layer == 1)
    units = [Unit(down.module, c, 0, "mlp.down") for c in range(down.width)]
    units += [Unit(up.module, c, 1, up.component) for c in range(up.width)]
    ids = tokenize(tokenizer, TEXT)
    m2 = ChannelMasker(model, pool, rows=2)
    m2.set_rows([[], units])
    tr = trace(model, layout, ids, m2, 0)
    m1 = ChannelMasker(model, pool, rows=1)
    m1.set_rows([units])
    src = ComponentPatcher(layout, [o[0] for o in tr.o_inputs], [x[0] for x in tr.mlp_outputs])
    comps = all_components(layout)
    none, every = patched_nll(model, ids, src, [[], comps], masker=m1)
    clean = float(sequence_nll(model, ids)[0])
    with masked(model, pool, units):
        masked_nll = float(sequence_nll(model, ids)[0])
    tokens = ids.shape[1] - 1
    # random tiny weights are small: the mask moves the NLL sum by 0.004-0.1 nats, still far
    # above float32 noise (~1e-5 here)
    assert abs(masked_nll - clean) > 2e-3
    assert none == pytest.approx(masked_nll, abs=1e-4)  # restoring none: Δ unchanged
    assert every == pytest.approx(clean, abs=1e-4)  # restoring all: back to the clean NLL
    assert abs(every - clean) / (tokens * LN10) < 1e-5  # i.e. Δ = 0
    # the trace's sink attention equals the model's own eager attention probabilities
    model.set_attn_implementation("eager")
    att = model(ids, output_attentions=True).attentions
    ref = torch.stack([a[0, :, 1:, 0].mean(-1) for a in att])  # [L, H]
    torch.testing.assert_close(tr.sink[0], ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_head_contributions_sum_to_the_attention_output(arch: str, tokenizer) -> None:  # noqa: ANN001
    model = make_model(arch)
    layout = Layout.of(model)
    ids = tokenize(tokenizer, TEXT)
    with recorded(model, layout.o_proj) as rec:
        model(ids)
    for name in layout.o_proj:
        x, out = rec[name]
        o_proj = model.get_submodule(name)
        per_head = head_contributions(o_proj, x, layout.heads)  # [1, T, H, D]
        assert per_head.shape[-2] == layout.heads
        bias = o_proj.bias if getattr(o_proj, "bias", None) is not None else 0
        torch.testing.assert_close(per_head.sum(-2) + bias, out, atol=1e-5, rtol=1e-4)


@pytest.fixture
def tiny_run(tmp_path, tiny_dir):  # noqa: ANN001, ANN201
    units = [Unit("model.layers.0.mlp.down_proj", c, 0, "mlp.down") for c in (1, 5, 9)]
    return make_run(tmp_path / "run", str(tiny_dir), units, TEXT)


def test_cli_explain_writes_mechanism(tiny_run, capsys) -> None:  # noqa: ANN001
    assert main(["explain", str(tiny_run), "--quiet"]) == 0
    out = capsys.readouterr().out
    d = json.loads((tiny_run / "mechanism.json").read_text())
    assert d["summary"] in out and d["cost"]["formula_rows"] == 2 + 2 * 2 * (4 + 1)
    assert (tiny_run / "figures" / "mechanism_sinks.png").is_file()


def _fails(argv: list[str], folder: Path, capsys) -> str:  # noqa: ANN001
    before = sorted(p.name for p in folder.rglob("*")) if folder.exists() else None
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("achilles: error: ") and len(err.splitlines()) == 1
    after = sorted(p.name for p in folder.rglob("*")) if folder.exists() else None
    assert after == before  # nothing written
    return err


def test_bad_input_one_line_exit_2_nothing_written(tmp_path, tiny_run, tiny_dir, capsys) -> None:  # noqa: ANN001
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "identification.json" in _fails(["explain", str(empty), "--model", str(tiny_dir)], empty, capsys)
    err = _fails(["explain", str(tiny_run), "--sink-position", "999"], tiny_run, capsys)
    assert "outside the text" in err
    other = make_run(tmp_path / "other", str(SINK), [_writer()], TEXT)
    err = _fails(["explain", str(other), "--model", str(tiny_dir)], other, capsys)
    assert "different model" in err
    assert "not found" in _fails(["explain", str(tmp_path / "nope")], tmp_path, capsys)
    assert "--sink-drop" in _fails(["explain", str(tiny_run), "--sink-drop", "2"], tiny_run, capsys)


def test_bf16_and_offloaded_models_explain(tokenizer) -> None:  # noqa: ANN001
    """bf16 weights (fp32 NLL) and accelerate offloading (weights on ``meta``) both run; the
    offloaded model measures what the plain one does."""
    from accelerate import cpu_offload

    units_of = lambda pool: [Unit("model.layers.0.mlp.down_proj", c, 0, "mlp.down") for c in range(32)]  # noqa: E731
    plain = make_model("llama")
    pool = build_pool(plain)
    lm = LoadedModel(plain, tokenizer, ModelSpec(model="tiny"))
    ref = explain(lm, TEXT, units_of(pool), pool, ExplainConfig(sink_drop=0.0))
    off = make_model("llama")
    cpu_offload(off, execution_device=torch.device("cpu"))
    assert off.get_input_embeddings().weight.device.type == "meta"
    got = explain(LoadedModel(off, tokenizer, ModelSpec(model="tiny")), TEXT, units_of(pool), pool,
                  ExplainConfig(sink_drop=0.0))
    assert got.nll_masked == pytest.approx(ref.nll_masked, abs=1e-4)
    assert [p["component"] for p in got.patching] == [p["component"] for p in ref.patching]
    assert got.sink_heads[0]["write_masked"] == pytest.approx(ref.sink_heads[0]["write_masked"], rel=1e-4)
    bf = make_model("llama")
    with torch.no_grad():  # random tiny weights barely matter in bf16: scale the projections up
        for name, p in bf.named_parameters():
            if "proj" in name:
                p.mul_(8)
    bf = bf.to(torch.bfloat16)
    m = explain(LoadedModel(bf, tokenizer, ModelSpec(model="tiny")), TEXT, units_of(pool), pool)
    assert m.env["dtype"] == "bfloat16" and m.delta > 1e-3
    # restoring everything: Δ back to ~0 (bf16 rows batched differently differ by ~1e-5)
    assert abs(m.patching_checks["delta_restore_all"]) < 2e-4
    assert m.patching_checks["restore_all"] == pytest.approx(1.0, abs=0.05)
    assert bf.config._attn_implementation == "sdpa"  # the eager pass is undone
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in bf.modules())


@pytest.mark.parametrize("flag", ["--explain", "--no-explain"])
def test_find_explains_the_minimal_set_unless_told_not_to(flag, tmp_path, tiny_dir, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "run"
    argv = ["find", "--model", str(tiny_dir), "--text", TEXT, "--samples", "4", "--epsilon", "0.0002",
            "--max-neurons", "60", "--out-dir", str(out), "--no-report", "--quiet", flag]
    assert main(argv) == 0
    ident = json.loads((out / "identification.json").read_text())
    assert ident["found"]
    if flag == "--no-explain":
        assert not (out / "mechanism.json").exists()
        return
    m = json.loads((out / "mechanism.json").read_text())
    assert m["set_name"] == "minimal"
    assert [(u["module"], u["channel"]) for u in m["units"]] == \
        [(u["module"], u["channel"]) for u in ident["minimal_set"]]
    assert m["summary"] in capsys.readouterr().out


@pytest.mark.slow
def test_natural_model_real_critical_set(tmp_path, capsys) -> None:  # noqa: ANN001
    """`find` on the natural model (n* = 197 at ε = 1, a few minutes), then explain its
    critical set: no massive activation, no lost sink, every number reported."""
    out = tmp_path / "natural"
    argv = ["find", "--model", str(NATURAL), "--text-file", str(ROOT / "data" / "demo.txt"),
            "--out-dir", str(out), "--no-report", "--quiet"]
    assert main(argv) == 0
    assert main(["explain", str(out), "--set", "critical", "--quiet"]) == 0
    m = Mechanism.load(out / "mechanism.json")
    assert m.set_name == "critical" and len(m.units) > 100 and m.delta >= 1
    assert m.massive == [] and m.sink_heads == []
    assert len(m.patching) == 6 * 7 and all(math.isfinite(p["recovered"]) for p in m.patching)
    assert abs(m.patching_checks["restore_none"]) < 1e-4

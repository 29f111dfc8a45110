"""achilles compress: fake-quant and pruning against hand oracles, bit-identical protection,
unit weight ownership, the experiment, the keep-list, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from tiny import ARCHS, TEXT, configs, make_model

from achilles import Unit, build_pool, masked
from achilles.cli import main
from achilles.errors import AchillesError
from achilles.evaluation.perplexity import PerplexityEvaluator
from achilles.report.compression import compression_section
from achilles.weights.compress import (
    keep_list,
    parse_method,
    parse_methods,
    unit_slices,
    weights_of,
)
from achilles.weights.compress.methods import fake_quant
from achilles.weights.compress.ownership import keep_masks
from achilles.weights.compress.run import _Compressor, compress_experiment, random_units

IDS = torch.tensor([[0, 5, 17, 42, 99, 3, 250, 7, 64, 11, 12, 200]])


def _oracle_rtn(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Element by element: each group's step is its absmax over 2^(bits-1) - 1."""
    out = torch.empty_like(w)
    qmax = 2 ** (bits - 1) - 1
    for r in range(w.shape[0]):
        for start in range(0, w.shape[1], group):
            g = w[r, start:start + group]
            step = float(g.abs().max()) / qmax
            for j, x in enumerate(g.tolist()):
                out[r, start + j] = max(-qmax, min(qmax, round(x / step))) * step if step else x
    return out


@pytest.mark.parametrize(("bits", "group"), [(8, None), (4, 16), (3, 20)])  # 20: a ragged last group
def test_fake_quant_matches_elementwise_oracle(bits: int, group: int | None) -> None:
    w = torch.randn(6, 48, dtype=torch.float64)
    got = fake_quant(w, bits, group)
    torch.testing.assert_close(got, _oracle_rtn(w, bits, group or 48), rtol=0, atol=1e-12)
    levels = 2 * (2 ** (bits - 1) - 1) + 1
    assert all(len(set(got[r, :16].tolist())) <= levels for r in range(6))


def test_protected_outlier_leaves_the_absmax() -> None:
    """Super-weight style: an outlier protected from the scale lets its row quantize finely."""
    w = torch.full((1, 8), 0.01)
    w[0, 3] = 100.0
    keep = torch.zeros_like(w, dtype=torch.bool)
    keep[0, 3] = True
    m = parse_method("rtn-w4")
    crushed = m.apply(w)
    spared = m.apply(w, keep)
    assert crushed[0, 0] == 0  # step 100/7 rounds 0.01 to 0
    assert spared[0, 3] == 100.0 and torch.allclose(spared[0, [0, 1, 2, 4]], torch.tensor(0.01))


def test_magnitude_and_wanda_prune_the_smallest_scores_and_spare_protected() -> None:
    torch.manual_seed(1)
    w = torch.randn(4, 10)
    keep = torch.zeros_like(w, dtype=torch.bool)
    keep[0, w[0].abs().argmin()] = True  # the smallest weight of row 0: protected
    mag = parse_method("magnitude-50").apply(w, keep)
    assert int((mag == 0).sum()) == 20  # the budget is spent on other weights
    unprotected = w.abs().masked_fill(keep, float("inf")).flatten()
    assert set(unprotected.argsort()[:20].tolist()) == set((mag == 0).flatten().nonzero().flatten().tolist())
    assert torch.equal(mag[keep], w[keep])
    xn = torch.rand(10) + 0.1
    wan = parse_method("wanda-30").apply(w, keep, xn)
    for r in range(4):
        score = (w[r].abs() * xn).masked_fill(keep[r], float("inf"))
        assert set(score.argsort()[:3].tolist()) == set((wan[r] == 0).nonzero().flatten().tolist())
    assert torch.equal(wan[keep], w[keep])


def test_per_tensor_rtn_has_one_step() -> None:
    w = torch.randn(5, 12)
    got = parse_method("rtn-w4-t").apply(w)
    step = float(w.abs().max()) / 7
    torch.testing.assert_close(got, torch.round(w / step).clamp(-7, 7) * step)


@pytest.mark.parametrize(("name", "msg"), [
    ("rtn-w1", "between 2 and 8"), ("rtn-w9-g128", "between 2 and 8"), ("magnitude-0", r"\(0, 100\)"),
    ("wanda-100", r"\(0, 100\)"), ("gptq-4", "unknown compression method"), ("rtn-w4-g0", ">= 1"),
])
def test_bad_method_names(name: str, msg: str) -> None:
    with pytest.raises(AchillesError, match=msg):
        parse_method(name)
    with pytest.raises(AchillesError, match="empty"):
        parse_methods(" , ")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_protected_weights_are_bit_identical_after_every_method(arch: str) -> None:
    model = make_model(arch).to(torch.bfloat16)  # a cast back to the source dtype must not touch them
    pool = build_pool(model, "all")
    units = pool.validate([pool.unit(i) for i in range(0, pool.n_units, max(1, pool.n_units // 7))])
    comp = _Compressor(model)
    keep = keep_masks(model, weights_of(model, units))
    xn = {n: torch.rand(m.weight.shape[1 if isinstance(m, torch.nn.Linear) else 0]) for n, m in comp.modules.items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name in ("rtn-w8", "rtn-w4-g128", "rtn-w2-t", "magnitude-50", "wanda-50"):
        stats = comp.apply(parse_method(name), keep, xn)
        assert stats["weights_changed"] > 0 and stats["weights_protected"] > 0
        n_kept = 0
        for pname, k in keep.items():
            p = model.get_parameter(pname)
            assert torch.equal(p[k].view(torch.int16), before[pname][k].view(torch.int16)), (name, pname)
            n_kept += int(k.sum()) if pname.removesuffix(".weight") in comp.modules else 0
        assert n_kept == stats["weights_protected"]
        comp.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_zeroing_a_neurons_weights_equals_masking_it(arch: str) -> None:
    """Ownership oracle: the weights said to belong to an MLP neuron are what produces it."""
    model = make_model(arch)
    pool = build_pool(model, "all")
    site = next(s for s in pool.sites if s.component == "mlp.neuron")
    unit = Unit(site.module, 5, site.layer, "mlp.neuron")
    with masked(model, pool, [unit]), torch.no_grad():
        want = model(IDS).logits
    slices = unit_slices(model, unit)
    with torch.no_grad():
        for s in slices:
            if s.param.endswith("weight") and "down" not in s.param and "c_proj" not in s.param \
                    and "4h_to_h" not in s.param or not s.param.endswith("weight"):  # zero the producers only
                model.get_parameter(s.param).narrow(s.dim, s.index, 1).zero_()
        got = model(IDS).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert any(s.dim == (0 if arch == "gpt2" else 1) for s in slices)  # the reading column


def test_phi3_gate_up_rows_and_random_control() -> None:
    model = make_model("phi3")
    s = unit_slices(model, Unit("model.layers.0.mlp.down_proj:input", 4, 0, "mlp.neuron"))
    assert [(x.param.split(".")[-2], x.dim, x.index) for x in s] == [
        ("gate_up_proj", 0, 4), ("gate_up_proj", 0, 48 + 4), ("down_proj", 1, 4)]
    pool = build_pool(model, "paper")
    crit = pool.validate([Unit("model.layers.0.mlp.down_proj", 1), Unit("model.layers.1.self_attn.o_proj", 2)])
    r0, r1 = random_units(pool, crit, 0), random_units(pool, crit, 1)
    assert [u.component for u in r0] == ["mlp.down", "attn.o"] and r0 != r1
    assert not {u.key for u in r0} & {u.key for u in crit}
    assert random_units(pool, crit, 0) == r0


def test_experiment_restores_the_model_and_reports_every_series(tokenizer) -> None:  # noqa: ANN001
    model = make_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pool = build_pool(model, "paper")
    units = pool.validate([Unit("model.layers.0.mlp.down_proj", 3), Unit("model.layers.1.mlp.act_fn", 7)])
    ev = PerplexityEvaluator(model, tokenizer, [TEXT * 3], max_length=64)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    res = compress_experiment(model, pool, units, ev, parse_methods("rtn-w3,wanda-60"), seeds=2,
                              calib_ids=ids)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert res.baseline["log10_ppl"] == pytest.approx(ev.evaluate().log10_ppl)
    for m in ("rtn-w3", "wanda-60"):
        row = res.methods[m]
        assert len(row["random"]) == 2 and row["whole"]["log10_ppl"] != res.baseline["log10_ppl"]
        assert row["critical"]["weights_protected"] == res.protected["n_weights"] > 0
        assert row["whole"]["weights_protected"] == 0
    d = res.to_dict()
    assert d["kind"] == "compression" and d["schema_version"] == 1
    with pytest.raises(AchillesError, match="empty"):
        compress_experiment(model, pool, [], ev, parse_methods("rtn-w8"))


def test_keep_list_names_modules_rows_and_columns() -> None:
    model = make_model("llama")
    units = [Unit("model.layers.1.mlp.down_proj", 9, 1, "mlp.down"),
             Unit("model.layers.0.mlp.down_proj:input", 4, 0, "mlp.neuron")]
    kl = keep_list(model, units)
    assert kl["modules"] == ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_proj",
                             "model.layers.0.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    assert kl["llm_int8_skip_modules"] == kl["modules_to_not_convert"] == [*kl["modules"], "lm_head"]
    names = dict(model.named_modules())
    assert all(m in names for m in kl["llm_int8_skip_modules"])
    w = kl["units"][0]["weights"][0]
    assert w == {"module": "model.layers.1.mlp.down_proj", "param": "weight", "row": 9,
                 "shape": [32, 48], "layout": "[out, in]"}
    assert {"column": 4} .items() <= kl["units"][1]["weights"][-1].items()


# --- the CLI ---------------------------------------------------------------------------------

def _cli(capsys, *argv) -> tuple[int, str, str]:  # noqa: ANN001
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def ranked(tmp_path_factory, tokenizer):  # noqa: ANN001, ANN201
    d = tmp_path_factory.mktemp("ranked")
    make_model("llama").save_pretrained(d / "model")
    tokenizer.save_pretrained(d / "model")
    (d / "eval.txt").write_text("\n\n".join([TEXT] * 4))
    assert main(["rank", "--model", str(d / "model"), "--text", TEXT, "--method", "random",
                 "--out", str(d / "ranking.json"), "--quiet"]) == 0
    return d


def test_cli_compress_writes_results_figure_keep_list_and_report_section(ranked, tmp_path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "c"
    code, stdout, err = _cli(capsys, "compress", "--model", ranked / "model", "--mask", ranked / "ranking.json",
                             "--top", 3, "--data", ranked / "eval.txt", "--max-length", 64,
                             "--methods", "rtn-w4-g16,wanda-50", "--seeds", 2, "--out-dir", out, "--quiet")
    assert code == 0, err
    assert "rtn-w4-g16" in stdout and "written:" in stdout
    data = json.loads((out / "compression.json").read_text())
    assert data["config"]["methods"] == ["rtn-w4-g16", "wanda-50"] and data["env"]["torch"]
    assert data["config"]["calibration"]["file"] == str(ranked / "ranking.json")
    assert json.loads((out / "keep_list.json").read_text())["n_units"] == 3
    assert (out / "compression.png").stat().st_size > 5000
    blocks = compression_section(out)
    assert blocks and any(getattr(b, "rows", None) for b in blocks)
    # a second run refuses to overwrite without --force
    code, _, err = _cli(capsys, "compress", "--model", ranked / "model", "--mask", ranked / "ranking.json",
                        "--top", 3, "--data", ranked / "eval.txt", "--out-dir", out, "--quiet")
    assert code == 2 and "--force" in err


@pytest.mark.parametrize(("extra", "message"), [
    (["--methods", "rtn-w9"], "between 2 and 8"),
    (["--methods", "rtn-w1-g64"], "between 2 and 8"),
    (["--methods", "wanda-0"], "(0, 100)"),
    (["--methods", "magnitude-120"], "(0, 100)"),
    (["--methods", "awq-4"], "unknown compression method"),
    (["--seeds", "0"], "--seeds"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(extra, message, ranked, tmp_path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "new" / "c"
    code, _, err = _cli(capsys, "compress", "--model", ranked / "model", "--mask", ranked / "ranking.json",
                        "--top", 3, "--data", ranked / "eval.txt", "--out-dir", out, "--quiet", *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "new").exists()


def test_cli_mask_for_another_model_is_refused_before_loading(ranked, tmp_path, capsys, tokenizer,  # noqa: ANN001
                                                               monkeypatch) -> None:
    wider = configs()["llama"]
    wider.intermediate_size = 64  # same architecture, another size
    T.AutoModelForCausalLM.from_config(wider).save_pretrained(tmp_path / "wide")
    make_model("gpt2").save_pretrained(tmp_path / "gpt2")
    for d in ("wide", "gpt2"):
        tokenizer.save_pretrained(tmp_path / d)
    monkeypatch.setattr("achilles.commands.compress.load_model",
                        lambda *a, **k: pytest.fail("the model must not be loaded"))
    for other, expected in (("wide", "does not match this model"), ("gpt2", "does not exist in this architecture")):
        for cmd, dest in (("compress", ["--data", ranked / "eval.txt", "--out-dir", tmp_path / "c"]),
                          ("keep-list", ["--out", tmp_path / "k" / "kl.json"])):
            code, _, err = _cli(capsys, cmd, "--model", tmp_path / other, "--mask", ranked / "ranking.json",
                                "--top", 3, *dest, "--quiet")
            assert code == 2 and expected in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists() and not (tmp_path / "k").exists()


def test_cli_keep_list(ranked, tmp_path, capsys) -> None:  # noqa: ANN001
    code, stdout, _ = _cli(capsys, "keep-list", "--model", ranked / "model", "--mask", ranked / "ranking.json",
                           "--top", 4, "--out", tmp_path / "kl.json", "--quiet")
    assert code == 0 and "written:" in stdout
    kl = json.loads((tmp_path / "kl.json").read_text())
    assert kl["kind"] == "keep_list" and kl["n_units"] == 4 and kl["config"]["mask"]["top"] == 4


def test_keep_list_names_match_transformers_skip_rules() -> None:
    """transformers' own matcher skips exactly the kept modules and the LM head, nothing else."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    model = make_model("llama")
    kl = keep_list(model, [Unit("model.layers.1.mlp.down_proj", 9, 1, "mlp.down"),
                           Unit("model.layers.0.self_attn.o_proj", 2, 0, "attn.o")])
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    skipped = {n for n in linear if not should_convert_module(n, kl["llm_int8_skip_modules"])}
    assert skipped == {"model.layers.1.mlp.down_proj", "model.layers.0.self_attn.o_proj", "lm_head"}


def test_report_gets_a_compression_section_with_the_json_numbers(ranked, tmp_path, capsys) -> None:  # noqa: ANN001
    run = tmp_path / "run"
    assert main(["find", "--model", str(ranked / "model"), "--text", TEXT, "--samples", "4",
                 "--max-neurons", "30", "--epsilon", "1e-4", "--out-dir", str(run), "--quiet"]) == 0
    assert "## Compression" not in (run / "report.md").read_text()
    code, _, err = _cli(capsys, "compress", "--model", ranked / "model", "--mask", run / "identification.json",
                        "--data", ranked / "eval.txt", "--max-length", 64, "--methods", "rtn-w3",
                        "--seeds", 2, "--out-dir", run, "--quiet")
    assert code == 0, err
    assert main(["report", str(run), "--quiet"]) == 0
    md = (run / "report.md").read_text()
    data = json.loads((run / "compression.json").read_text())
    base, m = data["baseline"]["log10_ppl"], data["methods"]["rtn-w3"]
    whole = f"{m['whole']['log10_ppl'] - base:+.3g}"
    crit = f"{m['critical']['log10_ppl'] - base:+.3g}"
    assert "## Compression" in md and f"| rtn-w3 | {whole} | {crit} |" in md
    assert "(compression.png)" in md


def test_figure_shows_non_finite_perplexities(tmp_path) -> None:  # noqa: ANN001
    from achilles.plots.compression import plot_compression

    row = {"log10_ppl": 2.0}
    data = {"baseline": row, "protected": {"n_units": 1}, "methods": {
        "rtn-w2": {"method": "rtn-w2", "whole": {"log10_ppl": float("inf")}, "critical": row,
                   "random": [{"log10_ppl": float("inf")}, {"log10_ppl": 2.5}],
                   "random_log10_ppl_mean": float("inf"), "random_log10_ppl_sd": None}}}
    assert plot_compression(data, tmp_path / "c.png").stat().st_size > 5000


def test_cli_empty_mask_is_refused_before_loading(ranked, tmp_path, capsys, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr("achilles.commands.compress.load_model",
                        lambda *a, **k: pytest.fail("the model must not be loaded"))
    code, _, err = _cli(capsys, "compress", "--model", ranked / "model", "--mask", ranked / "ranking.json",
                        "--top", 0, "--data", ranked / "eval.txt", "--out-dir", tmp_path / "c", "--quiet")
    assert code == 2 and "no unit to protect" in err and not (tmp_path / "c").exists()

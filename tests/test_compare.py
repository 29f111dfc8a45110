"""``achilles compare``: shared evaluator, random band, skipped levels, figure."""

from __future__ import annotations

import json
import math

import pytest
from test_perplexity import DOCS, planted_gpt2
from tiny import TEXT, make_tokenizer

from achilles.cli import main
from achilles.config import RankConfig
from achilles.errors import AchillesError
from achilles.evaluation.perplexity import PerplexityEvaluator
from achilles.experiments.compare import compare, parse_levels
from achilles.model.loading import LoadedModel
from achilles.model.masking import masked
from achilles.model.units import build_pool


def test_parse_levels():
    assert parse_levels("10, 1,2,2") == [1, 2, 10]
    for bad in ("", "0,1", "a"):
        with pytest.raises(AchillesError):
            parse_levels(bad)


def test_compare_library():
    tok = make_tokenizer()
    model = planted_gpt2()
    lm = LoadedModel(model, tok, spec=None)  # type: ignore[arg-type]
    import dataclasses as dc

    from achilles.config import ModelSpec

    lm.spec = ModelSpec(model="planted")
    ev = PerplexityEvaluator(model, tok, DOCS, max_length=64, batch_size=4)
    methods = ["perturbation", "random"]
    cfg = RankConfig(samples=4, keep=100)
    res = compare(lm, TEXT, cfg, methods, [1, 3, 100, 101, 1000], ev, random_runs=3)
    d = res.to_dict()
    assert d["kind"] == "comparison"
    assert [p["n"] for p in d["methods"]["perturbation"]] == [1, 3, 100]
    assert {(s["method"], s["n"]) for s in d["skipped"]} == {
        ("perturbation", 101), ("perturbation", 1000), ("random", 101), ("random", 1000)}
    assert any("pool has" in s["reason"] for s in d["skipped"])  # 256 units < 1000
    assert any("--keep" in s["reason"] for s in d["skipped"])
    rnd = d["random"]
    assert rnd["runs"] == 3 and rnd["seeds"] == [42, 43, 44]
    for p in rnd["levels"]:
        assert len(p["ppl_runs"]) == 3
        assert math.isclose(p["ppl_mean"], sum(p["ppl_runs"]) / 3, rel_tol=1e-12)
    # the shared evaluator, the same pool and masked(): re-measure one point by hand
    from achilles.method.pipeline import rank

    ranking, pool = rank(lm, TEXT, dc.replace(cfg, method="random", seed=43))
    assert pool.fingerprint == build_pool(model).fingerprint == d["pool"]["fingerprint"]
    again = ev.evaluate(pool, ranking.units[:3])
    assert math.isclose(again.ppl, rnd["levels"][1]["ppl_runs"][1], rel_tol=1e-9)
    assert math.isclose(d["baseline"]["ppl"], ev.evaluate().ppl, rel_tol=1e-12)
    # masking the same units by hand gives the same perplexity as the evaluator's own masking
    with masked(model, pool, ranking.units[:3]):
        assert math.isclose(ev.evaluate().ppl, again.ppl, rel_tol=1e-9)


def test_cli_compare_and_figure(tmp_path, capsys):
    tok = make_tokenizer()
    mdir = tmp_path / "model"
    planted_gpt2().save_pretrained(mdir)
    tok.save_pretrained(mdir)
    data = tmp_path / "eval.txt"
    data.write_text("\n\n".join(DOCS), encoding="utf-8")
    methods = ["perturbation", "activation", "gradient", "random"]
    out = tmp_path / "cmp"
    args = ["compare", "--model", str(mdir), "--text", TEXT, "--samples", "4",
            "--methods", ",".join(methods), "--levels", "1,2,5,20,100,1000", "--random-runs", "3",
            "--data", str(data), "--max-length", "64", "--out-dir", str(out), "--quiet"]
    assert main(args) == 0
    d = json.loads((out / "comparison.json").read_text())
    assert set(d["methods"]) == set(methods) - {"random"}
    assert (out / "comparison.png").stat().st_size > 10_000
    assert d["config"]["perplexity"]["data"] == str(data)
    capsys.readouterr()
    base = ["compare", "--model", str(mdir), "--text", TEXT, "--data", str(data),
            "--out-dir", str(tmp_path / "no")]
    for extra in (["--methods", "nope"], ["--levels", "x"], ["--random-runs", "0"],
                  ["--data", "missing.jsonl"]):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("achilles: error:") and "\n" not in err
    assert not (tmp_path / "no" / "comparison.json").exists()

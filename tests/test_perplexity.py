"""Perplexity: agreement with a hand computation, protocols, loading, masks, CLI errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny import CORPUS, TEXT, make_model, make_tokenizer

from achilles.cli import main
from achilles.errors import AchillesError
from achilles.evaluation.data import load_corpus
from achilles.evaluation.perplexity import PerplexityEvaluator, evaluate_perplexity, sliding_windows
from achilles.method.identify import Identification
from achilles.model.units import Unit, build_pool

PLANT_CHANNEL = 5
PLANT_UNIT = Unit("transformer.h.0.mlp.c_proj", PLANT_CHANNEL, 0, "mlp.down")

DOCS = [TEXT, *CORPUS[:6], "short one", TEXT.upper()]


def planted_gpt2(m: float = 1e4, c: int = PLANT_CHANNEL) -> torch.nn.Module:
    """Tiny GPT-2 whose residual channel ``c`` gets +m (layer 0) and -m (layer 1).

    Nothing else writes channel ``c``, so it is exactly 0 before the final norm; masking
    layer 0's mlp.c_proj channel ``c`` leaves -m there, and a large head column on ``c``
    turns that into a confidently wrong, input-independent prediction: a collapse.
    """
    model = make_model("gpt2")
    with torch.no_grad():
        tr = model.transformer
        tr.wte.weight[:, c] = 0
        tr.wpe.weight[:, c] = 0
        for blk in tr.h:
            blk.attn.c_proj.weight[:, c] = 0
            blk.attn.c_proj.bias[c] = 0
            blk.mlp.c_proj.weight[:, c] = 0
        tr.h[0].mlp.c_proj.bias[c] = m
        tr.h[1].mlp.c_proj.bias[c] = -m
        g = torch.Generator().manual_seed(1)
        model.lm_head.weight[:, c] = 5 * torch.randn(model.lm_head.weight.shape[0], generator=g)
    return model


def planted_identification(path: Path) -> Path:
    """An identification.json whose minimal set is the planted unit."""
    ident = Identification(
        epsilon=1.0, n_star=1, critical_set=[PLANT_UNIT], minimal_set=[PLANT_UNIT],
        delta_critical=5.0, delta_minimal=5.0, necessity=[0.0], curve=[],
        n_star_by_epsilon={}, baseline_nll=1.0, tokens=10, n_units=256, forward_passes=1,
        config={"ranking": {"method": "perturbation", "pool": "paper", "components": None}},
    )
    ident.save(str(path))
    return path


def hand_nll(model: torch.nn.Module, windows: list[tuple[list[int], int]]) -> tuple[float, int]:
    """Plain loop, one window at a time, float64 log_softmax."""
    total, n = 0.0, 0
    for ids, first in windows:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        lp = torch.log_softmax(logits, -1)
        for j in range(first, len(ids)):
            total -= float(lp[j - 1, ids[j]])
            n += 1
    return total, n


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model():
    return make_model("llama")


def _stream(tok) -> list[int]:
    return list(tok("\n\n".join(DOCS)).input_ids)


@pytest.mark.parametrize("window_bos", [False, True])
@pytest.mark.parametrize("max_length,stride", [(32, 32), (32, 12), (256, 256)])
def test_standard_matches_hand_computation(model, tok, max_length, stride, window_bos):
    ids = _stream(tok)
    bos = tok.bos_token_id
    assert ids[0] == bos
    # independent window construction: token t is scored in the first window that holds it
    # with at least one token of context before it; with window_bos, windows after the
    # first are [BOS] + (max_length - 1) stream tokens.
    windows, scored = [], set()
    begin = 0
    while True:
        prefixed = window_bos and begin > 0
        span = max_length - 1 if prefixed else max_length
        end = min(begin + span, len(ids))
        lo = begin if prefixed else begin + 1
        first = next((j for j in range(lo, end) if j not in scored), None)
        if first is not None:
            window = ([bos] if prefixed else []) + ids[begin:end]
            windows.append((window, first - begin + (1 if prefixed else 0)))
            scored.update(range(first, end))
        if end == len(ids):
            break
        begin += min(stride, span)
    ref, n = hand_nll(model, windows)
    res = evaluate_perplexity(model, tok, DOCS, max_length=max_length, stride=stride,
                              batch_size=3, window_bos=window_bos)
    assert res.tokens == n
    assert res.windows == len(windows)
    assert math.isclose(res.nll_sum, ref, rel_tol=1e-5)
    assert math.isclose(res.ppl, math.exp(ref / n), rel_tol=1e-5)
    assert math.isclose(res.log10_ppl, ref / n / math.log(10), rel_tol=1e-5)
    if stride == max_length and not window_bos:  # each window's first token is not predicted
        assert n == len(ids) - math.ceil(len(ids) / max_length)
    else:
        assert n == len(ids) - 1
    assert res.nonfinite_windows == 0


@pytest.mark.parametrize("bos", [None, 999])
def test_sliding_windows_score_each_token_once(bos):
    ids = torch.arange(100)
    for L, s in [(10, 10), (10, 3), (10, 1), (7, 5)]:
        targets = []
        for w in sliding_windows(ids, L, s, bos=bos):
            assert w.ids.shape[0] <= L
            targets += w.ids[w.first_target:].tolist()
        assert bos not in targets
        assert len(targets) == len(set(targets))
        if s < L or bos is not None:
            assert sorted(targets) == list(range(1, 100))


def test_paper_protocol(model, tok):
    docs = DOCS
    kept = [d.strip() for d in docs if len(d.strip()) > 50]
    assert 0 < len(kept) < len(docs)
    samples = [list(tok(d).input_ids)[:64] for d in kept]
    ref, n = hand_nll(model, [(s, 1) for s in samples])
    res = evaluate_perplexity(model, tok, docs, protocol="paper", max_length=64, batch_size=4)
    assert len({len(s) for s in samples}) > 1  # unequal lengths: the weightings differ
    assert res.samples == len(kept) and res.windows == len(kept)
    assert res.tokens == n == sum(len(s) - 1 for s in samples)
    assert math.isclose(res.nll_sum, ref, rel_tol=1e-5)  # padded batches agree too
    # the reference's T-weighted figure: Σ mean_i · T_i / Σ T_i
    per = [hand_nll(model, [(s, 1)])[0] / (len(s) - 1) for s in samples]
    t_weighted = sum(m * len(s) for m, s in zip(per, samples)) / sum(len(s) for s in samples)
    d = res.summary()
    assert math.isclose(d["reference_nll_T_weighted"], t_weighted, rel_tol=1e-5)
    assert math.isclose(d["reference_ppl_T_weighted"], math.exp(t_weighted), rel_tol=1e-5)
    assert d["reference_nll_T_weighted"] != d["nll"]


def test_limits(model, tok):
    res = evaluate_perplexity(model, tok, DOCS, max_length=16, max_tokens=50, window_bos=False)
    assert res.tokens == 50 - math.ceil(50 / 16)
    res = evaluate_perplexity(model, tok, DOCS, max_length=16, max_tokens=50)
    assert res.tokens == 49  # BOS-opened windows: every token after the first is scored
    res = evaluate_perplexity(model, tok, DOCS, protocol="paper", max_samples=2)
    assert res.samples == 2


def test_loading_txt_jsonl_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    txt = tmp_path / "wiki.txt"
    txt.write_text(" = Title = \n\nfirst line\nsame paragraph\n\n\n = = Sub = = \nsecond\n", encoding="utf-8")
    assert load_corpus(str(txt)).documents == ["first line same paragraph", "second"]
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"text": "a b"}\n\n{"text": "c", "id": 3}\n', encoding="utf-8")
    assert load_corpus(str(jl)).documents == ["a b", "c"]
    pqf = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["x y", "z"], "n": [1, 2]}), pqf)
    assert load_corpus(str(pqf)).documents == ["x y", "z"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(AchillesError, match="'text'"):
        load_corpus(str(bad))
    nocol = tmp_path / "n.parquet"
    pq.write_table(pa.table({"body": ["x"]}), nocol)
    with pytest.raises(AchillesError, match="no 'text' column"):
        load_corpus(str(nocol))


def test_bad_spec_errors(tmp_path, monkeypatch):
    with pytest.raises(AchillesError, match="no such file and not a known dataset"):
        load_corpus("nope.txt")
    (tmp_path / "x.csv").write_text("a", encoding="utf-8")
    with pytest.raises(AchillesError, match="unsupported file type"):
        load_corpus(str(tmp_path / "x.csv"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AchillesError, match=r"could not download wikitext-103 \(offline\?\): pass a local"):
        load_corpus("wikitext-103")


def test_hub_datasets_fail_fast_offline_or_unreachable(monkeypatch):
    """Issue 21: `--data c4` offline printed 23 lines of retries after 31 s. A streamed dataset
    offline, or any named dataset with the hub unreachable, is refused before datasets is
    asked (its load_dataset must not run), in one line naming the local-file alternative."""
    import time

    import datasets

    def no_download(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("load_dataset ran")

    monkeypatch.setattr(datasets, "load_dataset", no_download)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(AchillesError, match=r"c4 is streamed .* offline mode is on .*pass a local "
                       r"\.txt/\.jsonl/\.parquet to --data"):
        load_corpus("c4")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("achilles.model.loading._hub_reachable", lambda: False)
    with pytest.raises(AchillesError, match=r"c4 comes from the Hugging Face hub, which is not "
                       r"reachable: pass a local \.txt/\.jsonl/\.parquet to --data$"):
        load_corpus("c4")
    with pytest.raises(AchillesError, match="not reachable: pass a local .*set HF_DATASETS_OFFLINE=1"):
        load_corpus("wikitext-103")
    assert time.perf_counter() - start < 2.0
    # reachable: datasets is asked (and its failure is still one line)
    monkeypatch.setattr("achilles.model.loading._hub_reachable", lambda: True)
    with pytest.raises(AchillesError, match=r"could not download c4 \(offline\?\)"):
        load_corpus("c4")


def test_masked_collapse_and_nonfinite(tok):
    model = planted_gpt2()
    pool = build_pool(model)
    ev = PerplexityEvaluator(model, tok, DOCS, max_length=64, batch_size=2)
    clean = ev.evaluate()
    bad = ev.evaluate(pool, [PLANT_UNIT])
    assert clean.finite and bad.finite
    assert bad.log10_ppl > clean.log10_ppl + 1.0
    assert bad.masked_units == 1
    # non-finite: a NaN bias poisons every window; reported, never hidden
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.bias[0] = float("nan")
    res = ev.evaluate()
    assert res.nonfinite_windows == res.windows
    assert math.isnan(res.nll) and math.isnan(res.ppl)
    assert res.summary()["nll_finite_windows_only"] is None


def _save_model(tmp_path: Path, tok) -> Path:
    d = tmp_path / "model"
    planted_gpt2().save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_cli_ppl(tmp_path, tok, capsys):
    mdir = _save_model(tmp_path, tok)
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    ident = planted_identification(tmp_path / "identification.json")
    base = ["ppl", "--model", str(mdir), "--data", str(data), "--max-length", "64", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "clean.json")]) == 0
    assert main([*base, "--mask", str(ident), "--out", str(tmp_path / "masked.json")]) == 0
    clean = json.loads((tmp_path / "clean.json").read_text())
    m = json.loads((tmp_path / "masked.json").read_text())
    assert clean["kind"] == "perplexity" and clean["schema_version"] == 1
    for key in ("nll", "ppl", "log10_ppl", "tokens", "windows", "nonfinite_windows", "config", "env"):
        assert key in clean
    assert m["log10_ppl"] > clean["log10_ppl"] + 1.0
    assert m["config"]["mask"]["n_units"] == 1 and m["tokens"] == clean["tokens"]
    # bad input: one line, exit 2, no file
    capsys.readouterr()
    out = tmp_path / "never.json"
    for extra in (["--data", "missing.txt"], ["--data", str(data), "--stride", "100"],
                  ["--data", str(data), "--mask", str(data)],
                  ["--data", str(data), "--mask", str(ident), "--set", "critical", "--top", "-1"]):
        args = ["ppl", "--model", str(mdir), *extra, "--max-length", "64", "--out", str(out)]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("achilles: error:") and "\n" not in err
        assert not out.exists()

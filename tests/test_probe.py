"""``achilles probe``: next-token probabilities and greedy continuations per masking level."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as T
from test_sweep import STAGE_ARGS, save_trained_model
from tiny import TEXT

from achilles.cli import main

PROMPT = "The river"  # a prefix of the memorised text: short on purpose
TARGET = " ran"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("probe")
    model = save_trained_model(root / "llama")
    (root / "river.txt").write_text(TEXT, encoding="utf-8")
    assert main(["find", "--model", str(model), "--text-file", str(root / "river.txt"),
                 "--samples", "4", *STAGE_ARGS, "--out-dir", str(root / "run")]) == 0
    return model, root / "run" / "identification.json"


def test_probe_levels(run: tuple[Path, Path], tmp_path: Path,
                      capsys: pytest.CaptureFixture[str]) -> None:
    model_dir, ident_file = run
    ident = json.loads(ident_file.read_text())
    n = len(ident["minimal_set"])
    assert n >= 1
    out = tmp_path / "probe.json"
    code = main(["probe", "--model", str(model_dir), "--prompt", PROMPT, "--target", TARGET,
                 "--mask", str(ident_file), "--top-k", "5", "--max-new-tokens", "6",
                 "--out", str(out), "--quiet"])
    assert code == 0
    res = json.loads(out.read_text())
    assert res["kind"] == "probe" and res["schema_version"] == 1 and "env" in res
    assert [lv["n_masked"] for lv in res["levels"]] == list(range(n + 1))
    for lv in res["levels"]:
        probs = [t["prob"] for t in lv["top"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True)
        assert all(0 <= p <= 1 for p in probs) and sum(probs) <= 1 + 1e-6
        assert 0 <= lv["target_prob"] <= 1 and lv["target_rank"] >= 1
        assert len(lv["masked_units"]) == lv["n_masked"]
    assert res["levels"][n]["masked_units"] == [
        f"L{u['layer']}.{u['component']}[{u['channel']}]" for u in ident["minimal_set"]
    ]

    # level 0 is the unmasked model: a direct float32 softmax of the last position
    tok = T.AutoTokenizer.from_pretrained(model_dir)
    model = T.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    assert ids.shape[1] < 10  # shorter than a ranking text is allowed
    with torch.no_grad():
        probs = torch.softmax(model(ids).logits[0, -1].float(), -1)
    vals, idx = torch.topk(probs, 5)
    lv0 = res["levels"][0]
    assert [t["token_id"] for t in lv0["top"]] == idx.tolist()
    assert [t["prob"] for t in lv0["top"]] == pytest.approx(vals.tolist(), abs=1e-6)
    target_id = tok(TARGET, add_special_tokens=False).input_ids[0]
    assert res["target_token_id"] == target_id
    assert lv0["target_prob"] == pytest.approx(float(probs[target_id]), abs=1e-6)
    assert lv0["target_rank"] == int((probs > probs[target_id]).sum()) + 1
    greedy = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                            max_new_tokens=6, pad_token_id=tok.pad_token_id)
    assert lv0["continuation"] == tok.decode(greedy[0, ids.shape[1]:])
    # the memorised continuation: the unmasked model is confident about the target
    assert lv0["target_rank"] == 1

    text = capsys.readouterr().out
    assert "P(target)" in text and "greedy:" in text
    png = out.with_suffix(".png")
    assert png.stat().st_size > 5000


def test_probe_levels_option_and_errors(run: tuple[Path, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    model_dir, ident_file = run
    out = tmp_path / "p.json"
    assert main(["probe", "--model", str(model_dir), "--prompt", PROMPT, "--target", TARGET,
                 "--mask", str(ident_file), "--set", "critical", "--levels", "0,1",
                 "--max-new-tokens", "0", "--out", str(out), "--plot", str(tmp_path / "f.png"),
                 "--quiet"]) == 0
    res = json.loads(out.read_text())
    assert [lv["n_masked"] for lv in res["levels"]] == [0, 1]
    assert res["set"] == "critical" and all(lv["continuation"] == "" for lv in res["levels"])
    assert (tmp_path / "f.png").stat().st_size > 0
    capsys.readouterr()

    bad = tmp_path / "bad.json"
    base = ["probe", "--model", str(model_dir), "--prompt", PROMPT,
            "--target", TARGET, "--out", str(bad)]
    assert main([*base, "--mask", str(ident_file), "--levels", "0,999"]) == 2
    assert "exceeds" in capsys.readouterr().err
    assert main([*base, "--mask", str(tmp_path / "missing.json")]) == 2
    assert "not found" in capsys.readouterr().err
    empty = tmp_path / "empty.json"
    d = json.loads(ident_file.read_text())
    d.update(n_star=None, minimal_set=[], critical_set=[], found=False)
    empty.write_text(json.dumps(d))
    assert main([*base, "--mask", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "empty minimal set" in err and len(err.strip().splitlines()) == 1
    assert main([*base, "--mask", str(ident_file), "--target", ""]) == 2
    assert not bad.exists()


def test_top_k_beyond_the_vocabulary_is_capped(run: tuple[Path, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 21: --top-k past the vocabulary was kept (and drew one bar per token). It is
    capped at the vocabulary with a warning, recorded as capped, and the chart draws at most
    MAX_BARS bars per panel."""
    import matplotlib.axes

    from achilles.plots.probe import MAX_BARS

    bars: list[int] = []
    real_bar = matplotlib.axes.Axes.bar

    def counting_bar(self, x, height, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        bars.append(len(height))
        return real_bar(self, x, height, *a, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", counting_bar)
    model_dir, ident_file = run
    vocab = T.AutoConfig.from_pretrained(model_dir).vocab_size
    out = tmp_path / "p.json"
    assert main(["probe", "--model", str(model_dir), "--prompt", PROMPT, "--target", TARGET,
                 "--mask", str(ident_file), "--levels", "0", "--max-new-tokens", "0",
                 "--top-k", str(10**12), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"--top-k {10**12} exceeds the model's vocabulary of {vocab} tokens: capped at {vocab}" in err
    res = json.loads(out.read_text())
    assert res["config"]["probe"]["top_k"] == vocab
    assert len(res["levels"][0]["top"]) == vocab
    probs = [t["prob"] for t in res["levels"][0]["top"]]
    assert sum(probs) == pytest.approx(1.0, abs=1e-4)  # every token, each once
    assert bars == [MAX_BARS]

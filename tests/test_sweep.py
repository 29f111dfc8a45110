"""``achilles sweep``: grid points, per-point folders, resume, summary and figure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import TEXT, make_model, make_tokenizer

from achilles.cli import main
from achilles.config import parse_numbers
from achilles.errors import AchillesError
from achilles.experiments.overlap import jaccard
from achilles.experiments.sweep import SweepConfig, point_name

# small enough for CPU, large enough that stage 2 finds a set on the memorised text
STAGE_ARGS = ["--epsilon", "0.05", "--max-neurons", "12", "--quiet"]


def save_trained_model(path: Path, steps: int = 40) -> Path:
    """The tiny Llama, trained to memorise ``TEXT`` so masking units raises its perplexity."""
    model, tok = make_model("llama"), make_tokenizer()
    ids = tok(TEXT, return_tensors="pt").input_ids
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_trained_model(tmp_path_factory.mktemp("trained") / "llama")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("text") / "river.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def test_grid_points() -> None:
    axes = SweepConfig(alphas=(1, 5, 3), samples=(2, 4), anchor_alpha=5, anchor_samples=4)
    assert axes.points() == [(5, 4), (1, 4), (3, 4), (5, 2)]  # anchor first, no duplicates
    full = SweepConfig(alphas=(1, 5), samples=(2, 4), grid="full", anchor_alpha=5, anchor_samples=4)
    assert sorted(full.points()) == [(1, 2), (1, 4), (5, 2), (5, 4)]
    # an anchor outside the grid is still run: it is the reference point
    assert (7.0, 9) in SweepConfig(alphas=(1,), samples=(2,), anchor_alpha=7, anchor_samples=9).points()
    assert point_name(0.5, 25) == "alpha=0.5_K=25"
    with pytest.raises(AchillesError, match="--alpha"):
        parse_numbers("1,x", "--alpha", float)
    with pytest.raises(AchillesError, match="> 0"):
        SweepConfig(alphas=(0.0,))


def _sweep(model_dir: Path, text_file: Path, out: Path, *extra: str) -> int:
    return main([
        "sweep", "--model", str(model_dir), "--text-file", str(text_file),
        "--alpha", "1,5", "--samples", "2,4", "--anchor-alpha", "5", "--anchor-samples", "4",
        "--top", "5", *STAGE_ARGS, "--out-dir", str(out), *extra,
    ])


def test_sweep_end_to_end_and_resume(model_dir: Path, text_file: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep"
    assert _sweep(model_dir, text_file, out) == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["kind"] == "sweep" and summary["schema_version"] == 1
    assert summary["config"]["sweep"]["grid"] == "axes" and "env" in summary
    assert summary["evaluated"] == 3 and summary["reused"] == 0
    pts = {(p["alpha"], p["samples"]): p for p in summary["points"]}
    assert set(pts) == {(5.0, 4), (1.0, 4), (5.0, 2)}
    assert pts[(5.0, 4)]["axes"] == ["alpha", "samples"]
    assert pts[(1.0, 4)]["axes"] == ["alpha"] and pts[(5.0, 2)]["axes"] == ["samples"]

    sets = {}
    for key, p in pts.items():
        folder = out / "points" / point_name(*key)
        assert folder.name == p["folder"].split("/")[-1]
        ident = json.loads((folder / "identification.json").read_text())
        ranking = json.loads((folder / "ranking.json").read_text())
        assert ranking["config"]["rank"]["alpha"] == key[0]
        assert ranking["config"]["rank"]["samples"] == key[1]
        assert p["n_star"] == ident["n_star"] and p["n_star"] is not None
        assert p["n_minimal"] == len(ident["minimal_set"])
        assert p["n_star_by_epsilon"] == ident["n_star_by_epsilon"]
        sets[key] = {(u["module"], u["channel"]) for u in ident["minimal_set"]}
    for key, p in pts.items():  # Jaccard vs the anchor, recomputed from the point files
        assert p["jaccard_minimal_vs_anchor"] == pytest.approx(jaccard(sets[key], sets[(5.0, 4)]))
        assert p["same_minimal_as_anchor"] == (sets[key] == sets[(5.0, 4)])
    assert pts[(5.0, 4)]["jaccard_minimal_vs_anchor"] == 1.0
    assert pts[(5.0, 4)]["jaccard_top_vs_anchor"] == 1.0
    assert (out / "sweep.png").stat().st_size > 5000
    assert "3 point(s) computed" in capsys.readouterr().out

    # rerun: nothing is recomputed and the point files are untouched
    files = sorted((out / "points").glob("*/identification.json"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert _sweep(model_dir, text_file, out) == 0
    again = json.loads((out / "sweep.json").read_text())
    assert again["evaluated"] == 0 and again["reused"] == 3
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert [p["n_star"] for p in again["points"]] == [p["n_star"] for p in summary["points"]]

    # interrupted sweep: a point without identification.json is recomputed, the rest reused
    (out / "points" / point_name(1.0, 4) / "identification.json").unlink()
    assert _sweep(model_dir, text_file, out) == 0
    resumed = json.loads((out / "sweep.json").read_text())
    assert resumed["evaluated"] == 1 and resumed["reused"] == 2
    assert [p["n_star"] for p in resumed["points"]] == [p["n_star"] for p in summary["points"]]

    # a finished point made with another configuration is refused, not reused
    capsys.readouterr()
    assert _sweep(model_dir, text_file, out, "--epsilon", "0.07") == 2
    assert "different identify" in capsys.readouterr().err


def test_sweep_bad_input_fails_before_loading(tmp_path: Path, text_file: Path, tiny_dir: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bad"
    base = ["sweep", "--model", str(tiny_dir), "--text-file", str(text_file),
            "--out-dir", str(out)]
    assert main([*base, "--alpha", "1,abc"]) == 2
    err = capsys.readouterr().err
    assert "--alpha" in err and len(err.strip().splitlines()) == 1
    assert main([*base, "--samples", "0,4"]) == 2
    assert "K" in capsys.readouterr().err
    assert main([*base, "--alpha", ""]) == 2
    assert "empty" in capsys.readouterr().err
    assert not (out / "sweep.json").exists()

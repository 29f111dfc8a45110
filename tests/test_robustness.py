"""``achilles robustness`` (several texts) and ``achilles overlap`` (two run folders)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from test_sweep import STAGE_ARGS, save_trained_model
from tiny import CORPUS, TEXT

from achilles.cli import main
from achilles.experiments.overlap import compare_runs, jaccard, spearman


@pytest.fixture(scope="module")
def robust(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One robustness run on two texts (shared by the tests below)."""
    root = tmp_path_factory.mktemp("robust")
    model = save_trained_model(root / "llama")
    (root / "river.txt").write_text(TEXT, encoding="utf-8")
    (root / "corpus.txt").write_text(" ".join(CORPUS[:3]), encoding="utf-8")
    out = root / "out"
    code = main([
        "robustness", "--model", str(model), "--text-file", str(root / "river.txt"),
        "--text-file", str(root / "corpus.txt"), "--samples", "4", "--top", "20",
        *STAGE_ARGS, "--out-dir", str(out),
    ])
    assert code == 0
    return out


def _keys(units: list[dict]) -> set[tuple[str, int]]:
    return {(u["module"], u["channel"]) for u in units}


def test_jaccard_and_spearman_by_hand() -> None:
    assert jaccard({1, 2, 3}, {2, 3, 4}) == 0.5
    assert jaccard([1], [2]) == 0.0
    assert jaccard([], []) is None
    assert jaccard([], [1]) == 0.0
    assert spearman([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6·2/(4·15)
    assert spearman([1], [1]) is None


def test_robustness_report(robust: Path) -> None:
    rep = json.loads((robust / "robustness.json").read_text())
    assert rep["kind"] == "robustness" and rep["schema_version"] == 1 and "env" in rep
    assert rep["labels"] == ["river", "corpus"]
    assert set(rep["config"]["texts"]) == {"river", "corpus"}
    idents = {lab: json.loads((robust / "texts" / lab / "identification.json").read_text())
              for lab in rep["labels"]}
    rankings = {lab: json.loads((robust / "texts" / lab / "ranking.json").read_text())
                for lab in rep["labels"]}
    for t in rep["texts"]:
        assert t["n_star"] == idents[t["label"]]["n_star"]
        assert len(t["minimal_set"]) == len(idents[t["label"]]["minimal_set"])
        assert len(t["top_units"]) == 20
    a, b = (idents[x] for x in rep["labels"])
    ra, rb = (rankings[x] for x in rep["labels"])
    for name, sa, sb in (
        ("jaccard_minimal", _keys(a["minimal_set"]), _keys(b["minimal_set"])),
        ("jaccard_critical", _keys(a["critical_set"]), _keys(b["critical_set"])),
        ("jaccard_top", _keys(ra["neurons"][:20]), _keys(rb["neurons"][:20])),
    ):
        m = rep[name]
        assert m[0][1] == m[1][0] == pytest.approx(len(sa & sb) / len(sa | sb)), name
        if sa:
            assert m[0][0] == 1.0
    shared = _keys(a["minimal_set"]) & _keys(b["minimal_set"])
    assert len(rep["shared_minimal"]) == len(shared)
    assert rep["identical_minimal"] == (_keys(a["minimal_set"]) == _keys(b["minimal_set"]))
    assert (robust / "robustness.png").stat().st_size > 5000


def test_robustness_needs_two_texts(tmp_path: Path, tiny_dir: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "one.txt"
    f.write_text(TEXT, encoding="utf-8")
    code = main(["robustness", "--model", str(tiny_dir), "--text-file", str(f),
                 "--out-dir", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "at least two" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "robustness.json").exists()
    g = tmp_path / "sub"
    g.mkdir()
    (g / "one.txt").write_text(TEXT, encoding="utf-8")
    code = main(["robustness", "--model", str(tiny_dir), "--text-file", str(f),
                 "--text-file", str(g / "one.txt"), "--out-dir", str(tmp_path / "out")])
    assert code == 2 and "label" in capsys.readouterr().err


def _edit(folder: Path, name: str, fn) -> None:  # noqa: ANN001
    p = folder / name
    d = json.loads(p.read_text())
    fn(d)
    p.write_text(json.dumps(d))


def _unit(layer: int, channel: int, module: str = "model.layers.{}.mlp.down_proj") -> dict:
    return {"module": module.format(layer), "layer": layer, "component": "mlp.down",
            "channel": channel, "delta_without": 1.0}


def test_overlap_matches_robustness_and_ignores_module_paths(
    robust: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = robust / "texts" / "river", robust / "texts" / "corpus"
    out = tmp_path / "overlap.json"
    assert main(["overlap", str(a), str(b), "--top", "20", "--out", str(out)]) == 0
    ov = json.loads(out.read_text())
    rep = json.loads((robust / "robustness.json").read_text())
    assert ov["kind"] == "overlap" and ov["same_size"] is True
    assert ov["jaccard_minimal"] == pytest.approx(rep["jaccard_minimal"][0][1])
    assert ov["jaccard_critical"] == pytest.approx(rep["jaccard_critical"][0][1])
    assert ov["jaccard_top"] == pytest.approx(rep["jaccard_top"][0][1])
    assert "Jaccard minimal sets" in capsys.readouterr().out

    # the same run under other module paths (another checkpoint naming) is identical
    renamed = tmp_path / "renamed"
    shutil.copytree(a, renamed)
    for name, key in (("ranking.json", "neurons"), ("identification.json", "minimal_set"),
                      ("identification.json", "critical_set")):
        def rename(d: dict, key: str = key) -> None:
            for u in d[key]:
                u["module"] = u["module"].replace("model.layers", "transformer.blocks")
        _edit(renamed, name, rename)
    same = compare_runs(a, renamed, top=20)
    assert same.jaccard_minimal == same.jaccard_critical == same.jaccard_top == 1.0
    assert same.spearman_top == pytest.approx(1.0)
    assert [r for _, r, _ in same.shared_top] == list(range(1, 21))


def test_overlap_hand_computed_sets(robust: Path, tmp_path: Path,
                                    caplog: pytest.LogCaptureFixture,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(robust / "texts" / "river", a)
    shutil.copytree(robust / "texts" / "river", b)

    def set_sets(minimal: list[dict], critical: list[dict]):  # noqa: ANN202
        def fn(d: dict) -> None:
            d["minimal_set"], d["critical_set"] = minimal, critical
        return fn

    _edit(a, "identification.json", set_sets([_unit(0, 1), _unit(0, 2), _unit(1, 3)],
                                             [_unit(0, 1), _unit(0, 2), _unit(1, 3), _unit(1, 4)]))
    # a minimal set lies inside its critical set (a file breaking that is refused on load)
    _edit(b, "identification.json", set_sets([_unit(0, 2), _unit(1, 3), _unit(1, 5)],
                                             [_unit(0, 2), _unit(1, 3), _unit(1, 5)]))
    # B's top-3 is A's top-3 reversed, then different units
    def reorder(d: dict) -> None:
        top = d["neurons"][:3][::-1]
        d["neurons"] = top + d["neurons"][10:]
    _edit(b, "ranking.json", reorder)
    ov = compare_runs(a, b, top=5)
    assert ov.jaccard_minimal == pytest.approx(2 / 4)  # {(0,2),(1,3)} of {(0,1),(0,2),(1,3),(1,5)}
    assert ov.jaccard_critical == pytest.approx(2 / 5)  # {(0,2),(1,3)} of 5 units
    assert ov.shared_minimal == [(0, "mlp.down", 2), (1, "mlp.down", 3)]
    assert ov.jaccard_top == pytest.approx(3 / 7)  # 3 shared of 5 + 5 - 3
    assert [(ra, rb) for _, ra, rb in ov.shared_top] == [(1, 3), (2, 2), (3, 1)]
    assert ov.spearman_top == pytest.approx(-1.0)

    # different sizes: a warning, but compared
    _edit(b, "ranking.json", lambda d: d["pool"].update(n_units=d["pool"]["n_units"] * 2))
    with caplog.at_level(logging.WARNING, logger="achilles.experiments.overlap"):
        assert compare_runs(a, b, top=5).same_size is False
    assert "different sizes" in caplog.text

    # a different architecture is refused with one line, and no file is written
    _edit(b, "ranking.json", lambda d: d["pool"].update(model_type="gpt2"))
    out = tmp_path / "ov.json"
    capsys.readouterr()
    assert main(["overlap", str(a), str(b), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "one architecture" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert main(["overlap", str(a), str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err

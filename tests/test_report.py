"""The run report: figures, report.md/report.html, numbers equal to the JSON, the CLI."""

from __future__ import annotations

import math
import re

import pytest
from tiny import found_run

from achilles.analysis.run import analyze_for_report
from achilles.cli import main
from achilles.plots.phase import plot_phase
from achilles.report import write_report
from achilles.report.document import fmt
from achilles.results.files import write_json
from achilles.results.schema import read_json


@pytest.fixture(scope="module")
def report(tmp_path_factory):  # noqa: ANN001, ANN201
    d = tmp_path_factory.mktemp("run")
    lm, _ = found_run(d, "tiny")
    # the shapes `achilles compare` and `achilles downstream` write
    write_json(d / "comparison.json", {
        "kind": "comparison", "baseline": {"ppl": 5.5408},
        "methods": {"ours": [{"n": 3, "ppl": 22315.5}], "activation": [{"n": 3, "ppl": 7.1025}]},
        "random": {"runs": 10, "levels": [{"n": 3, "ppl_mean": 5.5408, "ppl_sd": 0.0003}]},
        "skipped": [],
    })
    write_json(d / "downstream.json", {"kind": "downstream", "levels": [
        {"level": 0, "results": {"mmlu": {"acc,none": 0.4441, "acc_stderr,none": 0.01}}},
        {"level": 3, "results": {"mmlu": {"acc,none": 0.1075, "acc_stderr,none": 0.01}}},
    ]})
    files = write_report(d, analyze_for_report(d, lm, seeds=3))  # the command runs the analysis
    return d, files


def _table_rows(md: str, header_start: str) -> list[list[str]]:
    lines = md.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[i + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_files_and_figures_exist_and_are_referenced(report) -> None:  # noqa: ANN001
    d, files = report
    assert files.markdown.is_file() and files.html.is_file() and files.analysis.is_file()
    md, html = files.markdown.read_text(), files.html.read_text()
    assert len(files.figures) == 4  # layers, phase, activations, controls
    for f in files.figures:
        assert f.stat().st_size > 5000 and f.read_bytes()[:4] == b"\x89PNG"
        assert f"]({f.relative_to(d).as_posix()})" in md
    assert html.count("data:image/png;base64,") == 4
    assert "src='figures/" not in html  # self-contained


def test_report_numbers_equal_json(report) -> None:  # noqa: ANN001
    d, files = report
    md = files.markdown.read_text()
    ident = read_json(d / "identification.json")
    analysis = read_json(d / "analysis.json")
    ranking = read_json(d / "ranking.json")
    scores = {(n["module"], n["channel"]): n["score"] for n in ranking["neurons"]}
    assert f"n* = {ident['n_star']} at ε = {fmt(ident['epsilon'])}" in md
    assert f"Δ = {fmt(ident['delta_minimal'])}" in md
    rows = _table_rows(md, "| rank | module | layer | component | channel | score | Δ without")
    assert len(rows) == len(ident["minimal_set"])
    for row, u in zip(rows, ident["minimal_set"], strict=True):
        assert row[1] == u["module"] and int(row[4]) == u["channel"]
        assert float(row[5]) == pytest.approx(scores[(u["module"], u["channel"])], rel=1e-3)
        assert float(row[6]) == pytest.approx(u["delta_without"], rel=1e-3)
        assert row[6] == fmt(u["delta_without"])
    crit = _table_rows(md, "| rank | module | layer | component | channel | score | position")
    assert len(crit) == ident["n_star"]
    ph = dict((r[0], r[1]) for r in _table_rows(md, "| quantity | value"))
    assert ph["largest jump"] == fmt(analysis["phase"]["jump"])
    assert int(ph["at n"]) == analysis["phase"]["n_jump"]
    ctl = dict((r[0], r[1]) for r in _table_rows(md, "| control | Δ | note"))
    c = analysis["controls"]
    assert ctl["zero-ablation (the set)"] == fmt(c["mean_ablation"]["delta_zero"])
    assert ctl["mean-ablation (the set)"] == fmt(c["mean_ablation"]["delta_mean"])
    assert float(ctl["random sets: mean"]) == pytest.approx(c["random_sets"]["mean"], rel=1e-3)
    loc = _table_rows(md, "| set | units | mlp.down share")
    assert float(loc[1][2]) == pytest.approx(analysis["locations"]["ranking"]["down_share"], rel=1e-3)
    health = analysis["health"]
    assert f"dtype {health['dtype']}, {health['nonfinite_points']} non-finite" in md


def test_comparison_and_downstream_sections(report) -> None:  # noqa: ANN001
    _, files = report
    md = files.markdown.read_text()
    assert "## Baseline comparison" in md and "unmasked: 5.541" in md
    assert "| 3 | 2.232e+04 | 7.103 | 5.541 ± 0.0003 |" in md
    assert "## Downstream results" in md
    assert "| 0 | mmlu | acc=0.4441 |" in md and "| 3 | mmlu | acc=0.1075 |" in md


def test_report_without_model_keeps_model_sections(report) -> None:  # noqa: ANN001
    d, _ = report
    before = read_json(d / "analysis.json")
    assert main(["report", str(d), "--no-model", "--quiet"]) == 0
    after = read_json(d / "analysis.json")
    assert after["controls"] == before["controls"]
    assert "## Controls" in (d / "report.md").read_text()


def test_report_cli_refuses_a_folder_without_results(tmp_path, capsys) -> None:  # noqa: ANN001
    assert main(["report", str(tmp_path)]) == 2
    assert "ranking.json" in capsys.readouterr().err


def test_phase_figure_marks_nonfinite_points(tmp_path) -> None:  # noqa: ANN001
    from achilles.analysis import phase_transition

    curve = [{"n": 1, "delta": 0.0}, {"n": 2, "delta": 0.1}, {"n": 3, "delta": 22.3},
             {"n": 4, "delta": 23.0}, {"n": 5, "delta": math.inf}, {"n": 20, "delta": 15.0}]
    ph = phase_transition(curve).to_dict()
    p = plot_phase(curve, tmp_path / "phase.png", epsilon=3.0, n_star=3, phase=ph, title="synthetic")
    assert p.stat().st_size > 5000
    assert re.match(r"^\d", fmt(ph["jump"]))

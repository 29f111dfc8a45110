"""The report tells its finding first, keeps provenance last, and renders in a real browser."""

from __future__ import annotations

import math
import shutil
import subprocess

import pytest
from tiny import TEXT, found_run, make_model, make_tokenizer

from achilles import IdentifyConfig, LoadedModel, ModelSpec, RankConfig, find
from achilles.analysis.run import analyze_for_report
from achilles.explain import ExplainConfig, explain_run
from achilles.model.names import model_name, token_label
from achilles.report import write_report
from achilles.report.build import SECTIONS, register_section
from achilles.report.document import Heading, Para, capped, fmt
from achilles.results.files import write_json
from achilles.results.schema import read_json


@pytest.fixture(scope="module")
def run(tmp_path_factory):  # noqa: ANN001, ANN201
    d = tmp_path_factory.mktemp("run")
    lm, ident = found_run(d, "/somewhere/models/tinyllama")
    explain_run(d, lm, ExplainConfig(), figures=False)  # a real mechanism.json, summary replaced
    mech = read_json(d / "mechanism.json")
    write_json(d / "mechanism.json", {**mech, "summary": "The unit feeds a sink."})
    write_json(d / "heldout.json", {
        "kind": "heldout", "config": {"data": "/data/held.txt"},
        "clean": {"ppl": 12.5, "tokens": 900}, "masked": {"ppl": 4100.0, "tokens": 900},
    })
    files = write_report(d, analyze_for_report(d, lm, seeds=2))  # the command runs the analysis
    return d, files, ident


def test_first_paragraph_states_the_finding(run) -> None:  # noqa: ANN001
    d, files, ident = run
    md = files.markdown.read_text()
    lines = [x for x in md.splitlines() if x.strip()]
    assert lines[0] == "# achilles report: tinyllama"  # the model's name, not its path
    first = lines[1]
    n = len(ident.minimal_set)
    clean = math.exp(read_json(d / "identification.json")["baseline_nll"])
    masked = clean * 10 ** ident.delta_minimal
    assert first.startswith(f"Masking {n} unit(s) of tinyllama")
    assert str(ident.minimal_set[0]) in first
    assert f"from {fmt(clean)} to {fmt(masked)}" in first
    assert "held.txt, 900 tokens" in first and "from 12.5 to 4100" in first
    assert "Mechanism: The unit feeds a sink." in first
    assert "/somewhere" not in md.split("## Provenance")[0]


def test_provenance_is_last_and_sections_are_ordered(run) -> None:  # noqa: ANN001
    _, files, _ = run
    md = files.markdown.read_text()
    heads = [x for x in md.splitlines() if x.startswith("## ")]
    assert heads[0] == "## Critical and minimal sets" and heads[-1] == "## Provenance"
    assert [n for n, _ in SECTIONS][0] == "summary" and [n for n, _ in SECTIONS][-1] == "provenance"


def test_registered_section_lands_before_provenance(run, tmp_path) -> None:  # noqa: ANN001
    d, _, _ = run
    saved = list(SECTIONS)
    try:
        register_section("extra", lambda ctx: [Heading("Extra"), Para(f"{ctx.model_name} ok")])
        register_section("absent", lambda ctx: None)
        md = write_report(d).markdown.read_text()
    finally:
        SECTIONS[:] = saved
    heads = [x for x in md.splitlines() if x.startswith("## ")]
    assert heads[-2:] == ["## Extra", "## Provenance"] and "tinyllama ok" in md


def test_positions_come_with_tokens_and_legend(run) -> None:  # noqa: ANN001
    d, files, _ = run
    md = files.markdown.read_text()
    tokens = read_json(d / "analysis.json")["tokens"]
    ranking = read_json(d / "ranking.json")
    pos = ranking["neurons"][0]["position"]
    assert f"| {pos} {tokens[pos]!r} |" in md
    assert "position: the token" in md and "input:w:" in md


def test_long_tables_are_capped_and_html_tables_scroll(run) -> None:  # noqa: ANN001
    t = capped(["a", "b"], [[i, i] for i in range(25)], limit=20, more="in x.json")
    assert len(t.rows) == 21 and t.rows[-1][0] == "… 5 more in x.json"
    assert len(capped(["a"], [[1]] * 20).rows) == 20
    _, files, _ = run
    html = files.html.read_text()
    assert "overflow-x:auto" in html and html.count("<div class='scroll'><table>") >= 4


def test_display_names() -> None:
    assert model_name("/home/me/models/sink/") == "sink"
    assert model_name("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    assert model_name("./models/natural") == "natural"
    assert token_label(" Paris\n") == "␣Paris\\n"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(run, tmp_path) -> None:  # noqa: ANN001
    _, files, _ = run
    shot = tmp_path / "report.png"
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
         files.html.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    assert "achilles report: tinyllama" in dom and "Masking " in dom
    assert dom.count("<img") == 4
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
         "--window-size=1200,2000", files.html.resolve().as_uri()],
        capture_output=True, timeout=120, check=True,
    )
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20_000


def test_report_loads_the_model_the_run_recorded(tiny_dir, tmp_path) -> None:  # noqa: ANN001
    from achilles.cli import main

    out = tmp_path / "run"
    assert main(["find", "--model", str(tiny_dir), "--text", TEXT, "--samples", "2",
                 "--epsilon", "0.001", "--max-neurons", "10", "--out-dir", str(out),
                 "--no-report", "--quiet"]) == 0
    assert main(["report", str(out), "--seeds", "2", "--quiet"]) == 0  # no --model
    analysis = read_json(out / "analysis.json")
    assert analysis["weights"] is not None and analysis["controls"] is not None
    assert main(["report", str(out), "--no-model", "--quiet"]) == 0
    assert read_json(out / "analysis.json")["controls"] == analysis["controls"]


def test_summary_of_a_run_without_a_critical_set(tmp_path) -> None:  # noqa: ANN001
    lm = LoadedModel(make_model("llama"), make_tokenizer(), ModelSpec(model="tiny"))
    ranking, ident = find(lm, TEXT, RankConfig(samples=2, keep=20, components=("mlp.down",)),
                          IdentifyConfig(epsilon=50.0, max_neurons=5))
    assert not ident.found
    ranking.save(tmp_path / "ranking.json")
    ident.save(tmp_path / "identification.json")
    md = write_report(tmp_path).markdown.read_text()
    first = [x for x in md.splitlines() if x.strip()][1]
    top = max(p["delta"] for p in ident.curve)
    assert first.startswith("No critical set in tiny: masking up to the top 5 units")
    assert f"Δ = {fmt(top)}" in first and "ε = 50" in first


def test_byte_tokens_decode_to_escaped_bytes() -> None:
    from achilles.model.names import decode_text, decode_token

    tok = make_tokenizer()
    ids = tok("é ✓", add_special_tokens=False).input_ids
    assert decode_text(tok, ids) == tok.decode(ids) == "é ✓"  # whole characters: unchanged
    pieces = [decode_token(tok, i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "\\xe2" in "".join(pieces)  # the first byte of ✓ (e2 9c 93) on its own
    assert decode_text(tok, ids[-1:]).startswith("\\x")

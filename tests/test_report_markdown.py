"""What a newcomer reading the demo's report.md trips on: table headers holding ``|`` (the
weights table's ``top |w|``) must stay one cell each, and the Mechanism section states
patching shares as percentages of Δ."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_explain import SINK, _writer, make_run

from achilles import ModelSpec, load_model
from achilles.explain import ExplainConfig, explain_run
from achilles.report.document import Table, to_markdown
from achilles.report.mechanism import mechanism_section

ROOT = Path(__file__).resolve().parents[1]


def test_header_cells_with_pipes_render_as_one_column_each(tmp_path) -> None:  # noqa: ANN001
    markdown_it = pytest.importorskip("markdown_it")
    header = ["module", "top |w| (input:w)", "max/median |w|", "Δ"]
    md = to_markdown([Table(header, [["m", "157:310", "inf", 3.8]])], tmp_path)
    html = markdown_it.MarkdownIt().enable("table").render(md)
    cells = re.findall(r"<th>(.*?)</th>", html)
    assert cells == ["module", "top |w| (input:w)", "max/median |w|", "Δ"]
    assert len(re.findall(r"<td>", html)) == 4


@pytest.fixture(scope="module")
def sink_section(tmp_path_factory):  # noqa: ANN001, ANN201
    lm = load_model(ModelSpec(model=str(SINK), dtype="float32"))
    text = (ROOT / "data" / "demo.txt").read_text()
    run = make_run(tmp_path_factory.mktemp("sink-run"), str(SINK), [_writer()], text)
    explain_run(run, lm, ExplainConfig())
    return json.loads((run / "mechanism.json").read_text()), mechanism_section(run)


def test_mechanism_shares_are_percentages_of_delta(sink_section) -> None:  # noqa: ANN001
    mech, sec = sink_section
    chk = mech["patching_checks"]
    assert f"recovers {100 * chk['restore_all']:.1f} % of Δ" in sec.markdown
    assert f"recovers {100 * chk['restore_sink_heads']:.1f} %." in sec.markdown
    assert mech["config"]["explain"]["massive_min"] == 0
    assert "and ≥ 0 " not in sec.markdown
    assert "Flagged: |h| ≥ 100× the layer's median |h| (" in sec.markdown


def test_demo_runs_bundled_models_on_one_cpu_thread(monkeypatch) -> None:  # noqa: ANN001
    import torch

    from achilles.commands.demo import _one_cpu_thread

    if torch.cuda.is_available():
        pytest.skip("the thread count is only changed on CPU-only machines")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        with _one_cpu_thread("sink"):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2  # restored
        with _one_cpu_thread(str(ROOT / "models" / "sink")):  # a folder: the user's, untouched
            assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        with _one_cpu_thread("natural"):  # the user's own setting wins
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_probe_prints_decoded_bytes_with_one_backslash() -> None:
    from achilles.experiments.probe import _quoted

    for s in ["\n\nThe example", " Par", "\x14ically", "tab\there", "é ü", ""]:
        assert _quoted(s) == repr(s)  # repr is the oracle where it does not double anything
    assert _quoted("\\xdc\x14ically") == "'\\xdc\\x14ically'"  # decode_text's escape stays as is
    assert repr("\\xdc") == "'\\\\xdc'"  # what the printout showed before

"""Cross-command checks of the newer commands: interrupts leave nothing partial, a mask made on
other weights is said, and a census run folder holds what a ``find`` run folder holds."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from tiny import TEXT, make_model

from achilles.cli import main
from achilles.config import IdentifyConfig, ModelSpec, RankConfig
from achilles.explain import ExplainConfig, explain_run
from achilles.method.identify import Identification
from achilles.model.loading import inspect_model, load_model
from achilles.model.units import Unit
from achilles.scale.census.models import ModelEntry
from achilles.scale.census.run import CensusSettings, Task, run_task

UNITS = [Unit("model.layers.0.mlp.down_proj", c, 0, "mlp.down") for c in (1, 5, 9)]


def _run(folder: Path, model: str) -> Path:
    """A run folder whose identification.json holds :data:`UNITS` as both sets."""
    ident = Identification(
        epsilon=1.0, n_star=len(UNITS), critical_set=UNITS, minimal_set=UNITS,
        delta_critical=1.0, delta_minimal=1.0, necessity=[1.0] * len(UNITS), curve=[],
        n_star_by_epsilon={}, baseline_nll=1.0, tokens=10, n_units=1, forward_passes=0,
        config={"model": {"model": model}, "text": TEXT, "ranking": {"pool": "paper"}},
    )
    folder.mkdir(parents=True)
    ident.save(folder / "identification.json")
    return folder


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_explain_interrupted_while_plotting_leaves_nothing(tmp_path: Path, tiny_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C after the first figure: no figure, no mechanism.json, no staging folder."""
    from achilles.plots import mechanism as plots

    run = _run(tmp_path / "run", str(tiny_dir))
    before = _files(run)

    def interrupted(*a: object, **kw: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "plot_sinks", interrupted)  # the second of the three figures
    lm = load_model(ModelSpec(model=str(tiny_dir), dtype="float32"))
    with pytest.raises(KeyboardInterrupt):
        explain_run(run, lm, ExplainConfig())
    assert _files(run) == before
    monkeypatch.undo()
    explain_run(run, lm, ExplainConfig())  # uninterrupted: all three figures and the result
    assert {"mechanism.json", "figures/mechanism_residual.png", "figures/mechanism_sinks.png",
            "figures/mechanism_patching.png"} <= set(_files(run))
    assert not [p for p in run.iterdir() if p.name.startswith(".mechanism.")]


def test_compress_interrupted_while_plotting_leaves_no_result(tmp_path: Path, tiny_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """compression.json is written last: without its figure there is no result to report."""
    run = _run(tmp_path / "run", str(tiny_dir))
    (tmp_path / "data.txt").write_text(TEXT * 3, encoding="utf-8")

    def interrupted(*a: object, **kw: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("achilles.commands.compress.plot_compression", interrupted)
    argv = ["compress", "--model", str(tiny_dir), "--mask", str(run / "identification.json"),
            "--data", str(tmp_path / "data.txt"), "--methods", "rtn-w4", "--seeds", "1",
            "--out-dir", str(tmp_path / "out"), "--quiet"]
    assert main(argv) == 130  # "achilles: interrupted"
    assert not (tmp_path / "out").exists()


def test_identification_made_on_other_weights_is_said(tmp_path: Path, tiny_dir: Path, tokenizer,  # noqa: ANN001
                                                      caplog: pytest.LogCaptureFixture) -> None:
    from achilles.evaluation.masks import load_mask

    other = tmp_path / "other"  # same shapes, other weights
    make_model("llama", seed=1).save_pretrained(other)
    tokenizer.save_pretrained(other)
    run = _run(tmp_path / "run", str(tiny_dir))
    with caplog.at_level(logging.WARNING):
        same = load_mask(inspect_model(ModelSpec(model=str(tiny_dir))), str(run / "identification.json"))
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        moved = load_mask(inspect_model(ModelSpec(model=str(other))), str(run / "identification.json"))
    assert moved.units == same.units == UNITS  # used, as the ranking path does ...
    assert len(caplog.records) == 1 and "different model (weights)" in caplog.text  # ... and said
    assert "--force" not in caplog.text  # no such option to name


@pytest.mark.parametrize("explain", [True, False])
def test_census_run_folder_is_explained_as_find_does(explain: bool, tmp_path: Path, tiny_dir: Path) -> None:
    settings = CensusSettings(TEXT, RankConfig(samples=2, keep=100), IdentifyConfig(epsilon=1e-5, max_neurons=30),
                              report=False, explain=explain)
    run_dir = tmp_path / "runs" / "tiny"
    row = run_task(Task(ModelEntry("tiny", ModelSpec(model=str(tiny_dir))), str(run_dir)), settings)
    assert row["status"] == "ok" and row["n_star"] is not None, row
    assert (run_dir / "mechanism.json").is_file() is explain
    if explain:
        mech = json.loads((run_dir / "mechanism.json").read_text())
        ident = json.loads((run_dir / "identification.json").read_text())
        assert [u["channel"] for u in mech["units"]] == [u["channel"] for u in ident["minimal_set"]]
    marker = json.loads((run_dir / "census_run.json").read_text())
    assert marker["config"]["explain"] is explain  # a resume with the other setting is refused


def test_output_into_a_closed_pipe_is_no_traceback() -> None:
    """``achilles plan --json | head -1``: the reader leaves first; exit 141, stderr empty."""
    import os
    import subprocess
    import sys

    sink = Path(__file__).resolve().parents[1] / "models" / "sink"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.Popen([sys.executable, "-m", "achilles", "plan", "--model", str(sink), "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # before the command writes anything
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141, err
    assert err == ""


def test_explain_refuses_a_model_broken_before_any_masking(tokenizer) -> None:  # noqa: ANN001
    """A NaN weight makes the clean NLL NaN: no Δ (it read "inf") and no mechanism are made up."""
    import math

    import torch

    from achilles.errors import AchillesError
    from achilles.explain import explain
    from achilles.model.loading import LoadedModel
    from achilles.model.units import build_pool

    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = math.nan
    with pytest.raises(AchillesError, match="not finite from layer 1"):
        explain(LoadedModel(model, tokenizer, ModelSpec(model="tiny")), TEXT, UNITS, build_pool(model))

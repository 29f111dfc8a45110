"""Every result file shares one envelope: schema version, kind, run id, config, env; a result
made from a run's set records that run's id, a command that starts a run records a fresh one."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from tiny import TEXT

from achilles.cli import main
from achilles.method.identify import Identification
from achilles.model.units import Unit
from achilles.results.envelope import Envelope, Enveloped, envelope

COMMON = ["schema_version", "kind", "run_id", "config", "env"]
UNITS = [Unit("model.layers.0.mlp.down_proj", c, 0, "mlp.down") for c in (1, 5)]
RUN = "feedc0ffee123456"


def _run(folder: Path, model: str, run_id: str | None = RUN) -> Path:
    ident = Identification(
        epsilon=1.0, n_star=len(UNITS), critical_set=UNITS, minimal_set=UNITS,
        delta_critical=1.0, delta_minimal=1.0, necessity=[1.0] * len(UNITS), curve=[],
        n_star_by_epsilon={}, baseline_nll=1.0, tokens=10, n_units=1, forward_passes=0,
        config={"model": {"model": model}, "text": TEXT, "ranking": {"pool": "paper"}}, run_id=run_id,
    )
    folder.mkdir(parents=True)
    ident.save(folder / "identification.json")
    return folder


def _head(path: Path) -> dict:
    data = json.loads(path.read_text())
    assert list(data)[:5] == COMMON, f"{path.name}: {list(data)[:6]}"
    assert isinstance(data["config"], dict) and isinstance(data["env"], dict)
    return data


def _all_subclasses(cls: type) -> set[type]:
    out = set()
    for c in cls.__subclasses__():
        out |= {c, *_all_subclasses(c)}
    return out


def test_every_enveloped_result_states_only_its_own_fields() -> None:
    """Every result class names its kind and has config, env and run_id; in the ``Enveloped``
    ones those three are the envelope's keyword fields, the result declares only its own."""
    import achilles.evaluation.downstream  # noqa: F401 - import every module that defines one
    import achilles.experiments.compare  # noqa: F401
    import achilles.experiments.overlap  # noqa: F401
    import achilles.experiments.probe  # noqa: F401
    import achilles.experiments.robustness  # noqa: F401
    import achilles.experiments.sweep  # noqa: F401
    import achilles.weights.compress.run  # noqa: F401
    import achilles.weights.export  # noqa: F401
    import achilles.weights.gguf_export  # noqa: F401

    found = {c.__name__ for c in _all_subclasses(Enveloped)}
    assert {"Comparison", "PerplexityResult", "DownstreamResult", "CompressionResult", "SweepResult",
            "Robustness", "ProbeResult", "Overlap", "ExportResult", "GGUFExportResult"} <= found
    for cls in _all_subclasses(Envelope) - {Enveloped}:
        assert cls.KIND, cls
        names = [f.name for f in dataclasses.fields(cls)]
        assert {"config", "env", "run_id"} <= set(names), cls
        if issubclass(cls, Enveloped):
            kw = {f.name for f in dataclasses.fields(cls) if f.kw_only}
            assert kw == {"config", "env", "run_id"}, cls


def test_envelope_dicts_and_fresh_ids() -> None:
    a, b = envelope("plan"), envelope("plan", run_id="x")
    assert list(a) == COMMON and a["run_id"] is None and b["run_id"] == "x"

    @dataclasses.dataclass
    class Thing(Enveloped):
        KIND = "thing"
        value: int

        def fields(self) -> dict:
            return {"value": self.value}

    t1, t2 = Thing(1), Thing(2, run_id="given")
    assert t1.run_id and t1.run_id != Thing(1).run_id and t2.run_id == "given"
    assert list(t1.to_dict()) == [*COMMON, "value"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_results_of_a_runs_set_carry_its_run_id(tmp_path: Path, tiny_dir: Path) -> None:
    """ppl, compress (and its keep-list), keep-list, probe and export with ``--mask`` of a run
    record that run's id; compare starts its own run; the report keeps both kinds (a
    comparison by model) and leaves out a result of another run's set."""
    run = _run(tmp_path / "run", str(tiny_dir))
    mask = str(run / "identification.json")
    data = tmp_path / "data.txt"
    data.write_text(TEXT * 3, encoding="utf-8")
    m = ["--model", str(tiny_dir), "--quiet"]
    assert main(["ppl", *m, "--data", str(data), "--mask", mask, "--out", str(run / "heldout.json")]) == 0
    assert main(["compress", *m, "--mask", mask, "--data", str(data), "--methods", "rtn-w4",
                 "--seeds", "1", "--out-dir", str(run)]) == 0
    assert main(["keep-list", *m, "--mask", mask, "--out", str(tmp_path / "kl.json")]) == 0
    assert main(["probe", *m, "--mask", mask, "--prompt", "The cat", "--target", " sat",
                 "--out", str(tmp_path / "probe.json")]) == 0
    assert main(["export", *m, "--mask", mask, "--out", str(tmp_path / "exported")]) == 0
    for path in (run / "heldout.json", run / "compression.json", run / "keep_list.json",
                 tmp_path / "kl.json", tmp_path / "probe.json", tmp_path / "exported" / "achilles_mask.json"):
        assert _head(path)["run_id"] == RUN, path.name

    assert main(["compare", *m, "--text", TEXT, "--data", str(data), "--methods", "activation",
                 "--levels", "1,2", "--random-runs", "1", "--out-dir", str(run)]) == 0
    rid = _head(run / "comparison.json")["run_id"]
    assert rid and rid != RUN

    from achilles.report.sections import ReportContext

    ident = json.loads(Path(mask).read_text())
    ctx = ReportContext(run_dir=run, analysis={}, ranking={}, identification=ident, model_name="tiny",
                        run_id=RUN)
    assert ctx.has("compression.json") and ctx.has("heldout.json") and ctx.has("comparison.json")

    other = _run(tmp_path / "other", str(tiny_dir))
    (other / "identification.json").write_text(json.dumps({**ident, "run_id": "0" * 16}))
    (run / "heldout.json").unlink()
    assert main(["ppl", *m, "--data", str(data), "--mask", str(other / "identification.json"),
                 "--out", str(run / "heldout.json")]) == 0  # another run's set
    assert _head(run / "heldout.json")["run_id"] == "0" * 16
    assert not ctx.has("heldout.json") and ctx.has("compression.json")


def test_results_of_a_set_made_before_run_ids_are_matched_by_model(tmp_path: Path, tiny_dir: Path) -> None:
    """An identification without a run id: what is made from it records none (null), and the
    report shows it when it names the same model (not left out as another run's)."""
    run = _run(tmp_path / "old", str(tiny_dir), run_id=None)
    data = tmp_path / "data.txt"
    data.write_text(TEXT * 3, encoding="utf-8")
    assert main(["compress", "--model", str(tiny_dir), "--quiet", "--mask", str(run / "identification.json"),
                 "--data", str(data), "--methods", "rtn-w4", "--seeds", "1", "--out-dir", str(run)]) == 0
    assert _head(run / "compression.json")["run_id"] is None

    from achilles.report.sections import ReportContext

    ident = json.loads((run / "identification.json").read_text())
    ctx = ReportContext(run_dir=run, analysis={}, ranking={}, identification=ident, model_name="tiny")
    assert ctx.run_id is None and ctx.has("compression.json")

"""One prepared run per command (method/prepared.py), and results tied to their run (run ids).

The counting test runs one CLI ``find`` (with explain and report) on the bundled sink model
and counts, by wrapping them, the tokenizations, the pool builds, the clean forward passes
and the environment records: each happens once. The other tests cover issue 21's cases 5
and 7: a reused run folder, files of two runs mixed, a minimal set outside the critical
set, and controls measured past a model's context.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
import transformers

from achilles.cli import main
from achilles.errors import AchillesError
from achilles.method import prepared as prepared_mod
from achilles.method.identify import Identification, MaskEvaluator
from achilles.model import units as units_mod
from achilles.report import write_report
from achilles.results import provenance
from achilles.results.runs import clear_other_runs

ROOT = Path(__file__).resolve().parent.parent
SINK = ROOT / "models" / "sink"
TEXT = ROOT / "data" / "demo.txt"


def _wrap_everywhere(monkeypatch: pytest.MonkeyPatch, original: object, wrapper: object) -> None:
    """Replace ``original`` by ``wrapper`` in every achilles module that imported it by name."""
    for name, mod in list(sys.modules.items()):
        if not name.startswith("achilles") or mod is None:
            continue
        for attr, value in list(vars(mod).items()):
            if value is original:
                monkeypatch.setattr(mod, attr, wrapper)


def _counting(monkeypatch: pytest.MonkeyPatch, counts: Counter, key: str, fn, when=None):  # noqa: ANN001, ANN202
    def wrapper(*a, **k):  # noqa: ANN002, ANN003, ANN202
        if when is None or when(*a, **k):
            counts[key] += 1
        return fn(*a, **k)

    _wrap_everywhere(monkeypatch, fn, wrapper)
    return wrapper


def _find(out: Path, *extra: str) -> int:
    return main(["find", "--model", str(SINK), "--text-file", str(TEXT), "--samples", "8",
                 "--out-dir", str(out), "--quiet", *extra])


@pytest.fixture(scope="module")
def counted_run(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """One CLI find (explain and report on), with the expensive steps counted."""
    import achilles.analysis.run  # noqa: F401 - imported before wrapping: its names get wrapped
    import achilles.commands.core  # noqa: F401
    import achilles.explain.run  # noqa: F401

    mp = pytest.MonkeyPatch()
    counts: Counter = Counter()
    tok_call = transformers.PreTrainedTokenizerBase.__call__

    run_text = TEXT.read_text(encoding="utf-8")

    def counting_call(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        text = a[0] if a else k.get("text")
        # the run's text; explain also tokenizes its own short prompts for the continuations
        counts["tokenize" if text == run_text else "tokenize other texts"] += 1
        return tok_call(self, *a, **k)

    mp.setattr(transformers.PreTrainedTokenizerBase, "__call__", counting_call)
    _counting(mp, counts, "build_pool", units_mod.build_pool)
    _counting(mp, counts, "clean_forward", prepared_mod.clean_forward)
    _counting(mp, counts, "environment", provenance.environment,
              when=lambda model=None: model is not None)
    init = MaskEvaluator.__init__

    def evaluator_init(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        counts["evaluator"] += 1
        if k.get("clean_nll") is None:
            counts["evaluator measuring its own clean NLL"] += 1
        return init(self, *a, **k)

    mp.setattr(MaskEvaluator, "__init__", evaluator_init)
    out = tmp_path_factory.mktemp("find") / "run"
    try:
        assert _find(out) == 0
    finally:
        mp.undo()
    return out, counts


def test_find_tokenizes_builds_the_pool_and_runs_the_clean_forward_once(counted_run) -> None:  # noqa: ANN001
    out, counts = counted_run
    assert (out / "report.md").is_file() and (out / "mechanism.json").is_file()
    assert counts["tokenize"] == 1
    assert counts["tokenize other texts"] <= 4, counts  # explain's continuation prompts
    assert counts["build_pool"] == 1
    assert counts["clean_forward"] == 1
    assert counts["environment"] == 1
    # stage 2 and the controls measure masks against the prepared clean NLL
    assert counts["evaluator"] >= 3
    assert counts["evaluator measuring its own clean NLL"] == 0


def test_every_result_of_a_find_carries_its_run_id(counted_run) -> None:  # noqa: ANN001
    out, _ = counted_run
    ids = {name: json.loads((out / name).read_text())["run_id"]
           for name in ("ranking.json", "identification.json", "mechanism.json", "analysis.json")}
    assert len(set(ids.values())) == 1 and all(ids.values()), ids
    ident = json.loads((out / "identification.json").read_text())
    assert ident["ranking_run_id"] == ids["ranking.json"]


def _copy(run: Path, tmp: Path) -> Path:
    d = tmp / "copy"
    shutil.copytree(run, d, ignore=shutil.ignore_patterns(".achilles.lock"))
    return d


def _comparison(run_id: str | None, model: str) -> dict:
    d = {"schema_version": 1, "kind": "comparison", "config": {"model": {"model": model}},
         "baseline": {"ppl": 5.0}, "methods": {"perturbation": [{"n": 1, "ppl": 77.0}]}}
    return {**d, "run_id": run_id} if run_id else d


def test_report_leaves_out_results_of_another_run(counted_run, tmp_path: Path) -> None:  # noqa: ANN001
    d = _copy(counted_run[0], tmp_path)
    held = {"schema_version": 1, "kind": "heldout", "run_id": "0123456789abcdef",
            "config": {"model": {"model": str(SINK)}, "data": "x.txt"},
            "clean": {"ppl": 5.0, "tokens": 9}, "masked": {"ppl": 77.0, "tokens": 9}}
    (d / "heldout.json").write_text(json.dumps(held))  # the set of another run, on held-out text
    assert "On held-out data" not in write_report(d).markdown.read_text()
    (d / "heldout.json").write_text(json.dumps({**held, "run_id": json.loads(
        (d / "identification.json").read_text())["run_id"]}))
    assert "On held-out data" in write_report(d).markdown.read_text()
    # a comparison starts its own run (compare ranks anew): like a file recording no run id,
    # it is used only when it names the same model
    (d / "comparison.json").write_text(json.dumps(_comparison("0123456789abcdef", "models/natural")))
    assert "Baseline comparison" not in write_report(d).markdown.read_text()
    (d / "comparison.json").write_text(json.dumps(_comparison("0123456789abcdef", str(SINK))))
    assert "Baseline comparison" in write_report(d).markdown.read_text()
    (d / "comparison.json").write_text(json.dumps(_comparison(None, "models/natural")))
    assert "Baseline comparison" not in write_report(d).markdown.read_text()
    (d / "comparison.json").write_text(json.dumps(_comparison(None, str(SINK))))
    assert "Baseline comparison" in write_report(d).markdown.read_text()


def test_a_stale_mechanism_is_not_rendered(counted_run, tmp_path: Path) -> None:  # noqa: ANN001
    d = _copy(counted_run[0], tmp_path)
    mech = json.loads((d / "mechanism.json").read_text())
    (d / "mechanism.json").write_text(json.dumps({**mech, "run_id": "another-run"}))
    md = write_report(d).markdown.read_text()
    assert "## Mechanism" not in md and mech["summary"][:40] not in md


def test_a_run_clears_results_of_other_runs_from_its_folder(counted_run, tmp_path: Path) -> None:  # noqa: ANN001
    d = _copy(counted_run[0], tmp_path)
    rid = json.loads((d / "identification.json").read_text())["run_id"]
    (d / "comparison.json").write_text(json.dumps(_comparison("another-run", str(SINK))))
    (d / "comparison.png").write_bytes(b"png")
    (d / "heldout.json").write_text(json.dumps({"kind": "heldout", "schema_version": 1}))
    (d / "downstream.json").write_text("not achilles'")  # not provably ours: kept
    (d / "notes.json").write_text(json.dumps({"kind": "comparison", "schema_version": 1}))
    removed = clear_other_runs(d, rid)
    assert sorted(p.name for p in removed) == ["comparison.json", "comparison.png", "heldout.json"]
    assert (d / "downstream.json").is_file() and (d / "notes.json").is_file()
    assert (d / "ranking.json").is_file() and (d / "identification.json").is_file()  # this run's


def test_report_no_model_refuses_a_ranking_of_another_pool(counted_run, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    d = _copy(counted_run[0], tmp_path)
    r = json.loads((d / "ranking.json").read_text())
    r["pool"] = {**r["pool"], "fingerprint": "0" * 16, "n_units": 218880}
    (d / "ranking.json").write_text(json.dumps(r))
    before = (d / "report.md").read_bytes()
    assert main(["report", str(d), "--no-model", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different unit pools" in err[0]
    assert (d / "report.md").read_bytes() == before


def test_report_refuses_a_ranking_of_another_run(counted_run, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    d = _copy(counted_run[0], tmp_path)
    r = json.loads((d / "ranking.json").read_text())
    (d / "ranking.json").write_text(json.dumps({**r, "run_id": "another-run"}))
    assert main(["report", str(d), "--no-model", "--quiet"]) == 2
    assert "not the ranking identification.json was made from" in capsys.readouterr().err


def _minimal_outside_critical(d: Path) -> Path:
    ident = json.loads((d / "identification.json").read_text())
    stray = {**ident["critical_set"][0], "channel": (ident["critical_set"][0]["channel"] + 1) % 8}
    assert stray not in ident["critical_set"]
    ident["minimal_set"] = [{**stray, "delta_without": 0.0}]
    (d / "identification.json").write_text(json.dumps(ident))
    return d / "identification.json"


def test_a_minimal_set_outside_the_critical_set_is_refused(counted_run, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    d = _copy(counted_run[0], tmp_path)
    path = _minimal_outside_critical(d)
    with pytest.raises(AchillesError, match="not in its critical set"):
        Identification.load(str(path))
    assert main(["report", str(d), "--no-model", "--quiet"]) == 2
    assert "not in its critical set" in capsys.readouterr().err
    out = tmp_path / "keep.json"
    assert main(["keep-list", "--model", str(SINK), "--mask", str(path), "--out", str(out)]) == 2
    assert "not in its critical set" in capsys.readouterr().err
    assert not out.exists()


def test_report_model_refuses_controls_past_the_models_context(counted_run, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    d = _copy(counted_run[0], tmp_path)
    short = tmp_path / "short"
    shutil.copytree(SINK, short)
    cfg = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 16}))
    before = (d / "analysis.json").read_bytes()
    assert main(["report", str(d), "--model", str(short), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "context of 16" in err[0]
    assert (d / "analysis.json").read_bytes() == before

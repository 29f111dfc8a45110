"""``achilles downstream``: lm-eval under masks, offline with a local task config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_perplexity import planted_gpt2, planted_identification
from tiny import make_tokenizer

from achilles.cli import main
from achilles.errors import AchillesError
from achilles.evaluation.downstream import parse_levels

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tests" / "data"
TASK = "achilles_tiny_ll"

pytest.importorskip("lm_eval")


def test_parse_levels():
    assert parse_levels("0,n*", 3) == [0, 3]
    assert parse_levels("0, 1, 1") == [0, 1]
    for bad in ("", "x", "-1"):
        with pytest.raises(AchillesError):
            parse_levels(bad)
    with pytest.raises(AchillesError, match="exceeds"):
        parse_levels("5", 3)


def test_downstream_masked_vs_unmasked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the task YAML names its data relative to the repository
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = make_tokenizer()
    mdir = tmp_path / "model"
    planted_gpt2().save_pretrained(mdir)
    tok.save_pretrained(mdir)
    ident = planted_identification(tmp_path / "identification.json")
    out = tmp_path / "ds"
    args = ["downstream", "--model", str(mdir), "--mask", str(ident), "--levels", "0,n*",
            "--tasks", TASK, "--include-path", str(TASKS), "--bootstrap-iters", "0",
            "--batch-size", "2", "--out-dir", str(out), "--quiet"]
    assert main(args) == 0
    d = json.loads((out / "downstream.json").read_text())
    assert d["kind"] == "downstream" and [lv["level"] for lv in d["levels"]] == [0, 1]
    clean, masked = (lv["results"][TASK] for lv in d["levels"])
    assert d["levels"][1]["units"][0]["channel"] == 5
    assert masked["perplexity,none"] > 10 * clean["perplexity,none"]

    # level 0 (empty mask) == a plain lm-eval run on the unmasked model, no achilles code
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from achilles.config import ModelSpec
    from achilles.model.loading import load_model

    lm = load_model(ModelSpec(model=str(mdir)))
    plain = lm_eval.simple_evaluate(
        model=HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=2), tasks=[TASK],
        task_manager=TaskManager(include_path=str(TASKS)), bootstrap_iters=0, log_samples=False,
    )["results"][TASK]
    assert math.isclose(plain["perplexity,none"], clean["perplexity,none"], rel_tol=1e-6)
    assert plain["acc,none"] == clean["acc,none"]

    # bad input: one line, exit 2, nothing written
    capsys.readouterr()
    for extra in (["--tasks", "no_such_task_xyz"], ["--levels", "a"]):
        bad = [*args[:-3], *extra, "--out-dir", str(tmp_path / "no"), "--quiet"]
        assert main(bad) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("achilles: error:") and "\n" not in err
    assert not (tmp_path / "no" / "downstream.json").exists()

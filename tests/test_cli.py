"""The CLI in-process: end to end on a saved tiny model, and every bad-input path."""

from __future__ import annotations

import json
from importlib.metadata import entry_points

import pytest
from tiny import TEXT

from achilles.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:  # noqa: ANN001
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_console_script_is_declared() -> None:
    eps = [e for e in entry_points(group="console_scripts") if e.name == "achilles"]
    assert eps and eps[0].value == "achilles.cli:entry"


def test_find_end_to_end(tiny_dir, tmp_path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "run"
    code, stdout, _ = run(capsys, "find", "--model", tiny_dir, "--text", TEXT, "--samples", 6,
                          "--max-neurons", 40, "--out-dir", out, "--quiet")
    assert code == 0
    ranking = json.loads((out / "ranking.json").read_text())
    ident = json.loads((out / "identification.json").read_text())
    for d in (ranking, ident):
        assert d["schema_version"] == 1
        assert d["config"]["model"]["model"] == str(tiny_dir)
        assert d["config"]["text"] == TEXT
        assert d["env"]["torch"] and d["env"]["dtype"] == "float32"
    assert ranking["kind"] == "ranking" and ranking["config"]["rank"]["samples"] == 6
    n = ranking["neurons"]
    assert set(n[0]) >= {"module", "layer", "component", "channel", "score"}
    assert len({(x["module"], x["channel"]) for x in n}) == len(n) == ranking["pool"]["n_units"]
    assert [x["score"] for x in n] == sorted((x["score"] for x in n), reverse=True)
    assert ident["kind"] == "identification" and ident["epsilon"] == 1.0
    assert {"n", "delta", "nll", "finite"} <= set(ident["curve"][0])
    assert set(ident["n_star_by_epsilon"]) == {"0.5", "1", "2", "3", "4"}
    assert "n*(ε)" in stdout


def test_rank_then_identify_matches_find(tiny_dir, tmp_path, capsys) -> None:  # noqa: ANN001
    rank_path = tmp_path / "r.json"
    assert run(capsys, "rank", "--model", tiny_dir, "--text", TEXT, "--samples", 6, "--out",
               rank_path, "--quiet")[0] == 0
    assert run(capsys, "identify", "--model", tiny_dir, "--ranking", rank_path, "--text", TEXT,
               "--max-neurons", 40, "--search", "bisect", "--out", tmp_path / "i.json", "--quiet")[0] == 0
    ident = json.loads((tmp_path / "i.json").read_text())
    assert ident["config"]["identify"]["search"] == "bisect"
    assert ident["config"]["ranking"]["samples"] == 6


def test_text_file_and_components(tiny_gpt2_dir, tmp_path, capsys) -> None:  # noqa: ANN001
    f = tmp_path / "t.txt"
    f.write_text(TEXT, encoding="utf-8")
    code, _, err = run(capsys, "rank", "--model", tiny_gpt2_dir, "--text-file", f, "--samples", 3,
                       "--components", "mlp.down,attn.o", "--keep", 10, "--out", tmp_path / "r.json")
    assert code == 0, err
    d = json.loads((tmp_path / "r.json").read_text())
    assert len(d["neurons"]) == 10 and {x["component"] for x in d["neurons"]} <= {"mlp.down", "attn.o"}


BAD = [
    (["--model", "./no/such/model"], "model path not found"),
    (["--model", "nobody-xyz/not-a-model"], "could not load hub id"),
    (["--text", "too short"], "at least 10 are needed"),
    (["--alpha", "0"], "--alpha must be > 0"),
    (["--alpha", "-1"], "--alpha must be > 0"),
    (["--samples", "0"], "--samples (K) must be >= 1"),
    (["--epsilon", "0"], "--epsilon must be > 0"),
    (["--components", "mlp.nope"], "unknown component 'mlp.nope'"),
    (["--components", "attn.qkv"], "does not exist in this architecture"),
]


@pytest.mark.parametrize(("override", "message"), BAD)
def test_bad_input_is_one_line_exit_2_and_no_output(override, message, tiny_dir, tmp_path, capsys) -> None:  # noqa: ANN001
    args = {"--model": str(tiny_dir), "--text": TEXT, "--samples": "2"}
    for k, v in zip(override[::2], override[1::2], strict=True):
        args[k] = v
    argv = ["find", *[x for kv in args.items() for x in kv], "--out-dir", str(tmp_path / "out")]
    code, _, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("achilles: error:"), err
    assert message in lines[0]
    assert "Traceback" not in err
    assert not list((tmp_path / "out").glob("*.json")) if (tmp_path / "out").exists() else True


def test_ranking_from_another_model_is_refused(tiny_dir, tiny_gpt2_dir, tmp_path, capsys) -> None:  # noqa: ANN001
    rank_path = tmp_path / "gpt2.json"
    assert run(capsys, "rank", "--model", tiny_gpt2_dir, "--text", TEXT, "--samples", 2,
               "--out", rank_path, "--quiet")[0] == 0
    out = tmp_path / "i.json"
    code, _, err = run(capsys, "identify", "--model", tiny_dir, "--ranking", rank_path,
                       "--text", TEXT, "--out", out)
    assert code == 2 and "does not match this model" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_missing_or_wrong_ranking_file(tiny_dir, tmp_path, capsys) -> None:  # noqa: ANN001
    code, _, err = run(capsys, "identify", "--model", tiny_dir, "--ranking", tmp_path / "none.json",
                       "--text", TEXT, "--out", tmp_path / "i.json")
    assert code == 2 and "file not found" in err
    bad = tmp_path / "bad.json"
    bad.write_text('{"kind": "identification"}')
    code, _, err = run(capsys, "identify", "--model", tiny_dir, "--ranking", bad,
                       "--text", TEXT, "--out", tmp_path / "i.json")
    assert code == 2 and "expected a 'ranking' file" in err


def test_text_and_text_file_are_exclusive(tiny_dir, tmp_path, capsys) -> None:  # noqa: ANN001
    code, _, err = run(capsys, "rank", "--model", tiny_dir, "--out", tmp_path / "r.json")
    assert code == 2 and "exactly one of --text or --text-file" in err
    code, _, err = run(capsys, "rank", "--model", tiny_dir, "--text-file", tmp_path / "nope.txt",
                       "--out", tmp_path / "r.json")
    assert code == 2 and "text file not found" in err

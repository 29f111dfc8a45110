"""One CLI grammar: every command's --help renders clean; dtype/device spellings; old aliases."""

from __future__ import annotations

import argparse
import re

import pytest

from achilles.cli import build_parser, main
from achilles.config import ModelSpec
from achilles.errors import AchillesError


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


COMMANDS = sorted(_subparsers())  # every command of every module in COMMAND_MODULES
MARKUP = re.compile(r"``|:(func|class|meth|mod|data|attr):`|\*\*")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_renders_clean(command: str, capsys) -> None:  # noqa: ANN001
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: achilles " + command)
    flat = " ".join(text.split())
    assert "(default: None)" not in flat
    assert flat.count("(default:") == len(re.findall(r"\(default: [^()]*\)", flat))
    assert not re.search(r"default[^()]*\)\s*\(default:", flat), "two defaults in one help line"
    assert not MARKUP.search(text), MARKUP.search(text)
    assert "%(default)" not in text


def test_top_level_help_lists_every_command(capsys) -> None:  # noqa: ANN001
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS)


@pytest.mark.parametrize(("given", "canonical"), [
    ("bf16", "bfloat16"), ("BF16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32"),
    ("float32", "float32"), ("torch.bfloat16", "bfloat16"), ("auto", "auto"),
])
def test_dtype_spellings(given: str, canonical: str) -> None:
    assert ModelSpec(model="m", dtype=given).dtype == canonical
    ns = build_parser().parse_args(["ppl", "--model", "m", "--data", "d", "--out", "o.json",
                                    "--dtype", given])
    assert ns.dtype == canonical


def test_bad_dtype_and_device_are_usage_errors(capsys) -> None:  # noqa: ANN001
    with pytest.raises(AchillesError):
        ModelSpec(model="m", dtype="int8")
    with pytest.raises(AchillesError):
        ModelSpec(model="m", device="gpu1")
    for bad in (["--dtype", "int8"], ["--device", "gpu1"]):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(["ppl", "--model", "m", "--data", "d", "--out", "o", *bad])
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "bf16" in err and "cuda:N" in err


def test_device_with_an_index_is_accepted() -> None:
    ns = build_parser().parse_args(["ppl", "--model", "m", "--data", "d", "--out", "o",
                                    "--device", "cuda:1"])
    assert ns.device == "cuda:1" and ModelSpec(model="m", device="cuda:1").device == "cuda:1"


def test_device_index_beyond_the_visible_gpus_is_one_line() -> None:
    import torch

    from achilles.model.loading import resolve_device

    n = torch.cuda.device_count()
    with pytest.raises(AchillesError, match="cuda"):
        resolve_device(f"cuda:{n + 1}")


def test_old_spelling_is_a_hidden_alias_with_a_warning(capsys) -> None:  # noqa: ANN001
    p = build_parser()
    ns = p.parse_args(["compare", "--model", "m", "--text", "t", "--eval", "x.txt",
                       "--out-dir", "d"])
    assert ns.data == "x.txt"
    assert "--eval is deprecated" in capsys.readouterr().err
    ns = p.parse_args(["compare", "--model", "m", "--text", "t", "--data", "y.txt", "--out-dir", "d"])
    assert ns.data == "y.txt"
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    out = capsys.readouterr().out
    assert "--data" in out and "--eval " not in out


def test_dtype_auto_is_the_checkpoints_dtype_and_the_default_is_fp32_on_cpu() -> None:
    from pathlib import Path

    import torch

    from achilles.model.loading import load_model

    sink = Path(__file__).resolve().parents[1] / "models" / "sink"  # saved in float16
    assert load_model(ModelSpec(model=str(sink), device="cpu")).dtype == torch.float32
    assert load_model(ModelSpec(model=str(sink), dtype="auto", device="cpu")).dtype == torch.float16
    assert load_model(ModelSpec(model=str(sink), dtype="bf16", device="cpu")).dtype == torch.bfloat16


def test_docs_stand_alone() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    docs = [root / "README.md", *sorted((root / "docs").glob("*.md")),
            *sorted((root / "models").glob("*/README.md"))]
    assert (root / "docs" / "paper.md").is_file()
    for doc in docs:
        text = doc.read_text(encoding="utf-8")
        assert "../shared" not in text and "PAPER.md" not in text, doc
        assert not re.search(r"\bissues? #?\d+", text, flags=re.I), doc
        assert "2510.10238" in text or doc.parent.name != "docs" or doc.name != "paper.md"

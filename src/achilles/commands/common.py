"""Option groups and helpers shared by subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

from achilles.config import IdentifyConfig, ModelSpec, RankConfig, TextSpec, add_arguments, from_args
from achilles.errors import AchillesError
from achilles.io import check_destination, claim_dir
from achilles.ranking import METHODS


def add_common(p: argparse.ArgumentParser, *, text: bool = True) -> None:
    """Model options, text options, and logging flags."""
    add_arguments(p, ModelSpec)
    if text:
        add_arguments(p, TextSpec)
    g = p.add_argument_group("output")
    g.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    g.add_argument("--verbose", action="store_true", help="debug logging")


def add_rank_options(p: argparse.ArgumentParser) -> None:
    add_arguments(p, RankConfig, choices={"method": sorted(METHODS)})


def add_identify_options(p: argparse.ArgumentParser, *, prefix_batch: bool = True) -> None:
    exclude = () if prefix_batch else ("batch_size",)
    add_arguments(p, IdentifyConfig, exclude=exclude)


def model_spec(args: argparse.Namespace) -> ModelSpec:
    return from_args(ModelSpec, args)


def text_of(args: argparse.Namespace) -> str:
    return from_args(TextSpec, args).resolve()


def rank_config(args: argparse.Namespace) -> RankConfig:
    return from_args(RankConfig, args)


def identify_config(args: argparse.Namespace, **overrides: object) -> IdentifyConfig:
    return from_args(IdentifyConfig, args, **overrides)


def check_writable(path: str | Path, *, flag: str = "--out") -> Path:
    """Fail early (before loading a model) if ``path`` cannot be written; create nothing.

    A name with a suffix is a file destination, one without a folder destination (see
    :func:`achilles.io.check_destination`).
    """
    kind = "file" if Path(path).suffix else "dir"
    return check_destination(path, kind, flag=flag)


def claim_out_dir(args: argparse.Namespace, path: str | Path, *, flag: str = "--out-dir") -> Path:
    """Check output folder ``path`` and hold it for this run (see :func:`achilles.io.claim_dir`).

    The claim is released when the command returns (``cli.main`` keeps it in
    ``args.exit_stack``); a second run into the same folder meanwhile is refused.
    """
    p = check_destination(path, "dir", flag=flag)
    stack = getattr(args, "exit_stack", None)
    if stack is not None:
        stack.enter_context(claim_dir(p, flag=flag))
    return p


def progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "quiet", False)


def fitted_text(args: argparse.Namespace, skeleton: object, text: str) -> str:
    """``text`` checked against the model's context: refused, or cut with ``--truncate``."""
    from achilles.loading import fit_text

    return fit_text(skeleton.tokenizer, skeleton.model, text,  # type: ignore[attr-defined]
                    truncate=getattr(args, "truncate", False))

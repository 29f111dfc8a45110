"""Option groups and helpers shared by subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

from achilles.config import IdentifyConfig, ModelSpec, RankConfig, TextSpec, add_arguments, from_args
from achilles.errors import AchillesError
from achilles.ranking import METHODS


def add_common(p: argparse.ArgumentParser, *, text: bool = True) -> None:
    """Model options, text options, and logging flags."""
    add_arguments(p, ModelSpec)
    if text:
        add_arguments(p, TextSpec)
    g = p.add_argument_group("output")
    g.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    g.add_argument("--verbose", action="store_true", help="debug logging")


def add_weightless_common(p: argparse.ArgumentParser) -> None:
    """Model options without dtype/device (for commands that never load the weights), and logging flags."""
    add_arguments(p, ModelSpec, exclude=("dtype", "device", "device_map"))
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


def check_writable(path: str | Path) -> Path:
    """Fail early (before loading a model) if ``path``'s folder cannot be created."""
    path = Path(path)
    parent = path.parent if path.suffix else path
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AchillesError(f"cannot write to {parent}: {e.strerror}") from None
    return path


def progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "quiet", False)

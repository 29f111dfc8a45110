"""The ``achilles`` command line: a thin shell over the library.

Each subcommand lives in a module of :mod:`achilles.commands` that exposes
``register(subparsers)``; the module list below is the whole CLI. ``main(argv)`` returns the
exit status, so tests call it in-process. User errors (:class:`AchillesError`) print one line
on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from achilles import __version__
from achilles.errors import AchillesError

COMMAND_MODULES: tuple[str, ...] = (
    "achilles.commands.core",
    "achilles.commands.demo",
    "achilles.commands.ppl",
    "achilles.commands.compare",
    "achilles.commands.downstream",
    "achilles.commands.sweep",
    "achilles.commands.robustness",
    "achilles.commands.overlap",
    "achilles.commands.probe",
    "achilles.commands.report",
    "achilles.commands.explain",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="achilles",
        description="Find the critical neurons of transformer language models "
        "(perturbation ranking + causal identification, arXiv 2510.10238).",
    )
    parser.add_argument("--version", action="version", version=f"achilles {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (tests swap it between calls)."""

    @property
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    if getattr(args, "verbose", False):
        level = logging.DEBUG
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    if getattr(args, "quiet", False):
        import transformers

        os.environ["TQDM_DISABLE"] = "1"  # also silences lm-eval's and datasets' own bars
        transformers.utils.logging.disable_progress_bar()
    for noisy in ("transformers", "datasets", "accelerate", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    try:
        return int(args.run(args) or 0)
    except AchillesError as e:
        print(f"achilles: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("achilles: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())

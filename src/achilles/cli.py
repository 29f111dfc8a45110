"""The ``achilles`` command line: a thin shell over the library.

Each subcommand lives in a module of :mod:`achilles.commands` that exposes
``register(subparsers)``; the module list below is the whole CLI. ``main(argv)`` returns the
exit status, so tests call it in-process. User errors (:class:`AchillesError`) print one line
on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import typing
from collections.abc import Sequence

from achilles.errors import AchillesError
from achilles.model.checks import argv_model, argv_value, model_path_problem
from achilles.results.signals import Terminated, sigterm_unwinds
from achilles.version import __version__

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
    "achilles.commands.export",
    "achilles.commands.compress",
    "achilles.commands.plan",
    "achilles.commands.census",
    "achilles.commands.explain",
)


class _OneLineParser(argparse.ArgumentParser):
    """Bad options are one stderr line (``achilles: error: ...``, exit 2), like every bad input."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"achilles: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
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
    # A typo'd local --model fails here, before the command modules import torch (seconds).
    given = sys.argv[1:] if argv is None else argv
    model = argv_model(given)
    problem = (model_path_problem(model, argv_value(given, "--gguf-file"))
               if model is not None else None)
    if problem is not None:
        print(f"achilles: error: {problem}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    try:
        with _sigterm_as_exit(), contextlib.ExitStack() as stack:
            args.exit_stack = stack  # output folders claimed by the command, released at exit
            from achilles.results.paths import check_args_apart

            check_args_apart(args)  # no output is, holds, or lies inside an input
            return int(args.run(args) or 0)
    except AchillesError as e:
        print(f"achilles: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("achilles: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("achilles: terminated", file=sys.stderr)
        return 143
    except (RuntimeError, MemoryError) as e:
        from achilles.model.batching import is_oom

        if not is_oom(e):
            raise
        print(
            "achilles: error: out of memory even at batch size 1: use a shorter text, "
            "another --dtype, --device-map auto, or a machine with more memory",
            file=sys.stderr,
        )
        return 2


def _sigterm_as_exit():  # noqa: ANN202
    """SIGTERM unwinds the command like Ctrl-C (see :mod:`achilles.results.signals`)."""
    return sigterm_unwinds(die=False)


def entry() -> None:
    """Console-script entry point."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # `achilles plan --json | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # for the exit's flush
        code = 141  # 128 + SIGPIPE, as a shell reports it
    sys.exit(code)

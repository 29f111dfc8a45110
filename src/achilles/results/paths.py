"""The path-overlap check: no output is, or lies inside, an input; none that is replaced holds one.

:func:`check_apart` compares every output path of a command with every input path by
resolved path (symbolic links and ``..`` resolved; the same file under two names, a hard
link, counts as the same), before any work. A hub id (an input name that is not an
existing path) is not a path and is never compared. An output folder that achilles
replaces as a whole (``export --out``) must not hold an input either; a folder that is only written into may (``compress --mask RUN/identification.json
--out-dir RUN`` adds its result beside the mask it read).

:func:`check_args_apart` applies it to a parsed command line: :data:`INPUT_OPTIONS` and
:data:`OUTPUT_OPTIONS` name which options of any command are read and which are written.
``cli.main`` calls it once, before the command runs; the library functions that know more
inputs (a census's model list, an export's fetched source) call :func:`check_apart` too.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from achilles.errors import AchillesError

INPUT_OPTIONS: dict[str, str] = {
    "model": "--model",
    "text_file": "--text-file",
    "text_files": "--text-file",
    "data": "--data",
    "ranking": "--ranking",
    "mask": "--mask",
    "calib_file": "--calib-file",
    "models": "--models",
    "include_path": "--include-path",
    "run_a": "RUN_A",
    "run_b": "RUN_B",
}
"""Parsed-argument names that are read (files or folders), with the option a user typed."""

OUTPUT_OPTIONS: dict[str, str] = {"out": "--out", "out_dir": "--out-dir", "plot": "--plot"}
"""Parsed-argument names that are written."""

WRITTEN_INTO: dict[str, str] = {"run_dir": "RUN_DIR"}
"""Parsed-argument names of folders a command reads and also writes its results into
(``explain RUN_DIR``, ``report RUN_DIR``): only the names below may not be inputs there."""

RESULT_NAMES: frozenset[str] = frozenset({
    "ranking.json", "identification.json", "analysis.json", "mechanism.json", "comparison.json",
    "heldout.json", "downstream.json", "compression.json", "keep_list.json", "sweep.json",
    "robustness.json", "summary.json", "summary.md", "summary.csv", "report.md", "report.html",
    "census_run.json", "census_error.json", "achilles_mask.json", "comparison.png",
    "compression.png", "downstream.png", "robustness.png", "sweep.png",
})
"""File names achilles writes into an output folder: an input file of that name inside the
folder would be overwritten, so it is refused (another input in the folder is fine)."""

MASK_OPTIONS: frozenset[str] = frozenset({"--mask", "--ranking"})
"""Inputs naming a run's set: the commands that take them (ppl, compress, export, keep-list,
probe, downstream, identify) never write a ranking or identification into an output folder,
so ``compress --mask RUN/identification.json --out-dir RUN`` stays allowed."""


def _real(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


REPLACING_COMMANDS: frozenset[str] = frozenset({"export"})
"""Commands whose output folder may be replaced or emptied as a whole (see :func:`check_apart`)."""


def check_apart(inputs: Iterable[tuple[str, object]], outputs: Iterable[tuple[str, object]],
                *, replaced: bool = False) -> None:
    """Refuse an output that is or lies inside an input (or, ``replaced``, holds one).

    Args:
        inputs: ``(label, path)`` pairs read by the command (``label`` as the user typed
            it, e.g. ``"--model"``); ``None``, empty and non-existing paths (hub ids,
            dataset names) are skipped.
        outputs: ``(label, path)`` pairs the command writes (existing or not).
        replaced: the output folders are replaced or emptied as a whole, so one that
            holds an input is refused too.

    Raises:
        AchillesError: one line naming both options and the fix.
    """
    ins = []
    for label, raw in inputs:
        if raw is None or not isinstance(raw, (str, os.PathLike)) or not os.fspath(raw).strip():
            continue
        if not os.path.lexists(Path(raw).expanduser()):
            continue  # a hub id or dataset name: not a path
        ins.append((label, raw, _real(raw)))
    for olabel, oraw in outputs:
        if oraw is None or not isinstance(oraw, (str, os.PathLike)) or not os.fspath(oraw).strip():
            continue
        out = _real(oraw)
        for ilabel, iraw, inp in ins:
            if out == inp or _same_file(oraw, iraw):
                why = f"is the input {ilabel} {iraw}"
            elif _within(out, inp):
                why = f"lies inside the input {ilabel} {iraw}"
            elif replaced and _within(inp, out):
                why = f"holds the input {ilabel} {iraw}"
            else:
                continue
            raise AchillesError(f"{olabel} {oraw} {why}: an output never overwrites an input; "
                                f"choose another {olabel}")
        _refuse_result_names(ins, olabel, oraw, out)


def _refuse_result_names(ins: Sequence[tuple[str, object, Path]], olabel: str, oraw: object,
                         folder: Path) -> None:
    """Refuse an input file inside the output folder ``folder`` named like a result achilles
    writes there (``find --text-file RUN/identification.json --out-dir RUN``)."""
    for ilabel, iraw, inp in ins:
        if ilabel in MASK_OPTIONS and inp.name in ("ranking.json", "identification.json"):
            continue  # a run's set, read by a command that writes other results beside it
        if inp.parent == folder / "figures":  # achilles' own figures folder: any name
            raise AchillesError(
                f"{ilabel} {iraw} lies in the figures folder of {olabel} {oraw}, where achilles "
                "writes its figures: an output never overwrites an input; copy it elsewhere or "
                f"choose another {olabel}")
        if inp.name in RESULT_NAMES and inp.parent == folder or (
                inp.name in RESULT_NAMES and inp.parent.parent == folder
                and inp.parent.name == "runs"):
            raise AchillesError(
                f"{ilabel} {iraw} lies in {olabel} {oraw} under a name achilles writes there "
                f"({inp.name}): an output never overwrites an input; copy it elsewhere or "
                f"choose another {olabel}")


def _values(value: object) -> list[object]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_args_apart(args: argparse.Namespace,
                     extra_inputs: Mapping[str, object] | None = None) -> None:
    """:func:`check_apart` over the options of a parsed command line (see the module docstring)."""
    ns = vars(args)
    inputs = [(label, v) for dest, label in INPUT_OPTIONS.items() for v in _values(ns.get(dest))]
    inputs += list((extra_inputs or {}).items())
    outputs = [(label, ns.get(dest)) for dest, label in OUTPUT_OPTIONS.items()]
    check_apart(inputs, outputs, replaced=ns.get("command") in REPLACING_COMMANDS)
    ins = [(label, raw, _real(raw)) for label, raw in inputs
           if isinstance(raw, (str, os.PathLike)) and os.fspath(raw).strip()
           and os.path.lexists(Path(raw).expanduser())]
    for dest, label in WRITTEN_INTO.items():
        raw = ns.get(dest)
        if isinstance(raw, (str, os.PathLike)) and os.fspath(raw).strip():
            _refuse_result_names(ins, label, raw, _real(raw))

"""Input checks that need neither torch nor transformers, so they run before those imports.

A typo in a local model path must fail in well under a second, not after importing torch
(seconds) and asking the hub about it (tens of seconds of retries). ``cli.main`` calls
:func:`model_path_problem` on ``--model`` before it builds the parser.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def looks_local(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub id (``name``/``org/name``).

    Local: it starts with ``.``, ``/`` or ``~``, has more than one ``/`` or a backslash, or
    its parent folder exists here (``models/foo`` next to a ``models/`` folder).
    """
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        return True
    parent = Path(name).parent
    return parent != Path(".") and parent.is_dir()


def model_path_problem(name: str) -> str | None:
    """The one-line error for a ``--model`` that names a missing or unusable local path."""
    if not name.strip():
        return "--model is empty: give a local model folder or a hub id"
    local = Path(name).expanduser()
    if not local.exists():
        return f"model path not found: {name} (check --model)" if looks_local(name) else None
    if not local.is_dir():
        return f"--model must be a folder or a hub id, not a file: {name}"
    if not (local / "config.json").is_file():
        return f"{name} has no config.json: point --model at a saved model folder"
    return None


def argv_model(argv: Sequence[str]) -> str | None:
    """The value of ``--model`` in a command line, if given (``--model X`` or ``--model=X``)."""
    for i, a in enumerate(argv):
        if a == "--model" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--model="):
            return a.split("=", 1)[1]
    return None


def _kind(mode: int) -> str | None:
    """What a non-regular file is, in words (``None`` for a regular file)."""
    import stat

    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def input_file_problem(path: str | Path, flag: str = "the path", noun: str = "file") -> str | None:
    """The one-line error for an input file that cannot be read as one, else ``None``.

    The one check every input file goes through before it is opened: missing, a folder, a
    named pipe, a socket or a device (achilles checks an input up front and reads it again
    later, which a pipe does not allow, and opening one would wait for a writer), or
    unreadable. ``noun`` and ``flag`` name it: ``text file not found: t.txt (check --text-file)``.
    """
    import os

    p = Path(path).expanduser()
    try:
        st = p.stat()
    except FileNotFoundError:
        return f"{noun} not found: {path} (check {flag})"
    except OSError as e:
        return f"cannot read {path}: {e.strerror or e} (check {flag})"
    kind = _kind(st.st_mode)
    if kind == "a folder":
        return f"{path} is a folder, not a {noun} (check {flag})"
    if kind is not None:
        return (f"{path} is {kind}, not a regular {noun} (check {flag}): save its content to a "
                "file and give that instead")
    if not os.access(p, os.R_OK):
        return f"cannot read {path}: permission denied (check {flag})"
    return None


def read_text_input(path: str | Path, flag: str, noun: str = "text file") -> str:
    """The UTF-8 content of the input file at ``path``, or one :class:`AchillesError` line."""
    from achilles.errors import AchillesError

    problem = input_file_problem(path, flag, noun)
    if problem is not None:
        raise AchillesError(problem)
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise AchillesError(
            f"{path} is not UTF-8 text (check {flag}): byte {e.start} is not UTF-8; convert it, "
            "e.g. iconv -t UTF-8"
        ) from None
    except OSError as e:
        raise AchillesError(f"cannot read {path}: {e.strerror or e} (check {flag})") from None

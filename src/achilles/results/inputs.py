"""Input files checked before they are opened: one line for a missing file, a folder, a named pipe,
a socket, a device, an unreadable file, or text that is not UTF-8."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from achilles.errors import AchillesError


def _kind(mode: int) -> str | None:
    """What a non-regular file is, in words (``None`` for a regular file)."""
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

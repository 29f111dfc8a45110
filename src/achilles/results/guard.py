"""The deletion guard: achilles deletes only folders it can prove it made.

Every folder achilles may later delete (a census run folder, an export's temporary and
replaced checkpoint folders, explain's figure staging) is created through
:func:`make_dir` or :func:`temp_dir`, which write a marker file :data:`MARKER` into it at
once: the command that made it, a random id, the host and process, and any facts the
command wants to match later (a census run records the model it is made from).

:func:`remove_made` is the only way the package removes a folder tree. It refuses a
symbolic link, anything that is not a folder, and a folder without a valid marker (or
with the marker of another command), so a path that merely *points* somewhere (a census
``--name ../../x``, ``export --out $HOME --force``) can never delete what the user did not
hand over.

A folder being written is *held*: its process keeps an ``fcntl.flock`` on the marker
(:func:`temp_dir`). :func:`clean_stale` removes leftovers of interrupted runs (SIGKILL,
power loss): marked folders with a given name prefix whose lock no live process holds.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from achilles.errors import AchillesError
from achilles.results.files import atomic_write

MARKER = ".achilles-made"
"""The marker file achilles writes into every folder it may later delete."""

_KIND = "achilles-made"


def _where(folder: str | os.PathLike[str]) -> str:
    """The absolute path a marker names (the folder's parent resolved, its own name kept)."""
    f = Path(folder)
    return str(f.parent.resolve() / f.name)


def mark(folder: str | os.PathLike[str], command: str, **facts: Any) -> dict[str, Any]:
    """Write the marker into ``folder`` (just created by this process); return its content.

    The marker names the folder it was made as (``path``, or ``facts["path"]`` for a folder
    made under a temporary name and renamed into place): a copy of the folder elsewhere, marker
    and all, is not a folder achilles made there, and is never deleted.
    """
    where = str(facts.pop("path", None) or _where(folder))
    record = {
        "kind": _KIND,
        "command": command,
        "id": uuid.uuid4().hex,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **facts,
        "path": where,
    }
    atomic_write(Path(folder) / MARKER, json.dumps(record, indent=1) + "\n")
    return record


def make_dir(path: str | os.PathLike[str], command: str, **facts: Any) -> Path:
    """Create the folder ``path`` already marked (its parents as needed; ``path`` must be new).

    The folder is made and marked under a hidden name beside ``path``, then renamed into
    place, so ``path`` never exists without its marker (a kill in between leaves only a
    hidden folder, which the next call removes).
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{p.name}.achilles-new-"
    clean_stale(p.parent, prefix, command)
    with temp_dir(p.parent, prefix, command, **facts, path=_where(p)) as tmp:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; a made folder is like any other
        if p.is_symlink() or p.exists():
            raise AchillesError(f"{p} exists: achilles makes only new folders here")
        os.rename(tmp, p)
    return p


def read_mark(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The marker of ``path`` if it is a real folder (not a link) achilles made, else ``None``."""
    p = Path(path)
    if p.is_symlink() or not p.is_dir():
        return None
    m = p / MARKER
    if m.is_symlink() or not m.is_file():
        return None
    try:
        record = json.loads(m.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(record, dict) or record.get("kind") != _KIND or not record.get("id"):
        return None
    if record.get("path") != _where(p):  # copied or moved here: not made here
        return None
    return record


def _repath(folder: Path) -> None:
    """Rewrite ``folder``'s marker to name where it is now (after achilles itself moved it)."""
    record = read_mark_anywhere(folder)
    if record is not None:
        record["path"] = _where(folder)
        atomic_write(folder / MARKER, json.dumps(record, indent=1) + "\n")


def read_mark_anywhere(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The marker of ``path`` whatever folder it names (for achilles' own moves only)."""
    m = Path(path) / MARKER
    if Path(path).is_symlink() or m.is_symlink() or not m.is_file():
        return None
    try:
        record = json.loads(m.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return record if isinstance(record, dict) and record.get("kind") == _KIND else None


def made_by(path: str | os.PathLike[str], command: str | None = None) -> bool:
    """Whether ``path`` is a folder achilles made (by ``command``, when given)."""
    record = read_mark(path)
    return record is not None and (command is None or record.get("command") == command)


def remove_made(path: str | os.PathLike[str], command: str | None = None) -> None:
    """Delete the folder tree ``path``, only if achilles made it (see the module docstring).

    Raises:
        AchillesError: ``path`` is a link, not a folder, or carries no marker of ``command``.
    """
    p = Path(path)
    if p.is_symlink():
        raise AchillesError(f"{p} is a symbolic link, not a folder achilles made: remove it yourself")
    if not p.is_dir():
        raise AchillesError(f"{p} is not a folder achilles made: remove it yourself")
    if not made_by(p, command):
        what = f"`achilles {command}`" if command else "achilles"
        raise AchillesError(f"{p} was not made by {what} (no {MARKER} marker): achilles deletes "
                            "only what it made; move or remove it yourself")
    # the marker goes last: a removal cut short still carries it (clean_stale finishes it)
    for child in p.iterdir():
        if child.name == MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    (p / MARKER).unlink()
    p.rmdir()


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one atomic step (Linux ``renameat2``); ``False`` where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # file system without exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(new: str | os.PathLike[str], dest: str | os.PathLike[str], command: str) -> None:
    """Put the folder ``new`` at ``dest``; an old ``dest`` is set aside, then removed.

    ``dest`` must be missing, an empty folder, or a folder ``command`` made (else
    :class:`AchillesError`, nothing moved). The old folder is swapped out in one atomic
    step (or, where the file system cannot swap, by two renames with SIGTERM/SIGINT held
    back), so ``dest`` always holds a whole folder, old or new; only then is the old one
    deleted through :func:`remove_made`. An interrupted deletion leaves a hidden marked
    folder beside ``dest`` (the name ``new`` had), which :func:`clean_stale` removes.
    """
    new, dest = Path(new), Path(dest)
    if dest.is_symlink():
        raise AchillesError(f"{dest} is a symbolic link: name the real folder")
    if not dest.exists():
        os.rename(new, dest)
        _repath(dest)
        return
    if dest.is_dir() and not any(dest.iterdir()):
        os.rename(new, dest)  # replaces an empty folder
        _repath(dest)
        return
    if not made_by(dest, command):
        raise AchillesError(f"{dest} was not made by `achilles {command}` (no {MARKER} marker): "
                            "achilles replaces only folders it made; remove it yourself or choose another")
    if _exchange(new, dest):
        _repath(dest)
        _repath(new)  # ``new`` now names the old folder
        remove_made(new, command)
        return
    aside = new.with_name(new.name + ".old")
    blocked = {signal.SIGTERM, signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        os.rename(dest, aside)
        os.rename(new, dest)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    _repath(dest)
    _repath(aside)
    remove_made(aside, command)


def _locked_by_someone(marker: Path) -> bool:
    """Whether a live process holds the lock on ``marker`` (see :func:`temp_dir`)."""
    import fcntl

    try:
        fd = os.open(marker, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops a lock we took
    return False


@contextlib.contextmanager
def hold(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Hold ``folder``'s marker locked (shared) while the block runs: not stale for :func:`clean_stale`."""
    import fcntl

    fd = os.open(Path(folder) / MARKER, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def temp_dir(parent: str | os.PathLike[str], prefix: str, command: str, **facts: Any) -> Iterator[Path]:
    """A new hidden marked folder in ``parent``, held while the block runs.

    On an exception (SIGTERM included, where the CLI turns it into one) the folder is
    removed; on success it is left to the caller (renamed into place, or removed with
    :func:`remove_made`). A folder left by SIGKILL is removed by :func:`clean_stale`.
    """
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        mark(tmp, command, **facts)
        with hold(tmp):
            yield tmp
    except BaseException:
        if tmp.is_dir() and not tmp.is_symlink():
            with contextlib.suppress(AchillesError, OSError):
                remove_made(tmp, command)
            with contextlib.suppress(OSError):
                tmp.rmdir()  # killed before the marker was written: still empty
        raise


def clean_stale(parent: str | os.PathLike[str], prefix: str, command: str) -> list[Path]:
    """Remove what interrupted runs of ``command`` left in ``parent`` under names ``prefix*``.

    Only folders carrying ``command``'s marker whose lock no live process holds are
    removed (a run still writing holds its lock). Returns the removed folders.
    """
    removed: list[Path] = []
    folder = Path(parent)
    if not folder.is_dir():
        return removed
    for p in sorted(folder.iterdir()):
        if not p.name.startswith(prefix) or p.is_symlink() or not p.is_dir():
            continue
        if not any(p.iterdir()):  # killed before its marker was written: nothing to lose
            with contextlib.suppress(OSError):
                p.rmdir()
                removed.append(p)
            continue
        if not made_by(p, command) or _locked_by_someone(p / MARKER):
            continue
        with contextlib.suppress(OSError, AchillesError):
            remove_made(p, command)
            removed.append(p)
    return removed

"""One run per output folder: :func:`claim_dir` locks a folder for the run that writes it."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from achilles.errors import AchillesError
from achilles.results.files import _created_parents, _remove_empty, _umask

LOCK_NAME = ".achilles.lock"


@contextlib.contextmanager
def claim_dir(path: str | os.PathLike[str], *, flag: str = "--out-dir") -> Iterator[Path]:
    """Hold output folder ``path`` for one run; refuse if another run holds it.

    Creates the folder (and a lock file in it, locked with ``fcntl.flock``: the kernel
    drops the lock if the process dies). On exit the lock file is removed, and so is the
    folder when this call created it and the run wrote nothing into it: a failed run leaves
    no empty folder.
    """
    p = Path(path).expanduser()
    created = _created_parents(p)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AchillesError(f"cannot create {p}: {e.strerror or e} (check {flag})") from None
    lock = p / LOCK_NAME
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        _remove_empty(created)
        raise AchillesError(
            f"another achilles run is writing into {p}: wait for it or choose another {flag}"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield p
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)
        _remove_empty(created)

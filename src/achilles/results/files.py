"""Atomic result files and destination checks.

* Writes are atomic (:func:`atomic_write`, :func:`atomic_path`): a uniquely named temporary
  file in the destination folder is written, fsync'ed and renamed into place, so an
  interrupted run (an exception, Ctrl-C or SIGTERM) never leaves a half-written result or a
  stray temporary file. Files get the mode the umask allows (``0666 & ~umask``), like any
  file a shell creates, also when they replace an older file.
* Destinations are checked before the work (:func:`check_destination`): a real write probe
  in the folder, cleaned up; nothing is created.
* Non-finite floats are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"`` (strict
  JSON has no literal for them) and read back as floats: a non-finite value is reported as
  such, never replaced by a number.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from achilles.errors import AchillesError
from achilles.results.signals import sigterm_unwinds


def encode_float(x: float) -> float | str:
    """Return ``x`` unchanged when finite, else ``"nan"``/``"inf"``/``"-inf"``."""
    x = float(x)
    if math.isfinite(x):
        return x
    if math.isnan(x):
        return "nan"
    return "inf" if x > 0 else "-inf"


def decode_float(x: float | str | None) -> float | None:
    """Inverse of :func:`encode_float` (``None`` stays ``None``)."""
    if x is None:
        return None
    return float(x)


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return encode_float(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _jsonable(obj.item())
    return obj


def _umask() -> int:
    """The process umask (read from /proc where possible: ``os.umask`` alone must set it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _created_parents(folder: Path) -> list[Path]:
    """The missing folders on the way to ``folder``, outermost first."""
    missing: list[Path] = []
    p = folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing[::-1]


def _remove_empty(folders: list[Path]) -> None:
    for d in reversed(folders):
        try:
            d.rmdir()
        except OSError:
            break


def _write_error(path: Path, e: OSError) -> AchillesError:
    why = e.strerror or str(e)
    hint = "free some space" if e.errno == errno.ENOSPC else "choose another destination"
    return AchillesError(f"cannot write {path}: {why} ({hint})")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    For writers that want a file name (``savefig``, ``safetensors.torch.save_file``). The
    temp name is unique (two concurrent writers never share one) and keeps the suffix, so
    format detection by extension still works. On any exception, SIGTERM included, the temp
    file and any folder created for it are removed and nothing is left at ``path``. An
    ``OSError`` (full disk, read-only folder) becomes one :class:`AchillesError` line.
    """
    path = Path(path)
    if path.is_dir():
        raise AchillesError(f"cannot write {path}: it is a folder (name a file)")
    created = _created_parents(path.parent)
    tmp: Path | None = None
    with sigterm_unwinds():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(
                prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent
            )
            os.close(fd)
            tmp = Path(name)
            yield tmp
            os.chmod(tmp, 0o666 & ~_umask())
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            tmp = None
            with contextlib.suppress(OSError):  # make the rename itself durable
                dfd = os.open(path.parent, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except OSError as e:
            raise _write_error(path, e) from None
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
                _remove_empty(created)


def atomic_write(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically; see :func:`atomic_path`."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        tmp.write_bytes(raw)
    return Path(path)


def write_json(path: str | os.PathLike[str], payload: Any) -> Path:
    """Write ``payload`` as JSON to ``path`` atomically (see :func:`atomic_path`)."""
    text = json.dumps(_jsonable(payload), indent=1, allow_nan=False)
    return atomic_write(path, text + "\n")


def check_destination(
    path: str | os.PathLike[str], kind: str = "file", *, force: bool = True, flag: str = "--out"
) -> Path:
    """Check that a result can be written at ``path``, before any long work; create nothing.

    Call it for every destination a command will write, before loading a model, so a bad
    destination costs a second, not a run.

    Args:
        path: the file (``kind="file"``) or folder (``kind="dir"``) the command will write.
        kind: ``"file"``: ``path`` must not be a folder; ``"dir"``: ``path`` must not be a file.
        force: whether an existing file may be replaced (``False``: refuse it).
        flag: the option that named ``path``, for the error message.

    Raises:
        AchillesError: an empty path, a file where a folder is needed (or the reverse), an
        existing file with ``force=False``, or a folder where a real write probe (a temp
        file created, written, fsync'ed and removed) fails: read-only, missing permission,
        full disk.

    Returns:
        ``path`` as a :class:`~pathlib.Path` (``~`` expanded).
    """
    try:
        return _check_destination(path, kind, force=force, flag=flag)
    except OSError as e:  # a name too long for the file system, a loop of links, ...
        raise AchillesError(f"cannot write {os.fspath(path)}: {e.strerror or e} (check {flag})") from None


def _check_dotdot(p: Path, raw: str, flag: str) -> None:
    """Refuse a path that climbs (``..``) out of a folder that does not exist: the operating
    system cannot walk it, so a write there would fail after the work."""
    for i, part in enumerate(p.parts):
        if part == ".." and i > 0 and not Path(*p.parts[:i]).is_dir():
            raise AchillesError(f"{flag} {raw} climbs ('..') out of {Path(*p.parts[:i])}, which "
                                "does not exist: name the destination without it")


def _check_destination(
    path: str | os.PathLike[str], kind: str = "file", *, force: bool = True, flag: str = "--out"
) -> Path:
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', not {kind!r}")
    raw = os.fspath(path)
    if not raw.strip():
        raise AchillesError(f"{flag} is empty: name a {'file' if kind == 'file' else 'folder'}")
    p = Path(raw).expanduser()
    _check_dotdot(p, raw, flag)
    if kind == "file":
        if p.is_dir() or raw.endswith(("/", os.sep)):
            raise AchillesError(f"{flag} {raw} is a folder: name a file inside it, e.g. {p / 'result.json'}")
        if p.exists() and not force:
            raise AchillesError(f"{flag} {raw} exists: remove it or pass --force")
        folder = p.parent
    else:
        if p.exists() and not p.is_dir():
            raise AchillesError(f"{flag} {raw} is a file: name a folder")
        folder = p
    probe_in = folder
    while not probe_in.exists() and probe_in != probe_in.parent:
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise AchillesError(f"cannot write {raw}: {probe_in} is a file, not a folder (check {flag})")
    try:
        fd, name = tempfile.mkstemp(prefix=".achilles-probe.", dir=probe_in)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as e:
        hint = "free some space" if e.errno == errno.ENOSPC else "choose a writable place"
        raise AchillesError(f"cannot write {raw}: {e.strerror or e} in {probe_in} ({flag}: {hint})") from None
    return p


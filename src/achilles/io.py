"""Result files: atomic JSON writes, honest floats, and run provenance.

* Writes are atomic (:func:`atomic_write`, :func:`atomic_path`): a uniquely named temporary
  file in the destination folder is written, fsync'ed and renamed into place, so an
  interrupted run (an exception, Ctrl-C or SIGTERM) never leaves a half-written result or a
  stray temporary file. Files get the mode the umask allows (``0666 & ~umask``), like any
  file a shell creates, also when they replace an older file.
* Destinations are checked before the work (:func:`check_destination`): a real write probe
  in the folder, cleaned up; nothing is created. :func:`claim_dir` holds an output folder
  for one run, so two runs cannot interleave their files in it.
* Non-finite floats are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"`` (strict
  JSON has no literal for them) and read back as floats: a non-finite value is reported as
  such, never replaced by a number.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from achilles.checks import input_file_problem
from achilles.errors import AchillesError

SCHEMA_VERSION = 1


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


class _Terminated(BaseException):
    """SIGTERM arrived during an atomic write: unwind (removing the temp file), then exit."""


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


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM into an exception for the duration (main thread, default handler only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (signal.SIG_DFL, None):
        yield  # someone (the CLI, a test runner) already handles SIGTERM
        return

    def handler(signum: int, frame: object) -> None:
        raise _Terminated

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)  # die of SIGTERM as the sender expects
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    with _sigterm_unwinds():
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
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', not {kind!r}")
    raw = os.fspath(path)
    if not raw.strip():
        raise AchillesError(f"{flag} is empty: name a {'file' if kind == 'file' else 'folder'}")
    p = Path(raw).expanduser()
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


LOCK_NAME = ".achilles.lock"


@contextlib.contextmanager
def claim_dir(path: str | os.PathLike[str], *, flag: str = "--out-dir") -> Iterator[Path]:
    """Hold output folder ``path`` for one run; refuse if another run holds it.

    Creates the folder (and a lock file in it, locked with ``fcntl.flock``: the kernel
    drops the lock if the process dies). On exit the lock file is removed, and so is the
    folder when this call created it and the run wrote nothing into it: a failed run leaves
    no empty folder.
    """
    import fcntl

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


def read_json(path: str | os.PathLike[str], kind: str | None = None) -> dict[str, Any]:
    """Read a result file written by :func:`write_json`, checking its ``kind`` and schema.

    Every way a file can be damaged (not UTF-8, not JSON, nested too deep, not an object,
    a ``schema_version`` that is not a known integer, ``config``/``pool``/``env`` not
    objects) is one :class:`AchillesError` line.
    """
    path = Path(path)
    problem = input_file_problem(path)
    if problem is not None:
        raise AchillesError(problem)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise AchillesError(f"{path} is not UTF-8 text: give an achilles result file") from None
    except json.JSONDecodeError as e:
        raise AchillesError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise AchillesError(f"{path} is nested too deeply to be an achilles result file") from None
    except OSError as e:
        raise AchillesError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise AchillesError(f"{path} is not an achilles result file (not a JSON object)")
    if kind is not None and data.get("kind") != kind:
        raise AchillesError(
            f"{path} is a {data.get('kind', 'unknown')!r} file, expected a {kind!r} file"
        )
    version = data.get("schema_version")
    if version is not None and (type(version) is not int or version < 1):
        raise AchillesError(f"{path} has schema_version {version!r}; expected an integer >= 1")
    if version is not None and version > SCHEMA_VERSION:
        raise AchillesError(
            f"{path} has schema_version {version}; this achilles reads up to {SCHEMA_VERSION}: upgrade achilles"
        )
    for key in ("config", "pool", "env"):
        if key in data and not isinstance(data[key], dict):
            raise AchillesError(f"{path}: field {key!r} must be an object, not {type(data[key]).__name__}")
    return data


def require_fields(data: dict[str, Any], path: str | os.PathLike[str], fields: dict[str, Any]) -> None:
    """Check that ``data`` has each field of ``fields`` with the given type(s), in one line.

    ``fields`` maps a name to a type or a tuple of types (``type(None)`` allows null);
    ``bool`` never passes for ``int``/``float``, and the strings ``"nan"``/``"inf"`` pass for
    ``float`` (see :func:`encode_float`).
    """
    for name, types_ in fields.items():
        if name not in data:
            raise AchillesError(f"{path} lacks the field {name!r}: it is damaged or not an achilles file")
        value = data[name]
        allowed = types_ if isinstance(types_, tuple) else (types_,)
        ok = any(_is_type(value, t) for t in allowed)
        if not ok:
            want = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise AchillesError(
                f"{path}: field {name!r} must be {want}, not {type(value).__name__} ({value!r:.40})"
            )


def _is_type(value: Any, t: type) -> bool:
    if t is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)) or value in (
            "nan", "inf", "-inf")
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, t)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weights_fingerprint(name_or_path: str | None, commit: str | None = None) -> str | None:
    """An identity of a model's weights that survives another spelling of its path.

    For a local folder: a SHA-256 over each weight file's name, size and 16 evenly spaced
    64 KiB samples of its bytes (about 1 MiB read per file, whatever the model size), so a
    copy of the folder matches and a model of the same shape with other weights does not.
    For a hub id: ``hub:ID@COMMIT``. ``None`` when neither is known.
    """
    if not name_or_path:
        return None
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        return f"hub:{name_or_path}@{commit}" if commit else f"hub:{name_or_path}"
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    if not files:
        return None
    return _fingerprint_files(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@functools.lru_cache(maxsize=16)
def _fingerprint_files(files: tuple[tuple[str, int, int], ...]) -> str:
    import hashlib

    h = hashlib.sha256()
    chunk, samples = 1 << 16, 16
    for name, size, _mtime in files:
        h.update(f"{Path(name).name}:{size}|".encode())
        with open(name, "rb") as f:
            for i in range(samples):
                f.seek(max(0, (size - chunk) * i // (samples - 1)))
                h.update(f.read(chunk))
    return "sha256:" + h.hexdigest()[:32]


def _git_sha() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(model: Any | None = None) -> dict[str, Any]:
    """Package versions, platform and device facts recorded with every result."""
    import torch
    import transformers

    from achilles import __version__

    env: dict[str, Any] = {
        "achilles": __version__,
        "achilles_git": _git_sha(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    try:
        import accelerate

        env["accelerate"] = accelerate.__version__
    except ImportError:  # pragma: no cover - accelerate is a dependency
        env["accelerate"] = None
    if model is not None:
        p = next(model.parameters())
        env["dtype"] = str(p.dtype).removeprefix("torch.")
        env["device"] = str(p.device)
        env["device_map"] = getattr(model, "hf_device_map", None)
        cfg = model.config
        env["model_name_or_path"] = getattr(cfg, "_name_or_path", None)
        env["model_revision"] = getattr(cfg, "_commit_hash", None)
        env["weights_fingerprint"] = weights_fingerprint(
            env["model_name_or_path"], env["model_revision"]
        )
    return env

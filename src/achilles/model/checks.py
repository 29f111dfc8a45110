"""Input checks that need neither torch nor transformers, so they run before those imports.

A typo in a local model path must fail in well under a second, not after importing torch
(seconds) and asking the hub about it (tens of seconds of retries). ``cli.main`` calls
:func:`model_path_problem` on ``--model`` before it builds the parser.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from achilles.errors import AchillesError
from achilles.model.named_models import is_named, named_model_problem


def looks_local(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub id (``name``/``org/name``).

    Local: it starts with ``.``, ``/`` or ``~``, has more than one ``/`` or a backslash, or
    its parent folder exists here (``models/foo`` next to a ``models/`` folder).
    """
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        return True
    parent = Path(name).parent
    return parent != Path(".") and parent.is_dir()


def model_path_problem(name: str, gguf_file: str | None = None) -> str | None:
    """The one-line error for a ``--model`` (and ``--gguf-file``) naming a missing or unusable
    local path, a file that is not GGUF, or a registry model that is not installed."""
    if not name.strip():
        return "--model is empty: give a local model folder, a .gguf file or a hub id"
    local = Path(name).expanduser()
    if gguf_file is not None:
        if not local.is_dir():
            return (f"--gguf-file names a file inside the --model folder, and {name} is not a "
                    "local folder (or give the .gguf path to --model alone)")
        return _gguf_problem(local / gguf_file, "--gguf-file")
    if is_named(name):
        return named_model_problem(name)
    if not local.exists():
        return f"model path not found: {name} (check --model)" if looks_local(name) else None
    if local.is_file():
        if local.suffix.lower() == ".gguf" or _starts_with(local, GGUF_MAGIC):
            return _gguf_problem(local, "--model")
        return f"--model must be a folder, a .gguf file or a hub id, not this file: {name}"
    if not (local / "config.json").is_file():
        ggufs = sorted(p.name for p in local.glob("*.gguf"))
        if ggufs:
            return (f"{name} has no config.json but holds GGUF files: pass --gguf-file "
                    f"{ggufs[0]}, or the .gguf path to --model")
        return f"{name} has no config.json: point --model at a saved model folder"
    return None


GGUF_MAGIC = b"GGUF"


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


def _gguf_problem(path: Path, flag: str) -> str | None:
    if not path.is_file():
        return f"GGUF file not found: {path} (check {flag})"
    if not _starts_with(path, GGUF_MAGIC):
        return f"{path} is not a GGUF file (it does not start with the bytes GGUF; check {flag})"
    return None


def argv_value(argv: Sequence[str], flag: str) -> str | None:
    """The value of ``flag`` in a command line, if given (``FLAG X`` or ``FLAG=X``)."""
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def argv_model(argv: Sequence[str]) -> str | None:
    """The value of ``--model`` in a command line, if given (``--model X`` or ``--model=X``)."""
    return argv_value(argv, "--model")


def check_loading_info(name: str, info: Mapping[str, Collection[object] | None]) -> None:
    """Refuse a checkpoint whose weights do not match its config (one line, first offender)."""
    def first(key: str) -> object | None:
        items = sorted(info.get(key) or (), key=str)
        return items[0] if items else None

    n = {k: len(info.get(k) or ()) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if n["mismatched_keys"]:
        raise AchillesError(
            f"{name}: {n['mismatched_keys']} weight(s) do not match the config's shapes "
            f"(first: {_mismatch(first('mismatched_keys'))}): config.json and the weights disagree"
        )
    if n["missing_keys"]:
        raise AchillesError(
            f"{name}: {n['missing_keys']} weight(s) the config needs are missing from the "
            f"checkpoint (first: {first('missing_keys')}): config.json and the weights disagree"
        )
    if n["unexpected_keys"]:
        raise AchillesError(
            f"{name}: {n['unexpected_keys']} weight(s) in the checkpoint are not in the config's "
            f"model (first: {first('unexpected_keys')}): config.json and the weights disagree"
        )


def _mismatch(entry: object) -> str:
    if isinstance(entry, tuple) and len(entry) == 3:
        key, ckpt, want = entry
        return f"{key} is {tuple(ckpt)} in the checkpoint, {tuple(want)} by the config"
    return str(entry)

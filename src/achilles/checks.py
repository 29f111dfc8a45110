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
    if local.is_file() and local.suffix == ".gguf":
        return None  # a GGUF file (achilles export --format gguf)
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

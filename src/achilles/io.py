"""Result files: atomic JSON writes, honest floats, and run provenance.

* Writes are atomic: a temporary file in the destination folder is renamed into place, so
  an interrupted run never leaves a half-written result.
* Non-finite floats are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"`` (strict
  JSON has no literal for them) and read back as floats: a non-finite value is reported as
  such, never replaced by a number.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

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


def write_json(path: str | os.PathLike[str], payload: Any) -> Path:
    """Write ``payload`` as JSON to ``path`` atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_jsonable(payload), indent=1, allow_nan=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_json(path: str | os.PathLike[str], kind: str | None = None) -> dict[str, Any]:
    """Read a result file written by :func:`write_json`, checking its ``kind`` and schema."""
    path = Path(path)
    if not path.is_file():
        raise AchillesError(f"file not found: {path} (check the path)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AchillesError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise AchillesError(f"{path} is not an achilles result file")
    if kind is not None and data.get("kind") != kind:
        raise AchillesError(
            f"{path} is a {data.get('kind', 'unknown')!r} file, expected a {kind!r} file"
        )
    version = data.get("schema_version")
    if version is not None and version > SCHEMA_VERSION:
        raise AchillesError(
            f"{path} has schema_version {version}; this achilles reads up to {SCHEMA_VERSION}: upgrade achilles"
        )
    return data


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
    return env

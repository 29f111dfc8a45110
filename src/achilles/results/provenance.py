"""Provenance recorded with every result: versions, platform, device, weights fingerprint."""

from __future__ import annotations

import functools
import hashlib
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from achilles.version import __version__

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
    h = hashlib.sha256()
    chunk, samples = 1 << 16, 16
    for name, size, _mtime in files:
        h.update(f"{Path(name).name}:{size}|".encode())
        with open(name, "rb") as f:
            for i in range(samples):
                f.seek(max(0, (size - chunk) * i // (samples - 1)))
                h.update(f.read(chunk))
    return "sha256:" + h.hexdigest()[:32]


@functools.lru_cache(maxsize=1)
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
        if getattr(model, "gguf_provenance", None):  # dequantized from a GGUF file
            env["gguf"] = model.gguf_provenance
    return env

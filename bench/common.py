"""Shared helpers of the benchmark scripts: random-weight models, timing and peak memory.

Scripts in ``bench/`` are run from the repository root (``python bench/stage1.py``), so this
module is imported as ``common``. Nothing here is part of the library.
"""

from __future__ import annotations

import gc
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers as T


@dataclass(frozen=True)
class Shape:
    """A Llama-style decoder shape."""

    name: str
    hidden: int
    layers: int
    inter: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def label(self) -> str:
        return f"{self.name} (d={self.hidden}, L={self.layers})"


LLAMA3_8B = Shape("llama-3-8b", 4096, 32, 14336, 32, 8, 128256)
QWEN25_7B = Shape("qwen2.5-7b", 3584, 28, 18944, 28, 4, 152064)


def small_shape(hidden: int, layers: int, vocab: int = 8192) -> Shape:
    """A Llama-3-proportioned shape (intermediate 3.5×hidden, head dim 64, 4 query heads per KV)."""
    heads = max(1, hidden // 64)
    return Shape(f"llama-{hidden}x{layers}", hidden, layers, int(3.5 * hidden), heads, max(1, heads // 4), vocab)


def build_model(shape: Shape, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A random-weight model of ``shape`` built directly on ``device`` in ``dtype`` (eval mode)."""
    kw = dict(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.inter,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, max_position_embeddings=4096,
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
    )
    cfg = T.Qwen2Config(**kw) if shape.name.startswith("qwen") else T.LlamaConfig(**kw)
    torch.manual_seed(0)
    with torch.device(device):
        model = T.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def random_ids(tokens: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Token ids ``[1, T]``: BOS (0) then seeded random tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (1, tokens), generator=g)
    ids[0, 0] = 0
    return ids


def sync(device: torch.device | str) -> None:
    """Wait for the GPU work queued so far: on every visible GPU (a device map spans several)."""
    if torch.device(device).type == "cuda":
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


def timed(fn: Callable[[], object], device: torch.device | str) -> tuple[float, object]:
    """Wall seconds of ``fn()`` (device work included) and its result."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def timed2(fn: Callable[[], object], device: torch.device | str) -> tuple[float, float]:
    """Wall seconds and process CPU seconds of ``fn()``.

    On a shared CPU the wall time depends on the other processes; the CPU time (all threads)
    much less, so both are reported.
    """
    sync(device)
    t, c = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - t, time.process_time() - c


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def malloc_mode(mode: str) -> None:
    """Tune glibc malloc for a timing window or a memory window (no-op elsewhere).

    ``"timing"``: tensors up to 32 MiB come from the heap and freed memory stays there, so
    repeated passes do not pay page faults (what a long-running process sees).
    ``"memory"``: every allocation >= 1 MiB is its own ``mmap``, returned to the OS when
    freed, so the resident set tracks live tensors and ``VmHWM`` is a true peak (otherwise
    freed heap pages are reused silently and a later run shows no growth at all).
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    if mode == "timing":
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    else:
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)


# ------------------------------------------------------------------------- peak memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak(device: torch.device | str) -> int:
    """Start a peak-memory window; returns the baseline in bytes.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU: the process's resident set;
    writing ``5`` to ``/proc/self/clear_refs`` resets ``VmHWM`` (Linux), so the window's peak
    is ``VmHWM`` at the end minus the resident set at the start (see :func:`malloc_mode`).
    """
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:  # give free heap pages back, so that reusing them in the window counts again
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_kib("VmRSS") * 1024


def peak_since(device: torch.device | str, baseline: int) -> int:
    """Peak bytes above ``baseline`` since :func:`reset_peak`."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() - baseline
    return _status_kib("VmHWM") * 1024 - baseline


def mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    return (
        f"CPU {cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {T.__version__}, {dev}"
    )


def table(header: list[str], rows: list[list[object]]) -> str:
    """A markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)

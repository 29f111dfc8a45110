"""Small GGUF files built with the ``gguf`` package's writer, for tests of the GGUF input path."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_gguf(path: Path, arch: str = "llama", *, quantized: bool = False, cut: int = 0,
               keep: int | None = None) -> Path:
    """A one-layer GGUF with an F32 tensor (and a Q8_0 one with ``quantized``).

    ``cut`` drops that many bytes from the end (a file truncated in its tensor data);
    ``keep`` keeps only the first ``keep`` bytes (truncated in its header).
    """
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_name("crafted")
    w.add_tensor("blk.0.ffn_down.weight", np.linspace(-1, 1, 64 * 96, dtype=np.float32).reshape(96, 64))
    if quantized:
        data = np.random.default_rng(0).standard_normal((32, 128)).astype(np.float32)
        q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor("blk.0.ffn_up.weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if cut or keep is not None:
        raw = path.read_bytes()
        path.write_bytes(raw[:keep] if keep is not None else raw[:-cut])
    return path

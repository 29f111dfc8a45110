"""A GGUF file's bytes: read its header, map a mask's weight edits to byte patches, write them.

The pieces :mod:`achilles.weights.gguf_export` puts together; see that module for what is
exact in which tensor type and how the header is kept.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from achilles.errors import AchillesError
from achilles.model.gguf_names import GGUF_ARCHS, gguf_tensor_name, is_permuted, permuted_row
from achilles.model.units import Unit
from achilles.results.files import atomic_path

logger = logging.getLogger(__name__)

MASK_KEY = "achilles.mask"
"""The GGUF metadata key holding the exported mask (a JSON string)."""

CHUNK_BYTES = 16 << 20
"""Bytes copied per read/write while streaming the data section."""

_FLOAT_TYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}
_COLUMN_TYPES = ("F32", "F16", "BF16", "F64", "Q8_0")
"""Tensor types in which one element of a row can be zeroed exactly."""


@dataclass(frozen=True)
class TensorEdit:
    """One edit in GGUF terms: set ``row``/``column``/``entry`` ``index`` of ``tensor`` to ``value``.

    ``index`` is in the file's order (a rotary-permuted q/k row is already mapped);
    ``source_index`` is the Hugging Face one.
    """

    tensor: str
    axis: str
    index: int
    value: float
    param: str
    source_index: int
    unit: Unit

    def to_dict(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "axis": self.axis, "index": self.index, "value": self.value,
                "param": self.param, "source_index": self.source_index, "unit": self.unit.to_dict()}


@dataclass(frozen=True)
class Patch:
    """Bytes to write at ``offset`` (relative to the data section) of ``tensor``."""

    tensor: str
    offset: int
    data: bytes



# ---------------------------------------------------------------------------------------------
# reading


def read_gguf(path: str | os.PathLike[str]) -> Any:
    """A ``gguf.GGUFReader`` of ``path``; any unreadable file is one :class:`AchillesError` line."""
    from gguf import GGUFReader

    p = Path(path)
    if not p.is_file():
        raise AchillesError(f"GGUF file not found: {p} (check --model)")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise AchillesError(f"{p} is not a GGUF file (it does not start with 'GGUF'): check --model")
    try:
        reader = GGUFReader(p, "r")
    except Exception as e:  # noqa: BLE001 - every parse failure of a damaged file is one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AchillesError(f"{p} is a damaged or truncated GGUF file ({first}): re-download or "
                            "re-convert it") from None
    size = p.stat().st_size
    for t in reader.tensors:
        if t.data_offset + int(t.n_bytes) > size or t.data.nbytes != int(t.n_bytes):
            raise AchillesError(f"{p} is truncated: tensor {t.name} ends past the end of the file "
                                "(re-download or re-convert it)")
    return reader


def _field_bytes(f: Any) -> int:
    return sum(int(part.nbytes) for part in f.parts)


def header_layout(reader: Any, path: Path) -> tuple[list[Any], int, int]:
    """The key/value fields (in file order) and the byte span ``[start, end)`` of the tensor records.

    Checks that the header is what the GGUF spec says (fields back to back from byte 24, then
    the tensor records, then padding up to the data section), so copying it piecewise is exact.
    """
    fields = sorted((f for name, f in reader.fields.items() if not name.startswith("GGUF.")),
                    key=lambda f: f.offset)
    version = int(reader.fields["GGUF.version"].parts[-1][0])
    if version < 2:  # version 1 spelled lengths as u32; the key added here is u64
        raise AchillesError(f"{path} is GGUF version {version}: convert it again with a recent "
                            "llama.cpp")
    pos = 24  # magic u32, version u32, tensor count u64, key/value count u64
    for f in fields:
        if f.offset != pos:
            raise AchillesError(f"{path}: unexpected header layout at byte {pos} (a GGUF writer "
                                "this export does not know): convert the model again with llama.cpp")
        pos += _field_bytes(f)
    start = pos
    for t in reader.tensors:
        if t.field.offset != pos:
            raise AchillesError(f"{path}: unexpected tensor record layout at byte {pos}: convert "
                                "the model again with llama.cpp")
        pos += _field_bytes(t.field)
    if not pos <= reader.data_offset < pos + reader.alignment:
        raise AchillesError(f"{path}: its data section does not follow the header: convert the "
                            "model again with llama.cpp")
    return fields, start, pos


def metadata_value(reader: Any, key: str, default: Any = None) -> Any:
    """A scalar or string metadata value of the file (``default`` when absent)."""
    from gguf.constants import GGUFValueType

    f = reader.fields.get(key)
    if f is None or not f.data:
        return default
    part = f.parts[f.data[0]]
    if f.types and f.types[0] == GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    return part[0].item()


# ---------------------------------------------------------------------------------------------
# planning: units -> tensor edits -> byte patches


def tensor_edits(reader: Any, edits: Sequence[Any], path: Path) -> list[TensorEdit]:
    """Map :class:`~achilles.model.masking.WeightEdit` (Hugging Face names) to the GGUF file's tensors."""
    arch = metadata_value(reader, "general.architecture")
    if arch not in GGUF_ARCHS:
        raise AchillesError(
            f"{path} is a GGUF of architecture {arch!r}; exact GGUF export knows "
            f"{', '.join(GGUF_ARCHS)} (add its layout to achilles.model.gguf_names.GGUF_ARCHS), or "
            "export a Hugging Face checkpoint with --format hf"
        )
    by_name = {t.name: t for t in reader.tensors}
    n_head = metadata_value(reader, f"{arch}.attention.head_count")
    n_kv = metadata_value(reader, f"{arch}.attention.head_count_kv", n_head)
    out = []
    for e in edits:
        name = gguf_tensor_name(e.param, arch)
        t = by_name.get(name) if name else None
        if name is None or t is None:  # t is None whenever name is
            raise AchillesError(f"{path} has no tensor for {e.param} ({e.unit}; expected "
                                f"{name or 'a mapped name'}): the GGUF does not match the mask's model")
        shape = [int(n) for n in t.shape]  # ne: row length first
        if e.dim == 0 and len(shape) == 1:
            axis, length = "entry", shape[0]
        elif e.dim == 0:
            axis, length = "row", shape[1]
        else:
            axis, length = "column", shape[0]
        if not 0 <= e.index < length:
            raise AchillesError(f"{e.unit} needs {axis} {e.index} of {name}, which has {length}: "
                                "the GGUF does not match the mask's model")
        index = e.index
        if e.dim == 0 and is_permuted(name, arch):
            heads = n_kv if ".attn_k." in name else n_head
            index = permuted_row(e.index, shape[-1], int(heads))
        out.append(TensorEdit(name, axis, index, float(e.value), e.param, e.index, e.unit))
    return out


def _type_name(t: Any) -> str:
    return t.tensor_type.name


def _block(t: Any) -> tuple[int, int]:
    from gguf.constants import GGML_QUANT_SIZES

    return GGML_QUANT_SIZES[t.tensor_type]


@functools.cache
def zero_block(qtype: Any) -> bytes:
    """One block of ``qtype`` that dequantizes to exactly 0.0 everywhere, or an error.

    Tries ``gguf.quants.quantize`` of zeros, then all-zero bytes, preferring a block with no
    ``-0.0``; each candidate is checked with ``gguf.quants.dequantize``.
    """
    from gguf import quants
    from gguf.constants import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    if qtype.name in ("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"):
        return bytes(size)  # IEEE and two's complement zero
    candidates = []
    with contextlib.suppress(Exception):  # no Python quantizer for this type: try zero bytes
        candidates.append(quants.quantize(np.zeros((1, block), np.float32), qtype).tobytes())
    candidates.append(bytes(size))
    zeros = []
    for c in candidates:
        if len(c) != size:
            continue
        try:
            d = quants.dequantize(np.frombuffer(c, np.uint8).reshape(1, size), qtype)
        except Exception:  # noqa: BLE001 - gguf cannot dequantize this type: refused below
            continue
        if d.size == block and np.all(d == 0):
            if not np.signbit(d).any():
                return c
            zeros.append(c)
    if zeros:
        return zeros[0]  # -0.0 == 0.0
    raise AchillesError(f"no {qtype.name} block is known to dequantize to exactly 0 (gguf "
                        f"cannot dequantize {qtype.name}): a row of such a tensor cannot be zeroed")


def _value_bytes(t: Any, value: float) -> bytes:
    """``value`` as one element of the float (F32/F16/BF16/F64) tensor ``t``."""
    name = _type_name(t)
    if name == "BF16":
        f32 = np.array([value], np.float32).view(np.uint32)
        return (f32 >> 16).astype(np.uint16).tobytes()
    return np.array([value], _FLOAT_TYPES[name]).tobytes()


def byte_patches(reader: Any, edits: Sequence[TensorEdit], path: Path) -> list[Patch]:
    """The byte patches of ``edits``, each checked to dequantize to its target; refuses what is not exact.

    Offsets are relative to the start of the data section. Every refusal is collected and
    reported in one line (first three).
    """
    from gguf import quants

    by_name = {t.name: t for t in reader.tensors}
    patches: list[Patch] = []
    problems: list[str] = []
    for e in edits:
        t = by_name[e.tensor]
        name = _type_name(t)
        block, size = _block(t)
        base = int(t.data_offset) - int(reader.data_offset)
        shape = [int(n) for n in t.shape]
        row_bytes = shape[0] // block * size
        is_float = name in ("F32", "F16", "BF16", "F64")
        if e.axis == "row" and e.value == 0:  # whole blocks that dequantize to 0.0
            try:
                zb = zero_block(t.tensor_type)
            except AchillesError as err:
                problems.append(f"{e.unit}: {e.tensor}: {err}")
                continue
            patches.append(Patch(e.tensor, base + e.index * row_bytes, zb * (row_bytes // size)))
        elif e.axis in ("row", "entry"):  # a gain of a 1-D tensor, or a non-zero row
            if not is_float:
                problems.append(f"{e.unit}: {e.tensor} is {name}: its values cannot be set to "
                                f"{e.value} without requantizing its blocks")
                continue
            n = shape[0] if e.axis == "row" else 1
            start = e.index * (row_bytes if e.axis == "row" else size)
            patches.append(Patch(e.tensor, base + start, _value_bytes(t, e.value) * n))
        elif e.axis == "column":
            if name not in _COLUMN_TYPES:
                problems.append(
                    f"{e.unit}: its input column {e.source_index} of {e.tensor} is {name}, whose "
                    "blocks share a scale and offset: one value cannot be zeroed without "
                    f"requantizing (exact for {', '.join(_COLUMN_TYPES)} tensors)")
                continue
            n_rows = shape[1]
            if is_float:
                elem = _value_bytes(t, e.value)
                patches += [Patch(e.tensor, base + r * row_bytes + e.index * size, elem)
                            for r in range(n_rows)]
                continue
            # Q8_0: block = f16 scale d, then 32 int8 quants; value = d * q
            b, k = divmod(e.index, block)
            raw = np.asarray(t.data).reshape(n_rows, row_bytes)[:, b * size:(b + 1) * size].copy()
            before = quants.dequantize(raw, t.tensor_type)
            raw[:, 2 + k] = 0
            after = quants.dequantize(raw, t.tensor_type)
            keep = np.ones(block, bool)
            keep[k] = False
            if not (np.all(after[:, k] == 0) and np.array_equal(after[:, keep], before[:, keep],
                                                                equal_nan=True)):
                problems.append(f"{e.unit}: zeroing column {e.source_index} of {e.tensor} is not "
                                "exact (a block has a non-finite scale)")
                continue
            patches += [Patch(e.tensor, base + r * row_bytes + b * size + 2 + k, b"\0")
                        for r in range(n_rows)]
        else:  # pragma: no cover - axes are row/column/entry
            raise ValueError(e.axis)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise AchillesError(f"{path}: no exact GGUF edit for " + "; ".join(problems[:3]) + more
                            + ": export a Hugging Face checkpoint (--format hf) or drop these units")
    return patches


def changed_ranges(reader: Any, patches: Sequence[Patch]) -> dict[str, list[tuple[int, int]]]:
    starts = {t.name: int(t.data_offset) - int(reader.data_offset) for t in reader.tensors}
    out: dict[str, list[tuple[int, int]]] = {}
    for p in sorted(patches, key=lambda p: p.offset):
        s, e = p.offset - starts[p.tensor], p.offset - starts[p.tensor] + len(p.data)
        ranges = out.setdefault(p.tensor, [])
        if ranges and ranges[-1][1] >= s:
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], e))
        else:
            ranges.append((s, e))
    return out


# ---------------------------------------------------------------------------------------------
# writing


def _kv_string(key: str, value: str, endian: str) -> bytes:
    from gguf.constants import GGUFValueType

    k, v = key.encode("utf-8"), value.encode("utf-8")
    return (struct.pack(f"{endian}Q", len(k)) + k + struct.pack(f"{endian}I", GGUFValueType.STRING)
            + struct.pack(f"{endian}Q", len(v)) + v)


def write_patched(
    reader: Any, path: Path, out: Path, patches: Sequence[Patch], mask_json: str, *,
    progress: bool = False,
) -> int:
    """Write ``path``'s header plus the ``achilles.mask`` key, then its data with ``patches``.

    Returns the output's data-section offset. Writes through :func:`achilles.results.files.atomic_path`.
    """
    from gguf.constants import GGUFEndian
    from tqdm.auto import tqdm

    fields, start, end = header_layout(reader, path)
    endian = ">" if reader.endianess == GGUFEndian.BIG else "<"
    kept = [f for f in fields if f.name != MASK_KEY]  # a re-export replaces the old mask
    size = path.stat().st_size
    with (atomic_path(out) as tmp, open(path, "rb") as src,
          open(tmp, "wb") as dst):  # atomic: atomic_path's temp file
        head = src.read(24)
        n_tensors = struct.unpack(f"{endian}Q", head[8:16])[0]
        dst.write(head[:8] + struct.pack(f"{endian}QQ", n_tensors, len(kept) + 1))
        for f in kept:
            src.seek(f.offset)
            dst.write(src.read(_field_bytes(f)))
        dst.write(_kv_string(MASK_KEY, mask_json, endian))
        src.seek(start)
        dst.write(src.read(end - start))
        pad = -dst.tell() % reader.alignment
        dst.write(b"\0" * pad)
        data_offset = dst.tell()
        src.seek(reader.data_offset)
        with tqdm(total=size - reader.data_offset, unit="B", unit_scale=True, desc="export gguf",
                  disable=not progress) as bar:
            while chunk := src.read(CHUNK_BYTES):
                dst.write(chunk)
                bar.update(len(chunk))
        for p in sorted(patches, key=lambda p: p.offset):
            dst.seek(data_offset + p.offset)
            dst.write(p.data)
    return data_offset

"""Export a mask into a GGUF file of the same quantization, by editing only the affected bytes.

A mask's exact weight edits (:func:`achilles.model.masking.weight_edits`: an output row and its
bias, an input column, a norm gain) are mapped to GGUF tensors (:mod:`achilles.model.gguf_names`)
and then to byte patches, each checked with ``gguf.quants.dequantize`` before anything is
written:

* **A row** of any tensor is a whole number of blocks (GGUF requires ``ne[0]`` to be a
  multiple of the block size), so it is replaced by blocks that dequantize to exactly 0.0
  (for Q4_1: scale ``d = 0``, minimum ``m = 0``, zero nibbles), checked per type.
* **A column** is one element in every row. In F32/F16/BF16 it is written directly; in Q8_0
  its int8 quant is set to 0, which dequantizes to ``d * 0 = 0`` and leaves the block's other
  31 values unchanged (checked by dequantizing the edited blocks). In every other quantized
  type the block's values share a scale *and* an offset (or a codebook), so one value cannot
  be zeroed without requantizing the block: such edits are refused, naming the tensor type.
* **A norm gain** set to a non-zero value (Gemma's ``-1``) is written only in float tensors.

The output keeps the source's header byte for byte (every key/value pair and tensor record,
copied verbatim) and adds one key, ``achilles.mask`` (a JSON string: the units, the edits,
the mask's source). Tensor offsets in GGUF are relative to the aligned start of the data
section, so a longer header shifts that start and no record changes. The data section is
streamed from the source in chunks, then the patches are written over it: host memory holds
one chunk, whatever the model size. The file is written beside ``out`` under a temporary
name and renamed into place (:func:`achilles.results.files.atomic_path`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from achilles.errors import AchillesError
from achilles.model.gguf_names import GGUF_ARCHS, gguf_tensor_name, is_permuted, permuted_row
from achilles.model.units import Unit
from achilles.results.files import atomic_path
from achilles.results.schema import SCHEMA_VERSION

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


@dataclass
class GGUFExportResult:
    """What :func:`export_gguf` wrote, and where the output differs from the source."""

    out: Path
    source: Path
    units: list[Unit]
    edits: list[TensorEdit]
    changed: dict[str, list[tuple[int, int]]]
    """GGUF tensor -> merged ``[start, end)`` byte ranges written, relative to the tensor's data."""
    data_offset: tuple[int, int]
    """Start of the data section in the source and in the output."""
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "gguf_export",
            "config": self.config,
            "source": str(self.source),
            "n_units": len(self.units),
            "units": [u.to_dict() for u in self.units],
            "edits": [e.to_dict() for e in self.edits],
            "changed_bytes": {t: [list(r) for r in rs] for t, rs in self.changed.items()},
        }


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


def _header_layout(reader: Any, path: Path) -> tuple[list[Any], int, int]:
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


def _metadata(reader: Any, key: str, default: Any = None) -> Any:
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
    arch = _metadata(reader, "general.architecture")
    if arch not in GGUF_ARCHS:
        raise AchillesError(
            f"{path} is a GGUF of architecture {arch!r}; exact GGUF export knows "
            f"{', '.join(GGUF_ARCHS)} (add its layout to achilles.model.gguf_names.GGUF_ARCHS), or "
            "export a Hugging Face checkpoint with --format hf"
        )
    by_name = {t.name: t for t in reader.tensors}
    n_head = _metadata(reader, f"{arch}.attention.head_count")
    n_kv = _metadata(reader, f"{arch}.attention.head_count_kv", n_head)
    out = []
    for e in edits:
        name = gguf_tensor_name(e.param, arch)
        t = by_name.get(name) if name else None
        if t is None:
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


@functools.lru_cache(maxsize=None)
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
    try:
        candidates.append(quants.quantize(np.zeros((1, block), np.float32), qtype).tobytes())
    except Exception:  # noqa: BLE001, S110 - no Python quantizer for this type: try zero bytes
        pass
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


def _changed_ranges(reader: Any, patches: Sequence[Patch]) -> dict[str, list[tuple[int, int]]]:
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

    fields, start, end = _header_layout(reader, path)
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


# ---------------------------------------------------------------------------------------------
# the library entry point


def check_gguf_destination(src: str | os.PathLike[str], out: str | os.PathLike[str], *,
                           force: bool) -> Path:
    """Refuse an ``out`` that is not a writable ``.gguf`` file name, exists (unless ``force``), or is ``src``."""
    from achilles.results.files import check_destination

    o = check_destination(out, "file", force=force, flag="--out")
    if o.suffix != ".gguf":
        raise AchillesError(f"--out {out} must end in .gguf (a GGUF file is written)")
    if o.exists() and Path(src).exists() and o.resolve() == Path(src).resolve():
        raise AchillesError(f"--out {out} is the source GGUF: name a new file")
    return o


def _existing(p: Path) -> Path:
    """The closest existing folder above ``p``."""
    p = p.resolve().parent
    while not p.exists():
        p = p.parent
    return p


def plan_gguf_export(src: str | os.PathLike[str], model: Any, units: Sequence[Unit], *,
                     reader: Any = None) -> tuple[Any, list[TensorEdit], list[Patch]]:
    """Everything :func:`export_gguf` checks before it writes: the reader, the edits, the patches."""
    from achilles.model.masking import weight_edits

    path = Path(src)
    reader = read_gguf(path) if reader is None else reader
    _header_layout(reader, path)
    edits = tensor_edits(reader, weight_edits(model, units), path)
    by_name = {t.name: t for t in reader.tensors}
    for e in edits:  # the skeleton's shape, reversed, is the file's
        want = list(model.get_parameter(e.param).shape)[::-1]
        got = [int(n) for n in by_name[e.tensor].shape]
        if got != want:
            raise AchillesError(f"{e.tensor} is {got} (ne) in {path} but {e.param} is "
                                f"{want[::-1]} in the model: the GGUF does not match the mask's model")
    return reader, edits, byte_patches(reader, edits, path)


def export_gguf(
    src: str | os.PathLike[str],
    units: Sequence[Unit],
    out: str | os.PathLike[str],
    *,
    model: Any,
    mask_source: dict[str, Any] | None = None,
    force: bool = False,
    progress: bool = False,
    reader: Any = None,
) -> GGUFExportResult:
    """Write the GGUF ``src`` with ``units`` zeroed to ``out``, in ``src``'s own quantization.

    Args:
        src: the source GGUF file.
        units: the units to zero (checked against ``model``).
        out: the ``.gguf`` file to write; refused if it exists, unless ``force``.
        model: the transformers model of ``src`` (a meta-device skeleton is enough: names and
            shapes), which turns units into weight edits; see :func:`gguf_skeleton`.
        mask_source: provenance of the mask (file, kind, set, top), kept in the ``achilles.mask`` key.
        progress: show a bar over the bytes copied.
        reader: ``src`` already parsed by :func:`read_gguf` (parsing a large vocabulary takes
            seconds), else it is read here.

    Raises:
        AchillesError: before anything is written, for a file that is not a readable GGUF, an
        architecture without a known layout, a model that does not match the file, or a unit
        whose edit cannot be exact in the file's tensor types.
    """
    from achilles import __version__

    if not units:
        raise AchillesError("the mask is empty: there is nothing to export")
    path = Path(src)
    out = check_gguf_destination(path, out, force=force)
    reader, edits, patches = plan_gguf_export(path, model, units, reader=reader)
    free = shutil.disk_usage(_existing(out)).free
    if free < path.stat().st_size + (1 << 20):
        raise AchillesError(f"cannot write {out}: {free / 2**20:,.0f} MiB free, the export needs "
                            f"{path.stat().st_size / 2**20:,.0f} MiB (free some space or choose another --out)")
    changed = _changed_ranges(reader, patches)
    config = {"source": str(path), "mask": mask_source or {}, "achilles": __version__}
    payload = {"schema_version": SCHEMA_VERSION, "kind": "gguf_mask", **config,
               "units": [u.to_dict() for u in units], "edits": [e.to_dict() for e in edits]}
    data_offset = write_patched(reader, path, out, patches,
                                json.dumps(payload, separators=(",", ":")), progress=progress)
    logger.info("exported %d unit(s) (%d tensor edits, %d bytes) to %s", len(units), len(edits),
                sum(len(p.data) for p in patches), out)
    return GGUFExportResult(out=out, source=path, units=list(units), edits=edits, changed=changed,
                            data_offset=(int(reader.data_offset), data_offset), config=config)


def read_mask(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``achilles.mask`` record of an exported GGUF (``None`` if it has none)."""
    value = _metadata(read_gguf(path), MASK_KEY)
    return None if value is None else json.loads(value)


def gguf_skeleton(path: str | os.PathLike[str]) -> Any:
    """The transformers model of a GGUF file on the meta device (its config, no weights).

    The config is what transformers derives from the file's metadata (``gguf_file=``). Check
    the file with :func:`read_gguf` first: a damaged file is then one line of ours.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    p = Path(path)
    try:
        config = AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AchillesError(f"transformers cannot read the model in {p}: {first}") from None
    return model.eval()


__all__ = [
    "MASK_KEY", "GGUFExportResult", "Patch", "TensorEdit", "byte_patches", "export_gguf",
    "gguf_skeleton", "plan_gguf_export", "read_gguf", "read_mask", "tensor_edits", "zero_block",
]

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

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from achilles.errors import AchillesError
from achilles.model.masking import weight_edits
from achilles.model.units import Unit
from achilles.results.envelope import Enveloped, envelope, run_id_of
from achilles.results.files import check_destination
from achilles.version import __version__

logger = logging.getLogger(__name__)

from achilles.weights.gguf_patch import (
    MASK_KEY,
    Patch,
    TensorEdit,
    byte_patches,
    changed_ranges,
    header_layout,
    metadata_value,
    read_gguf,
    tensor_edits,
    write_patched,
    zero_block,
)


@dataclass
class GGUFExportResult(Enveloped):
    """What :func:`export_gguf` wrote, and where the output differs from the source."""

    KIND = "gguf_export"

    out: Path
    source: Path
    units: list[Unit]
    edits: list[TensorEdit]
    changed: dict[str, list[tuple[int, int]]]
    """GGUF tensor -> merged ``[start, end)`` byte ranges written, relative to the tensor's data."""
    data_offset: tuple[int, int]
    """Start of the data section in the source and in the output."""

    def fields(self) -> dict[str, Any]:
        return {
            "source": str(self.source),
            "n_units": len(self.units),
            "units": [u.to_dict() for u in self.units],
            "edits": [e.to_dict() for e in self.edits],
            "changed_bytes": {t: [list(r) for r in rs] for t, rs in self.changed.items()},
        }



# ---------------------------------------------------------------------------------------------
# the library entry point


def check_gguf_destination(src: str | os.PathLike[str], out: str | os.PathLike[str], *,
                           force: bool) -> Path:
    """Refuse an ``out`` that is not a writable ``.gguf`` file name, exists (unless ``force``), or is ``src``."""
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
    path = Path(src)
    reader = read_gguf(path) if reader is None else reader
    header_layout(reader, path)
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
    if not units:
        raise AchillesError("the mask is empty: there is nothing to export")
    path = Path(src)
    out = check_gguf_destination(path, out, force=force)
    reader, edits, patches = plan_gguf_export(path, model, units, reader=reader)
    free = shutil.disk_usage(_existing(out)).free
    if free < path.stat().st_size + (1 << 20):
        raise AchillesError(f"cannot write {out}: {free / 2**20:,.0f} MiB free, the export needs "
                            f"{path.stat().st_size / 2**20:,.0f} MiB (free some space or choose another --out)")
    changed = changed_ranges(reader, patches)
    config = {"source": str(path), "mask": mask_source or {}, "achilles": __version__}
    run_id = run_id_of(mask_source)
    payload = {**envelope("gguf_mask", config=config, run_id=run_id),
               "units": [u.to_dict() for u in units], "edits": [e.to_dict() for e in edits]}
    data_offset = write_patched(reader, path, out, patches,
                                json.dumps(payload, separators=(",", ":")), progress=progress)
    logger.info("exported %d unit(s) (%d tensor edits, %d bytes) to %s", len(units), len(edits),
                sum(len(p.data) for p in patches), out)
    return GGUFExportResult(out=out, source=path, units=list(units), edits=edits, changed=changed,
                            data_offset=(int(reader.data_offset), data_offset), config=config,
                            run_id=run_id)


def read_mask(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``achilles.mask`` record of an exported GGUF (``None`` if it has none)."""
    value = metadata_value(read_gguf(path), MASK_KEY)
    return None if value is None else json.loads(value)


def gguf_skeleton(path: str | os.PathLike[str]) -> Any:
    """The transformers model of a GGUF file on the meta device (its config, no weights).

    The config is what transformers derives from the file's metadata (``gguf_file=``). Check
    the file with :func:`read_gguf` first: a damaged file is then one line of ours.
    """
    from transformers import AutoConfig, AutoModelForCausalLM  # lazily: seconds to import

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

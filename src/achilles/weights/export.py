"""Export a masked model: a standard Hugging Face checkpoint with the mask edited into its weights.

The mask becomes weight edits (:func:`achilles.model.masking.weight_edits`, planned on the
weightless meta-device model, so nothing is loaded to plan them). The checkpoint is then
streamed **shard by shard**: each safetensors shard is read with ``safetensors.safe_open``,
its edited tensors are changed in the source dtype, and it is written under the same name
before the next shard is read, so host memory holds one shard at a time (about twice its
size while ``save_file`` serialises it; ``bench/export.py``): a 70B model is never in
memory, let alone twice. Config, generation config, tokenizer files and the shard
index are copied; a model card (``README.md``) and ``achilles_mask.json`` (the units, the
edits, the mask's source and the environment) are added.

The output folder is written under a hidden temporary name next to ``out``, made and
marked through the deletion guard (:mod:`achilles.results.guard`), and swapped into place at the
end (:func:`achilles.results.guard.replace_dir`): ``--force`` replaces only a folder an earlier
export made, and the old checkpoint is deleted only once the new one is in place. An
interrupted export leaves no partial checkpoint; what a killed one leaves (the hidden
folder) is removed by the next export to the same ``out``. ``out`` must not be, hold, or
lie inside the source model folder or the mask (:func:`achilles.results.paths.check_apart`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from achilles.config import ModelSpec
from achilles.errors import AchillesError
from achilles.model.masking import WeightEdit, weight_edits
from achilles.model.units import Unit
from achilles.results.envelope import Enveloped, run_id_of
from achilles.results.files import atomic_path, write_json
from achilles.results.files import check_destination as check_path
from achilles.results.guard import MARKER, clean_stale, made_by, replace_dir, temp_dir
from achilles.results.paths import check_apart
from achilles.results.provenance import environment

logger = logging.getLogger(__name__)

MASK_FILE = "achilles_mask.json"
INDEX_FILE = "model.safetensors.index.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_SKIPPED = {"README.md", INDEX_FILE, MASK_FILE}
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
"""What is fetched for a hub id: weights as safetensors, configs and tokenizer files."""


@dataclass
class ExportResult(Enveloped):
    """What :func:`export_masked` wrote (``kind: export``, in the output's mask file)."""

    KIND = "export"

    out: Path
    shards: list[str]
    edits: list[WeightEdit]
    units: list[Unit]

    def fields(self) -> dict[str, Any]:
        return {
            "n_units": len(self.units),
            "units": [u.to_dict() for u in self.units],
            "shards": self.shards,
            "edits": [e.to_dict() for e in self.edits],
        }


def resolve_source(spec: ModelSpec) -> Path:
    """The local folder holding ``spec.model``'s files (a hub id is fetched by huggingface_hub;
    a GGUF file is its dequantized float32 cache folder)."""
    from achilles.model.gguf_source import dequantized, source_of

    gguf = source_of(spec)
    if gguf is not None:
        return dequantized(gguf)
    local = Path(spec.model).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec.model, revision=spec.revision, allow_patterns=_HUB_FILES))
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one line
        raise AchillesError(f"could not fetch {spec.model!r} from the hub: {e}") from None


def shard_files(source: Path) -> tuple[list[str], dict[str, str]]:
    """The safetensors shards of ``source`` and the map tensor name -> shard."""
    index = source / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return sorted(set(weight_map.values())), dict(weight_map)
    single = source / "model.safetensors"
    if not single.is_file():
        raise AchillesError(
            f"{source} has no model.safetensors (or {INDEX_FILE}): export streams safetensors "
            "checkpoints; save the model with save_pretrained(safe_serialization=True) first"  # atomic: a message
        )
    with safe_open(str(single), "pt") as f:
        return ["model.safetensors"], {k: "model.safetensors" for k in f.keys()}  # noqa: SIM118


def _checkpoint_key(param: str, weight_map: dict[str, str], prefix: str) -> str | None:
    """The checkpoint tensor holding ``param`` (old GPT-2-style files omit the base prefix)."""
    if param in weight_map:
        return param
    short = param.removeprefix(f"{prefix}.") if prefix else param
    return short if short in weight_map else None


def plan_export(
    model: torch.nn.Module, units: Sequence[Unit], source: Path
) -> tuple[dict[str, list[WeightEdit]], list[str], dict[str, str]]:
    """Edits grouped by checkpoint tensor, checked against the checkpoint's names and shapes.

    ``model`` may be the meta-device skeleton. Raises before anything is written.
    """
    edits = weight_edits(model, units)
    shards, weight_map = shard_files(source)
    prefix = getattr(model, "base_model_prefix", "")
    by_key: dict[str, list[WeightEdit]] = {}
    for e in edits:
        key = _checkpoint_key(e.param, weight_map, prefix)
        if key is None:
            raise AchillesError(
                f"{source} has no tensor {e.param!r} (needed for {e.unit}): the checkpoint's "
                "names differ from the model's; re-save it with save_pretrained"
            )
        by_key.setdefault(key, []).append(e)
    for key, es in by_key.items():
        with safe_open(str(source / weight_map[key]), "pt") as f:
            shape = tuple(f.get_slice(key).get_shape())
        want = tuple(model.get_parameter(es[0].param).shape)
        if shape != want:
            raise AchillesError(
                f"{key} has shape {shape} in {source} but {want} in its config: the checkpoint "
                "does not match its config.json"
            )
    return by_key, shards, weight_map


def check_destination(out: str | os.PathLike[str], *, force: bool) -> None:
    """Refuse an existing non-empty ``out`` (unless ``force``), or one that cannot be written.

    ``--force`` replaces only a folder an earlier export made (it carries the deletion
    guard's marker), never a folder that holds the current directory (an empty ``--out``
    is refused, not read as ``.``), and never through a symbolic link.
    """
    if os.fspath(out).strip() and Path(out).expanduser().is_symlink():
        target = os.path.realpath(Path(out).expanduser())
        raise AchillesError(f"--out {out} is a symbolic link (to {target}): name the real folder")
    raw = out
    out = Path(out).expanduser()
    if os.fspath(raw).strip() and out.is_dir() and any(out.iterdir()):  # refusals first: the probe writes
        if not force:
            raise AchillesError(f"--out {out} exists and is not empty: pass --force to replace it")
        if out.resolve() in (Path.cwd(), *Path.cwd().parents):
            raise AchillesError(f"--out {out} holds the current folder, which --force would delete: "
                                "name a new folder for the checkpoint")
        if not made_by(out, "export"):
            raise AchillesError(f"--out {out} was not written by `achilles export` (no {MARKER} marker): "
                                "--force replaces only an earlier export; remove it yourself or choose another --out")
    check_path(raw, "dir", flag="--out")


def model_card(result: ExportResult, source_name: str) -> str:
    """A short Markdown model card saying what was edited and how to load it."""
    units = "\n".join(f"| `{u.module}` | {u.layer} | {u.component} | {u.channel} |"
                      for u in result.units[:50])
    more = f"\n\n…and {len(result.units) - 50} more (see `{MASK_FILE}`)." if len(result.units) > 50 else ""
    mask = result.config.get("mask", {})
    return f"""---
base_model: {source_name}
tags:
- achilles
- ablation
---
# {source_name}, with {len(result.units)} unit(s) zeroed in the weights

This checkpoint is `{source_name}` with the units below **removed by editing the weights**
(achilles export): each unit's output channel is exactly 0 at every position, as when
achilles masks it with hooks. It is meant for evaluating the lesioned model in any engine
(transformers, vLLM, lm-evaluation-harness, a GGUF conversion); it is not a better model.

Mask: `{mask.get('file')}` ({mask.get('kind')}{', set ' + str(mask['set']) if mask.get('set') else ''}{', top ' + str(mask['top']) if mask.get('top') is not None else ''}).
{len(result.edits)} weight slice(s) edited; every other tensor is byte-identical to the source.
`{MASK_FILE}` lists the units, the edits and the environment.

| module | layer | component | channel |
|---|---|---|---|
{units}{more}

## Load

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{result.out.name}")
tokenizer = AutoTokenizer.from_pretrained("{result.out.name}")
```
"""


def _copy_side_files(source: Path, tmp: Path) -> None:
    # content only: the copies are new files, with the umask's permissions like the shards
    for p in source.iterdir():
        if p.name.startswith(".") or p.name in _SKIPPED or p.suffix in _WEIGHT_SUFFIXES:
            continue
        if p.is_file():
            shutil.copyfile(p, tmp / p.name)
    if (source / INDEX_FILE).is_file():
        shutil.copyfile(source / INDEX_FILE, tmp / INDEX_FILE)


def export_masked(
    model: torch.nn.Module,
    units: Sequence[Unit],
    spec: ModelSpec,
    out: str | Path,
    *,
    mask_source: dict[str, Any] | None = None,
    force: bool = False,
    progress: bool = False,
) -> ExportResult:
    """Write ``spec.model`` with ``units`` zeroed in its weights to the folder ``out``.

    Args:
        model: the model's skeleton (meta device is enough: only names and shapes are read).
        units: the units to zero (already checked against ``model``).
        spec: where the checkpoint is (a local folder or a hub id).
        out: destination folder; refused if it exists and is not empty, unless ``force``.
        mask_source: provenance of the mask (file, kind, set, top), kept in the outputs.
        progress: show a bar over the shards.
    """
    if not units:
        raise AchillesError("the mask is empty: there is nothing to export")
    out = Path(out)
    check_destination(out, force=force)
    check_apart([("--model", spec.model)], [("--out", out)], replaced=True)
    source = resolve_source(spec)
    check_apart([("the model's files", source), *(
        [("--mask", mask_source["file"])] if mask_source and mask_source.get("file") else [])],
        [("--out", out)], replaced=True)
    by_key, shards, weight_map = plan_export(model, units, source)
    result = ExportResult(
        out=out, shards=shards, edits=[e for es in by_key.values() for e in es], units=list(units),
        config={"model": dataclasses.asdict(spec), "mask": mask_source or {},
                "source_files": str(source)},
        env=environment(), run_id=run_id_of(mask_source),
    )
    parent = Path(os.path.realpath(out)).parent
    prefix = f".{out.name}.achilles-export-"
    for old in clean_stale(parent, prefix, "export"):
        logger.info("removed %s, left by an interrupted export", old)
    with temp_dir(parent, prefix, "export", out=str(out)) as tmp:
        for shard in tqdm(shards, desc="export shards", disable=not progress):
            with safe_open(str(source / shard), "pt") as f:
                metadata = f.metadata() or {"format": "pt"}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - one shard
            for key in tensors.keys() & by_key.keys():
                t = tensors[key]
                for e in by_key[key]:
                    t.narrow(e.dim, e.index, 1).fill_(e.value)
            # through the atomic writer for its permissions too: safetensors creates 0600 files
            with atomic_path(tmp / shard) as part:
                save_file(tensors, str(part), metadata=metadata)  # atomic: temp path
            del tensors
        _copy_side_files(source, tmp)
        write_json(tmp / MASK_FILE, result.to_dict())
        (tmp / "README.md").write_text(model_card(result, spec.model), encoding="utf-8")  # atomic: temp dir
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700
        replace_dir(tmp, out, "export")  # the old export is deleted only once the new is in
    logger.info("exported %d unit(s) (%d edits) to %s", len(units), len(result.edits), out)
    return result

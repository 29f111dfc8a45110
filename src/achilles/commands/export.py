"""``achilles export``: a Hugging Face checkpoint with a mask edited into its weights."""

from __future__ import annotations

import argparse
from pathlib import Path

from achilles.commands.common import add_weightless_common, model_spec, progress
from achilles.commands.ppl import add_mask_options, check_mask_args
from achilles.errors import AchillesError
from achilles.evaluation.masks import load_mask
from achilles.model.loading import inspect_model
from achilles.weights.export import MASK_FILE, check_destination, export_masked


def _run_export_gguf(args: argparse.Namespace) -> int:
    """``--format gguf``: the source GGUF with the mask edited into its bytes, same quantization."""
    from achilles.model.loading import LoadedModel
    from achilles.weights.gguf_export import (
        check_gguf_destination,
        export_gguf,
        gguf_skeleton,
        read_gguf,
    )

    spec = model_spec(args)
    if Path(spec.model).suffix != ".gguf" or not Path(spec.model).is_file():
        raise AchillesError(f"--format gguf edits a GGUF file: pass --model FILE.gguf, not {spec.model}")
    out = check_gguf_destination(spec.model, args.out, force=args.force)
    reader = read_gguf(spec.model)  # parsed once: a large vocabulary takes seconds
    skeleton = LoadedModel(gguf_skeleton(spec.model), None, spec)  # names and shapes only
    mask = load_mask(skeleton, args.mask, top=args.top, set_name=args.set_name)
    result = export_gguf(spec.model, mask.units, out, model=skeleton.model, reader=reader,
                         mask_source=mask.source, force=args.force, progress=progress(args))
    n_bytes = sum(e - s for rs in result.changed.values() for s, e in rs)
    print(f"exported {len(result.units)} unit(s) as {len(result.edits)} tensor edit(s), "
          f"{n_bytes} byte(s) rewritten in {len(result.changed)} tensor(s), same quantization\n"
          f"written: {out} (mask in its metadata key achilles.mask)")
    return 0


def _run_export(args: argparse.Namespace) -> int:
    spec = model_spec(args)
    out = Path(args.out)
    if args.mask is None:
        raise AchillesError("--mask is needed: an identification.json or a ranking.json (with --top N)")
    check_mask_args(args)
    if args.format == "gguf":
        return _run_export_gguf(args)
    if Path(spec.model).suffix == ".gguf":
        raise AchillesError(f"--model {spec.model} is a GGUF file: pass --format gguf to export "
                            "it as GGUF")
    check_destination(args.out, force=args.force)  # as given: an empty --out is not "."
    skeleton = inspect_model(spec)  # names and shapes only: the weights are streamed later
    mask = load_mask(skeleton, args.mask, top=args.top, set_name=args.set_name)
    result = export_masked(skeleton.model, mask.units, spec, out, mask_source=mask.source,
                           force=args.force, progress=progress(args))
    print(f"exported {len(result.units)} unit(s) as {len(result.edits)} weight edit(s) in "
          f"{len(result.shards)} shard(s)\nwritten: {out} (provenance: {out / MASK_FILE})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a checkpoint with the mask edited into its weights",
        description="Write a standard Hugging Face checkpoint (safetensors in the source dtype, "
        "config, tokenizer) in which the masked units are zeroed by exact weight edits, with a "
        "model card and achilles_mask.json. It loads with plain from_pretrained, so any engine "
        "can evaluate the lesioned model. The checkpoint is streamed shard by shard.",
    )
    add_weightless_common(p)  # the weights are streamed, never loaded as a model
    add_mask_options(p)
    p.add_argument("--format", choices=("hf", "gguf"), default="hf",
                   help="hf: a Hugging Face checkpoint folder; gguf: --model is a .gguf file and "
                   "--out a .gguf file in the same quantization, only the masked rows/columns' "
                   "bytes changed (default: %(default)s)")
    p.add_argument("--out", required=True, help="folder to write the checkpoint to (a .gguf file "
                   "with --format gguf)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder (a file "
                   "with --format gguf)")
    p.set_defaults(run=_run_export)

"""``achilles export``: a Hugging Face checkpoint with a mask edited into its weights."""

from __future__ import annotations

import argparse
from pathlib import Path

from achilles.commands.common import add_weightless_common, model_spec, progress
from achilles.commands.ppl import add_mask_options, check_mask_args
from achilles.errors import AchillesError
from achilles.evaluation.masks import load_mask
from achilles.weights.export import MASK_FILE, check_destination, export_masked
from achilles.model.loading import inspect_model


def _run_export(args: argparse.Namespace) -> int:
    spec = model_spec(args)
    out = Path(args.out)
    if args.mask is None:
        raise AchillesError("--mask is needed: an identification.json or a ranking.json (with --top N)")
    check_mask_args(args)
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
    p.add_argument("--out", required=True, help="folder to write the checkpoint to")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(run=_run_export)

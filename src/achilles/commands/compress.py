"""``achilles compress`` and ``achilles keep-list``: compression that spares the critical units."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from achilles.commands.common import (
    add_common,
    add_weightless_common,
    check_destination,
    model_spec,
    progress,
)
from achilles.commands.ppl import add_mask_options, check_mask_args
from achilles.config import add_arguments, from_args, parse_int
from achilles.errors import AchillesError
from achilles.evaluation.data import load_corpus
from achilles.evaluation.masks import load_mask
from achilles.evaluation.perplexity import PerplexityConfig, evaluator_from_config
from achilles.model.gguf_names import LLAMA_QUANTIZE_TYPES
from achilles.model.loading import MIN_TOKENS, context_length, inspect_model, load_model, tokenize
from achilles.model.names import model_name
from achilles.plots.compression import plot_compression
from achilles.report.compression import COMPRESSION_FIGURE, COMPRESSION_FILE, compression_rows
from achilles.results.files import atomic_write, write_json
from achilles.results.inputs import read_text_input
from achilles.results.provenance import environment
from achilles.results.schema import read_json
from achilles.weights.compress import DEFAULT_METHODS, compress_experiment, keep_list, parse_methods
from achilles.weights.compress.run import random_units

KEEP_LIST_FILE = "keep_list.json"


def _require_mask(args: argparse.Namespace) -> None:
    if args.mask is None:
        raise AchillesError("--mask is needed: an identification.json or a ranking.json (with --top N)")
    check_mask_args(args)


def _check_folder(folder: str | Path) -> Path:
    """Refuse a folder that is a file or cannot be written (a real probe), creating nothing."""
    return check_destination(folder, "dir", flag="--out-dir")


def _check_outputs(paths: list[Path], force: bool) -> None:
    for p in paths:
        if p.exists() and not force:
            raise AchillesError(f"{p} exists: pass --force to replace it (or another --out-dir)")


def _calibration_text(args: argparse.Namespace) -> str:
    if args.calib_file is not None:
        return read_text_input(args.calib_file, "--calib-file", "calibration file")
    text = (read_json(args.mask).get("config") or {}).get("text")
    if not text:
        raise AchillesError(f"{args.mask} records no text to calibrate Wanda on: pass --calib-file")
    return str(text)


def _run_compress(args: argparse.Namespace) -> int:
    methods = parse_methods(args.methods)
    if args.seeds < 1:
        raise AchillesError("--seeds must be >= 1 (the random-protection control)")
    cfg: PerplexityConfig = from_args(PerplexityConfig, args)
    spec = model_spec(args)
    _require_mask(args)
    out_dir = _check_folder(args.out_dir)  # as given: an empty --out-dir is not "."
    outputs = [out_dir / COMPRESSION_FILE, out_dir / COMPRESSION_FIGURE, out_dir / KEEP_LIST_FILE]
    _check_outputs(outputs, args.force)
    calib = _calibration_text(args) if any(m.needs_activations for m in methods) else None
    corpus = load_corpus(cfg.data, max_documents=cfg.max_samples)
    skeleton = inspect_model(spec)
    # checked against the weightless skeleton; the pool is names and widths, so it serves the
    # loaded model as it is (loading the mask again would repeat its checks and warnings)
    mask = load_mask(skeleton, args.mask, top=args.top, set_name=args.set_name)
    if not mask.units:
        raise AchillesError(f"{args.mask} holds no unit to protect (its {args.set_name} set is "
                            "empty): pass another --set, or a ranking with --top N")
    random_units(mask.pool, mask.units, 0)  # a random control can be drawn
    if calib is not None:
        n = int(tokenize(skeleton.tokenizer, calib, min_tokens=1).shape[1])
        if n < MIN_TOKENS:
            raise AchillesError(f"the calibration text is {n} token(s) long; Wanda needs at least "
                                f"{MIN_TOKENS}: give a longer --calib-file")
        limit = context_length(skeleton.model)
        if limit is not None and n > limit:
            raise AchillesError(f"the calibration text is {n} tokens, longer than the model's "
                                f"context of {limit}: give a shorter --calib-file")
    lm = load_model(spec, tokenizer=skeleton.tokenizer)
    ev = evaluator_from_config(lm.model, lm.tokenizer, corpus.documents, cfg, progress=progress(args))
    result = compress_experiment(
        lm.model, mask.pool, mask.units, ev, methods, seeds=args.seeds,
        calib_ids=None if calib is None else tokenize(lm.tokenizer, calib), progress=progress(args),
    )
    result.config = {
        "model": dataclasses.asdict(spec),
        "perplexity": {**dataclasses.asdict(cfg), **ev.settings()},
        "mask": {**mask.source, "n_units": len(mask.units)},
        "methods": [m.name for m in methods],
        "seeds": args.seeds,
        "calibration": None if calib is None else {"file": args.calib_file or args.mask,
                                                   "tokens": int(tokenize(lm.tokenizer, calib).shape[1])},
        "compressed": "every Linear/Conv1D weight of the decoder layers (not embeddings, not the LM head)",
    }
    result.env, result.run_id = environment(lm.model), mask.run_id
    kl = keep_list(lm.model, mask.units, run_id=mask.run_id)
    kl.update(config={"model": dataclasses.asdict(spec), "mask": mask.source}, env=result.env)
    plot_compression(result.to_dict(), outputs[1], title=f"{model_name(spec.model)}: compression with "
                     f"{len(mask.units)} critical unit(s) protected")
    write_json(outputs[2], kl)
    result.save(str(outputs[0]))  # last: the report's Compression section appears only when all is there
    base = result.baseline["log10_ppl"]
    lines = [f"original: log10 ppl {base:.4f}; Δ log10 ppl after compression:",
             "method | whole | critical protected | random protected (mean ± sd)"]
    lines += [" | ".join(row[:4]) for row in compression_rows(result.to_dict())]
    print("\n".join(lines) + f"\nwritten: {outputs[0]}, {outputs[1]}, {outputs[2]}")
    return 0


def tensor_types_file(out: Path) -> Path:
    """The llama-quantize overrides written next to the keep-list ``out``."""
    return out.with_name(f"{out.stem}.tensor-types.txt")


def _run_keep_list(args: argparse.Namespace) -> int:
    spec = model_spec(args)
    _require_mask(args)
    out = check_destination(args.out, "file", force=args.force, flag="--out")
    overrides = check_destination(tensor_types_file(out), "file", force=args.force, flag="--out")
    skeleton = inspect_model(spec)  # names and shapes are enough
    mask = load_mask(skeleton, args.mask, top=args.top, set_name=args.set_name)
    if not mask.units:
        raise AchillesError(f"{args.mask} gives no unit to keep (an empty {args.set_name} set, "
                            "or --top 0): pass another --set, or a ranking with --top N >= 1")
    kl = keep_list(skeleton.model, mask.units, gguf_type=args.gguf_type, run_id=mask.run_id)
    kl.update(config={"model": dataclasses.asdict(spec), "mask": mask.source}, env=environment())
    written = [out]
    if kl["llama_quantize"] is not None:  # one `--tensor-type PATTERN=TYPE` per line: $(cat FILE)
        lq = kl["llama_quantize"]["llama_quantize_args"]
        atomic_write(overrides, "".join(f"{a} {b}\n" for a, b in zip(lq[::2], lq[1::2], strict=True)))
        written.append(overrides)
    write_json(out, kl)
    print(f"{len(mask.units)} unit(s) in {len(kl['modules'])} module(s): "
          f"{', '.join(kl['modules'][:6])}{' ...' if len(kl['modules']) > 6 else ''}\n"
          f"written: {', '.join(map(str, written))}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compress",
        help="perplexity after quantization/pruning, with the critical units spared or not",
        description="Perplexity of the original model and, per method, of the model compressed "
        "whole, with the critical units' weights protected (source precision, never pruned), "
        "and with as many random units protected (the control, several seeds). Writes "
        "compression.json, compression.png and keep_list.json to --out-dir.",
    )
    add_common(p, text=False)
    add_arguments(p, PerplexityConfig)
    add_mask_options(p)
    g = p.add_argument_group("compression")
    g.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated: rtn-wB[-gG|-t] (B = 2..8 bits, G = group size, t = one "
                   "scale per matrix), magnitude-S, wanda-S (S = sparsity in percent) (default: %(default)s)")
    g.add_argument("--seeds", type=parse_int, default=3, help="random-protection draws (default: 3)")
    g.add_argument("--calib-file", default=None,
                   help="text to calibrate Wanda's activation norms on (default: the mask file's text)")
    p.add_argument("--out-dir", required=True, help="folder for compression.json/.png and keep_list.json")
    p.add_argument("--force", action="store_true", help="replace existing result files")
    p.set_defaults(run=_run_compress)

    k = sub.add_parser(
        "keep-list",
        help="the weights quantizers must keep in high precision (no weights loaded)",
        description="Write a JSON keep-list: per critical unit, the weight rows/columns that "
        "belong to it, and the module names for transformers' quantization configs "
        "(llm_int8_skip_modules, modules_to_not_convert). For Llama/Mistral/Qwen2/Qwen3 it also "
        "writes OUT-STEM.tensor-types.txt next to it: llama-quantize overrides, one "
        "`--tensor-type ^blk\\.N\\.NAME\\.weight$=TYPE` per line (use: llama-quantize "
        "$(cat FILE) in.gguf out.gguf Q4_K_M).",
    )
    add_weightless_common(k)
    add_mask_options(k)
    k.add_argument("--out", required=True, help="keep-list JSON to write")
    k.add_argument("--gguf-type", choices=LLAMA_QUANTIZE_TYPES, default="q8_0",
                   help="the type llama-quantize keeps the critical tensors at (default: %(default)s)")
    k.add_argument("--force", action="store_true", help="replace existing files")
    k.set_defaults(run=_run_keep_list)

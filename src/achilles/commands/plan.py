"""``achilles plan``: size a run (units, memory, GPUs, passes, time) from configs alone."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from tqdm.auto import tqdm

from achilles.config import ModelSpec, TextSpec, _parse_list, add_arguments, from_args
from achilles.errors import AchillesError
from achilles.model.names import format_count
from achilles.results.envelope import envelope, new_run_id
from achilles.results.files import _jsonable, check_destination, write_json
from achilles.scale.census.models import ModelEntry, read_model_list
from achilles.scale.plan import Plan, PlanConfig, format_bytes, plan_entry


def describe(p: Plan) -> str:
    """Human lines about one plan."""
    c = p.config
    s1, s2 = p.stage1, p.stage2
    per_kind = ", ".join(f"{k} {v:,}" for k, v in p.units_per_component.items())
    mem = ", ".join(f"{k} {format_bytes(v)}" for k, v in p.weight_bytes.items())
    gpu_line = _gpu_line(p)
    lines = [
        f"{p.model} ({p.model_type}): {p.params:,} parameters, {p.layers} layers",
        f"unit pool ({c['pool']}): {p.units:,} per token ({p.units * c['tokens']:,} over "
        f"T = {c['tokens']} tokens); {per_kind}",
        f"weights: {mem}",
        gpu_line,
        f"stage 1: {s1['passes_rows']} rows (K + 1) in {s1['forward_passes']} passes of "
        f"batch {s1['batch_size']}, {s1['flops']:.3g} FLOP, {s1['seconds']:.1f} s",
        f"stage 2: batch {s2['batch_size']}; linear ≤ {s2['rows']['linear']} rows "
        f"({s2['seconds']['linear']:.1f} s), bisect ≤ {s2['rows']['bisect']} rows, "
        f"minimise ≤ {s2['rows']['minimize']} rows for n* = {s2['assumed_n_star']} "
        f"({s2['seconds']['minimize']:.1f} s)",
        f"estimated time at {c['tflops']:g} TFLOP/s: {p.seconds:.1f} s (stage 1 + linear + minimise)",
    ]
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


def _gpu_line(p: Plan) -> str:
    """Where the memory goes on the fullest GPU, and whether the run fits (said, not implied)."""
    c = p.config
    sums = format_bytes(p.stage1_accumulator_bytes)
    if p.gpus is None:
        return (f"GPUs ({c['dtype']}): does NOT fit on GPUs of {c['gpu_memory']} (see the note): "
                f"stage-1 sums {sums} in all, {format_bytes(p.activation_bytes)} to run one row, "
                f"{format_bytes(p.fp32_check_bytes)} for the float32 re-check")
    total = p.gpu_load_bytes + p.activation_bytes + p.fp32_check_bytes
    verdict = "" if p.fits else f"; does NOT fit: only {c['gpus']} GPU(s) given"
    return (f"GPUs ({c['dtype']}): {p.gpus} × {c['gpu_memory']}{verdict}; fullest GPU "
            f"{format_bytes(p.gpu_load_bytes)} of weights and its share of the stage-1 sums "
            f"({sums} in all) + {format_bytes(p.activation_bytes)} to run one row + "
            f"{format_bytes(p.fp32_check_bytes)} for the float32 re-check = {format_bytes(total)} "
            f"of {format_bytes(c['gpu_bytes'])}")


def _run(args: argparse.Namespace) -> int:
    settings = from_args(PlanConfig, args)
    if (args.model is None) == (args.models is None):
        raise AchillesError("give exactly one of --model or --models")
    if args.select is not None and args.models is None:
        raise AchillesError("--select picks models of --models: give --models, or drop --select")
    out = Path(args.out) if args.out is not None else None
    if out is not None:  # as given: an empty --out is refused, not ignored; a folder is refused
        check_destination(args.out, "file")
    if args.models is not None:
        entries = read_model_list(args.models, sizing_only=True)  # plan runs no model code
        if args.select is not None:
            wanted = list(_parse_list(args.select))
            if not wanted:
                raise AchillesError(
                    f"--select {args.select!r} names no model: give names from {args.models}, "
                    f"e.g. --select {entries[0].name}"
                )
            unknown = [n for n in wanted if n not in {e.name for e in entries}]
            if unknown:
                raise AchillesError(
                    f"--select names {', '.join(unknown)}, not in {args.models}; its models are "
                    f"{', '.join(e.name for e in entries)}"
                )
            entries = [e for e in entries if e.name in wanted]
    else:
        entries = [ModelEntry(args.model, ModelSpec(model=args.model, revision=args.revision,
                                                    gguf_file=args.gguf_file))]
    quiet = args.quiet or args.json or len(entries) == 1
    spec = from_args(TextSpec, args)
    text = spec.resolve() if (spec.text, spec.text_file) != (None, None) else None
    shipped = [e.name for e in entries if e.shape is not None]
    if text is not None and shipped:
        raise AchillesError(
            f"{args.models} holds shipped shapes without tokenizers: give --tokens, not a text"
        )
    plans = [plan_entry(e, settings, text, truncate=spec.truncate)
             for e in tqdm(entries, desc="plan", disable=quiet)]
    rid = new_run_id()
    for p in plans:
        p.run_id = rid  # one plan command, one run
    payload = {
        **envelope("plans", config=dataclasses.asdict(settings), run_id=rid),
        "plans": [p.to_dict() for p in plans],
    }
    if out is not None:
        write_json(out, payload)
    if args.json:
        print(json.dumps(_jsonable(payload if len(plans) > 1 else plans[0].to_dict()), indent=1))
    elif len(plans) == 1:
        print(describe(plans[0]))
    else:
        print(table(plans))
        print(
            f"\nGPUs of {settings.gpu_memory}, {settings.dtype}, T = {settings.tokens}, "
            f"K = {settings.samples}, max {settings.max_neurons} prefixes; times at "
            f"{settings.tflops:g} TFLOP/s (stage 1 + linear search + minimise for "
            f"n* = {settings.assume_n_star})"
        )
        for p in plans:
            for n in p.notes:
                print(f"note: {p.model}: {n}")
    if out is not None:
        print(f"written: {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="size a run from the config alone: units, memory, GPUs, passes, time",
        description="From a model's config (no weights are loaded: seconds even for 72B), "
        "print the unit pool per component kind, the weight memory per dtype, the fewest GPUs "
        "that hold the model (accelerate's device map), the forward passes and FLOPs of both "
        "stages, the batch sizes achilles would choose and an estimated time. --models "
        "paper21 sizes the study's 21 models offline from shipped shapes.",
    )
    g = p.add_argument_group("models")
    g.add_argument("--model", help="local folder (config.json is enough), .gguf file, installed "
                   "model by name (smollm2) or hub id")
    g.add_argument("--gguf-file", help="a GGUF file inside the --model folder")
    g.add_argument("--models", help="file of model ids/paths, one per line, or 'paper21'")
    g.add_argument("--select", help="comma-separated names of --models to keep, e.g. "
                   "Meta-Llama-3-8B-Instruct,Llama-3.3-70B-Instruct")
    g.add_argument("--revision", help="hub revision of --model")
    add_arguments(p, PlanConfig)
    add_arguments(p, TextSpec)  # optional: T from the model's tokenizer instead of --tokens
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print the plan(s) as JSON")
    o.add_argument("--out", help="also write the plans to this JSON file")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    o.add_argument("--verbose", action="store_true", help="debug logging")
    p.set_defaults(run=_run)


def table(plans: list[Plan]) -> str:
    """A markdown table of plans, one row per model."""
    head = (
        "| model | params | layers | units/token | weights | GPUs | per GPU "
        "| stage 1 (rows, batch) | stage 2 linear (rows, batch) | est. time |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for p in plans:
        dtype = p.config["dtype"]
        gpus = "-" if p.gpus is None else str(p.gpus) + ("" if p.fits else " (no)")
        load = "-" if p.gpus is None else format_bytes(p.gpu_load_bytes)
        rows.append(
            f"| {p.model} | {format_count(p.params)} | {p.layers} | {p.units:,} | "
            f"{format_bytes(p.weight_bytes[dtype])} ({dtype}) | {gpus} | "
            f"{load} | "
            f"{p.stage1['passes_rows']}, {p.stage1['batch_size']} | "
            f"{p.stage2['rows']['linear']}, {p.stage2['batch_size']} | {_duration(p.seconds)} |"
        )
    return "\n".join(rows)


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"

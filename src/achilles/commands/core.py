"""``achilles rank``, ``achilles identify`` and ``achilles find``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from achilles.commands.common import (
    add_common,
    add_identify_options,
    add_rank_options,
    check_destination,
    claim_out_dir,
    identify_config,
    load_checked,
    model_spec,
    progress,
    rank_config,
    text_of,
    texts_of,
)
from achilles.method.identify import Identification
from achilles.method.pipeline import check_inputs, identify_with, prepare, rank
from achilles.method.ranking import Ranking
from achilles.results.runs import clear_other_runs

logger = logging.getLogger(__name__)


def summarize(ident: Identification, out: str | Path) -> str:
    """A few human lines about an identification result."""
    from achilles.model.gguf_source import describe_gguf

    gguf = describe_gguf(ident.env.get("gguf"))
    lines = [gguf] if gguf else []
    if ident.found:
        lines.append(
            f"critical set: n* = {ident.n_star} at ε = {ident.epsilon:g} "
            f"(Δ = {ident.delta_critical:.3f} orders of magnitude of perplexity)"
        )
        units = ", ".join(str(u) for u in ident.minimal_set[:10])
        more = " ..." if len(ident.minimal_set) > 10 else ""
        lines.append(
            f"minimal set:  {len(ident.minimal_set)} unit(s), Δ = {ident.delta_minimal:.3f}: {units}{more}"
        )
    else:
        last = ident.curve[-1] if ident.curve else None
        reach = f"; largest n tried {last['n']}, Δ = {last['delta']:.3f}" if last else ""
        lines.append(f"no critical set: Δ never reached ε = {ident.epsilon:g}{reach}")
    grid = ", ".join(f"ε={k}: {v if v is not None else '-'}" for k, v in ident.n_star_by_epsilon.items())
    lines.append(f"n*(ε): {grid}")
    lines.append(f"written: {out}")
    return "\n".join(lines)


def _run_rank(args: argparse.Namespace) -> int:
    from achilles.method.pipeline import rank_texts

    cfg = rank_config(args)
    spec = model_spec(args)
    texts = texts_of(args)
    out = check_destination(args.out, "file")
    lm, checked = load_checked(args, spec, texts[0], rank_config=cfg)
    first = prepare(lm, checked)
    rest = [  # every text checked before the weights load
        check_inputs(checked.skeleton, t, pool=checked.pool, truncate=bool(getattr(args, "truncate", False)))
        for t in texts[1:]
    ]
    runs = [first] + [prepare(lm, c, run_id=first.run_id) for c in rest]
    ranking, _ = rank_texts(lm, runs, cfg, progress=progress(args))
    ranking.save(out)
    top = ", ".join(f"{r.unit} ({r.score:.3g})" for r in ranking.neurons[:5])
    print(f"top units: {top}\nwritten: {out}")
    return 0


def _run_identify(args: argparse.Namespace) -> int:
    cfg = identify_config(args)
    spec = model_spec(args)
    text = text_of(args)
    out = check_destination(args.out, "file")
    ranking = Ranking.load(args.ranking)
    # the ranking enters from disk: its pool and weights are checked here, once
    lm, checked = load_checked(args, spec, text, ranking=ranking, force=args.force)
    run = prepare(lm, checked)
    ident = identify_with(  # saved before the fp32 re-check, and again with it
        lm, run, ranking, cfg, progress=progress(args), before_recheck=lambda r: r.save(out),
    )
    ident.save(out)
    print(summarize(ident, out))
    return 0


def _run_find(args: argparse.Namespace) -> int:
    rcfg = rank_config(args)
    icfg = identify_config(args, batch_size=getattr(args, "batch_size", None))
    spec = model_spec(args)
    text = text_of(args)
    out_dir = claim_out_dir(args, args.out_dir)
    lm, checked = load_checked(args, spec, text, rank_config=rcfg)
    run = prepare(lm, checked)  # tokens, pool, clean forward and environment: once
    clear_other_runs(out_dir, run.run_id)  # the run owns its folder
    # each result is saved as soon as it exists: a failing fp32 re-check loses nothing
    ranking, _ = rank(lm, run, rcfg, progress=progress(args))
    ranking.save(out_dir / "ranking.json")
    ident_path = out_dir / "identification.json"
    ident = identify_with(
        lm, run, ranking, icfg, progress=progress(args),
        before_recheck=lambda r: r.save(ident_path),
    )
    ident.save(ident_path)
    print(summarize(ident, out_dir))
    if args.explain and ident.found:
        from achilles.commands.explain import run_explain
        from achilles.explain import ExplainConfig

        for line in run_explain(out_dir, lm, ExplainConfig(), show_progress=progress(args),
                                report=False, prepared=run, ident=ident):
            print(line)
    if args.report:
        from achilles.analysis.run import analyze_for_report
        from achilles.report import write_report

        # identify already re-checked in fp32; the model analysis runs here, the report renders it
        analysis = analyze_for_report(out_dir, lm, prepared=run, results=(ranking, ident),
                                      fp32=False, progress=progress(args))
        files = write_report(out_dir, analysis)
        print(f"report: {files.html}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rank",
        help="stage 1: rank units by noise sensitivity",
        description="Stage 1: score every unit of the pool by the mean |a_clean - a_noisy| over "
        "K noisy copies of the input embeddings, and save the top units. With several "
        "--text-file, each unit's scores are summed over the texts.",
    )
    add_common(p, texts=True)
    add_rank_options(p)
    p.add_argument("--out", required=True, help="ranking JSON to write")
    p.set_defaults(run=_run_rank)

    p = sub.add_parser(
        "identify",
        help="stage 2: mask ranking prefixes until perplexity collapses",
        description="Stage 2: mask growing prefixes of a ranking, find the first n with "
        "Δ = log10(PPL_masked/PPL_clean) ≥ ε, then minimise that set.",
    )
    add_common(p)
    p.add_argument("--ranking", required=True, help="ranking JSON from `achilles rank`")
    add_identify_options(p)
    p.add_argument("--out", required=True, help="identification JSON to write")
    p.add_argument("--force", action="store_true",
                   help="apply a ranking made on another model of the same shapes (default: refused)")
    p.set_defaults(run=_run_identify)

    p = sub.add_parser(
        "find",
        help="both stages: ranking.json and identification.json in --out-dir",
        description="Run stage 1 and stage 2 on one text and write DIR/ranking.json and "
        "DIR/identification.json.",
    )
    add_common(p)
    add_rank_options(p)  # its --batch-size serves both stages
    add_identify_options(p, prefix_batch=False)
    p.add_argument("--out-dir", required=True, help="run folder to write")
    p.add_argument(
        "--report", action=argparse.BooleanOptionalAction, default=True,
        help="also write the analyses, figures and report.md/report.html (default: on)",
    )
    p.add_argument(
        "--explain", action=argparse.BooleanOptionalAction, default=True,
        help="also run `achilles explain` on the minimal set: mechanism.json (default: on)",
    )
    p.set_defaults(run=_run_find)

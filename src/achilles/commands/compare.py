"""``achilles compare``: perplexity vs n for several ranking methods (Figure 3)."""

from __future__ import annotations

import argparse
import logging

from achilles.commands.common import (
    add_common,
    add_deprecated_alias,
    add_rank_options,
    claim_out_dir,
    model_spec,
    progress,
    rank_config,
    text_of,
)
from achilles.config import _parse_list, add_arguments, from_args, parse_int
from achilles.errors import AchillesError
from achilles.evaluation.data import load_corpus
from achilles.evaluation.perplexity import PerplexityConfig, evaluator_from_config
from achilles.experiments.compare import RANDOM, compare, parse_levels
from achilles.method.pipeline import check_inputs, prepare
from achilles.method.ranking import METHODS
from achilles.model.loading import load_model
from achilles.plots.comparison import plot_comparison

logger = logging.getLogger(__name__)

DEFAULT_METHODS = "perturbation,activation,gradient,random"
DEFAULT_LEVELS = "1,2,3,5,10,20,50,100,1000"


def _run_compare(args: argparse.Namespace) -> int:
    rcfg = rank_config(args)
    if getattr(args, "data", None) is None:
        raise AchillesError("compare needs --data FILE (evaluation text: a local "
                            ".txt/.jsonl/.parquet file, or wikitext-103 or c4)")
    pcfg: PerplexityConfig = from_args(PerplexityConfig, args, batch_size=args.eval_batch_size)
    methods = list(dict.fromkeys(_parse_list(args.methods)))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise AchillesError(
            f"unknown ranking method(s) {', '.join(unknown)}: choose from {', '.join(sorted(METHODS))}"
        )
    if not methods:
        raise AchillesError("--methods is empty: name at least one ranking method")
    levels = parse_levels(args.levels)
    if args.random_runs < 1:
        raise AchillesError("--random-runs must be >= 1")
    spec = model_spec(args)
    text = text_of(args)
    out_dir = claim_out_dir(args, args.out_dir)
    corpus = load_corpus(pcfg.data, max_documents=pcfg.max_samples)
    lm = load_model(spec)
    # a short or too long ranking text is refused before any work; then prepared once
    checked = check_inputs(lm, text, rank_config=rcfg, truncate=bool(getattr(args, "truncate", False)))
    ev = evaluator_from_config(
        lm.model, lm.tokenizer, corpus.documents, pcfg, progress=False
    )
    result = compare(lm, prepare(lm, checked), rcfg, methods, levels, ev,
                     random_runs=args.random_runs, progress=progress(args))
    result.config["perplexity"] = {**result.config["perplexity"], "data": pcfg.data}
    result.save(str(out_dir / "comparison.json"))
    plot_comparison(result.to_dict(), out_dir / "comparison.png")
    lines = [f"unmasked perplexity {result.baseline['ppl']:.6g}"]
    for m, pts in result.methods.items():
        lines.append(f"{m:>14}: " + ", ".join(f"n={p['n']}: {p['ppl']:.4g}" for p in pts))
    if result.random:
        lines.append(f"{RANDOM:>14}: " + ", ".join(
            f"n={p['n']}: {p['ppl_mean']:.4g}±{p['ppl_sd']:.2g}" for p in result.random["levels"]))
    if result.skipped:
        lines.append("skipped: " + ", ".join(f"{s['method']}@{s['n']}" for s in result.skipped))
    lines.append(f"written: {out_dir / 'comparison.json'}, {out_dir / 'comparison.png'}")
    print("\n".join(lines))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="perplexity vs number of masked units for several ranking methods (Figure 3)",
        description="Rank the same unit pool with each method, mask each ranking's top-n at "
        "each level, and measure perplexity on --data with one shared evaluator; random is "
        "run --random-runs times (mean ± sd). Writes DIR/comparison.json and DIR/comparison.png.",
    )
    add_common(p)
    add_rank_options(p)
    g = p.add_argument_group("comparison")
    g.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated ranking methods (default: {DEFAULT_METHODS})")
    g.add_argument("--levels", default=DEFAULT_LEVELS,
                   help=f"numbers of top units to mask (default: {DEFAULT_LEVELS})")
    g.add_argument("--random-runs", type=parse_int, default=10,
                   help="random rankings per level, seeds --seed .. --seed+runs-1 (default: 10)")
    g.add_argument("--data", default=None,
                   help="evaluation text (required): a local .txt/.jsonl/.parquet file, or "
                   "wikitext-103 or c4")
    add_deprecated_alias(g, "--eval", "--data", "data")
    g.add_argument("--eval-batch-size", type=parse_int, default=4,
                   help="perplexity windows per forward pass (default: 4)")
    add_arguments(p, PerplexityConfig, exclude=("data", "batch_size"))
    p.add_argument("--out-dir", required=True, help="folder for comparison.json and comparison.png")
    p.set_defaults(run=_run_compare)

"""``achilles sweep``: rerun both stages over an (α, K) grid (paper Figure 4)."""

from __future__ import annotations

import argparse

from achilles.commands.common import (
    add_common,
    add_identify_options,
    claim_out_dir,
    fitted_text,
    identify_config,
    model_spec,
    progress,
    text_of,
)
from achilles.config import RankConfig, add_arguments, from_args, parse_int, parse_numbers
from achilles.experiments.sweep import SweepConfig, run_sweep
from achilles.method.pipeline import preflight
from achilles.method.ranking import METHODS
from achilles.model.loading import load_model


def _sweep_config(args: argparse.Namespace) -> SweepConfig:
    return SweepConfig(
        alphas=parse_numbers(args.alpha_grid, "--alpha", float),
        samples=parse_numbers(args.samples_grid, "--samples", int),
        grid=args.grid,
        anchor_alpha=args.anchor_alpha,
        anchor_samples=args.anchor_samples,
        top=args.top,
    )


def _run(args: argparse.Namespace) -> int:
    sweep = _sweep_config(args)
    rcfg = from_args(RankConfig, args, alpha=sweep.anchor_alpha, samples=sweep.anchor_samples)
    icfg = identify_config(args, batch_size=getattr(args, "batch_size", None))
    spec = model_spec(args)
    text = text_of(args)
    out_dir = claim_out_dir(args, args.out_dir)
    skeleton = preflight(spec, text=text, rank_config=rcfg)  # bad input fails before loading
    text = fitted_text(args, skeleton, text)
    lm = load_model(spec, tokenizer=skeleton.tokenizer)
    result = run_sweep(lm, text, rcfg, icfg, sweep, out_dir, progress=progress(args),
                       force=args.force)
    result.save(out_dir / "sweep.json")
    from achilles.plots.sweep import plot_sweep

    plot_sweep(result, out_dir / "sweep.png")
    print(result.summary())
    print(f"written: {out_dir / 'sweep.json'}, {out_dir / 'sweep.png'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    d = SweepConfig()
    p = sub.add_parser(
        "sweep",
        help="sensitivity of the critical set to α and K (Figure 4)",
        description="Rerun stage 1 + stage 2 over a grid of noise scales α and sample counts K "
        "on one text: by default the α grid at the anchor K and the K grid at the anchor α "
        "(--grid full: every pair). Each point is written to DIR/points/alpha=…_K=…/; finished "
        "points are reused when the command is rerun. DIR/sweep.json summarises n*(ε) per point "
        "and DIR/sweep.png plots it.",
    )
    add_common(p)
    add_arguments(p, RankConfig, exclude=("alpha", "samples"), choices={"method": sorted(METHODS)})
    add_identify_options(p, prefix_batch=False)  # RankConfig's --batch-size serves both stages
    g = p.add_argument_group("sweep")
    g.add_argument("--alpha", dest="alpha_grid", default=",".join(f"{a:g}" for a in d.alphas),
                   help="comma-separated α values (default: %(default)s)")
    g.add_argument("--samples", dest="samples_grid", default=",".join(map(str, d.samples)),
                   help="comma-separated K values (default: %(default)s)")
    g.add_argument("--grid", choices=["axes", "full"], default=d.grid,
                   help="axes: the α grid at the anchor K plus the K grid at the anchor α; "
                   "full: every (α, K) pair (default: %(default)s)")
    g.add_argument("--anchor-alpha", type=float, default=d.anchor_alpha,
                   help="α of the K sweep and of the reference point (default: %(default)s)")
    g.add_argument("--anchor-samples", type=parse_int, default=d.anchor_samples,
                   help="K of the α sweep and of the reference point (default: %(default)s)")
    g.add_argument("--top", type=parse_int, default=d.top,
                   help="top-ranked units compared with the reference point (default: %(default)s)")
    p.add_argument("--out-dir", required=True, help="sweep folder to write (reruns resume it)")
    p.add_argument("--force", action="store_true",
                   help="reuse finished points made with other settings (default: refused)")
    p.set_defaults(run=_run)

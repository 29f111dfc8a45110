"""``achilles robustness``: the critical set on several texts, compared pairwise."""

from __future__ import annotations

import argparse

from achilles.commands.common import (
    add_common,
    add_identify_options,
    add_rank_options,
    claim_out_dir,
    fitted_text,
    identify_config,
    model_spec,
    progress,
    rank_config,
)
from achilles.config import parse_int
from achilles.errors import require
from achilles.experiments.robustness import LabelledText, run_robustness, texts_from_files
from achilles.method.pipeline import preflight
from achilles.model.loading import load_model, tokenize


def _run(args: argparse.Namespace) -> int:
    texts = texts_from_files(args.text_files or [])
    require(args.top >= 1, "--top must be >= 1")
    rcfg = rank_config(args)
    icfg = identify_config(args, batch_size=getattr(args, "batch_size", None))
    spec = model_spec(args)
    out_dir = claim_out_dir(args, args.out_dir)
    skeleton = preflight(spec, rank_config=rcfg)  # bad input fails before loading
    texts = [LabelledText(t.label, fitted_text(args, skeleton, t.text)) for t in texts]
    for t in texts:
        tokenize(skeleton.tokenizer, t.text)
    lm = load_model(spec, tokenizer=skeleton.tokenizer)
    result = run_robustness(lm, texts, rcfg, icfg, out_dir, top=args.top, progress=progress(args),
                            force=args.force)
    result.save(out_dir / "robustness.json")
    from achilles.plots.robustness import plot_robustness

    plot_robustness(result, out_dir / "robustness.png")
    print(result.summary())
    print(f"written: {out_dir / 'robustness.json'}, {out_dir / 'robustness.png'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "robustness",
        help="compare the critical sets found on several texts",
        description="Run both stages on each --text-file (label = file stem; runs go to "
        "DIR/texts/<label>/) and report the pairwise Jaccard overlap of the minimal sets, the "
        "critical sets and the top-N rankings, by unit (module, channel). Writes "
        "DIR/robustness.json and the heatmaps DIR/robustness.png.",
    )
    add_common(p, text=False)
    p.add_argument("--text-file", dest="text_files", action="append", metavar="FILE",
                   help="an input text (UTF-8); repeat for each text, at least two")
    p.add_argument("--truncate", action="store_true",
                   help="cut a text longer than the model's context to fit, with a warning "
                   "(default: refuse it)")
    add_rank_options(p)  # its --batch-size serves both stages
    add_identify_options(p, prefix_batch=False)
    p.add_argument("--top", type=parse_int, default=100,
                   help="size of the top-of-ranking sets compared (default: %(default)s)")
    p.add_argument("--out-dir", required=True, help="folder to write (reruns reuse finished texts)")
    p.add_argument("--force", action="store_true",
                   help="reuse finished texts made with other settings (default: refused)")
    p.set_defaults(run=_run)

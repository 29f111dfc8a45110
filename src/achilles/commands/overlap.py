"""``achilles overlap``: compare two run folders (e.g. base vs fine-tuned) unit by unit."""

from __future__ import annotations

import argparse

from achilles.commands.common import check_destination
from achilles.config import parse_int
from achilles.experiments.overlap import compare_runs


def _run(args: argparse.Namespace) -> int:
    out = check_destination(args.out, "file") if args.out else None
    result = compare_runs(args.run_a, args.run_b, top=args.top)
    print(result.summary())
    if out is not None:
        result.save(out)
        print(f"written: {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "overlap",
        help="compare two run folders of one architecture",
        description="Compare two folders written by `achilles find` (e.g. a base and a "
        "fine-tuned checkpoint) by unit (layer, component, channel), so differently named "
        "checkpoints of one architecture compare: Jaccard of the minimal sets, critical sets "
        "and top-N rankings, the shared units, and the Spearman correlation of the shared "
        "units' ranks in the top-N. Runs of different architectures are refused.",
    )
    p.add_argument("run_a", metavar="RUN_A", help="first run folder (ranking.json, identification.json)")
    p.add_argument("run_b", metavar="RUN_B", help="second run folder")
    p.add_argument("--top", type=parse_int, default=100, help="size of the top-N rankings (default: %(default)s)")
    p.add_argument("--out", default=None, help="overlap JSON to write (default: print only)")
    p.add_argument("--quiet", action="store_true", help="warnings only")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    p.set_defaults(run=_run)

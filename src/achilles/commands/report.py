"""``achilles report``: analyses, figures and ``report.md`` / ``report.html`` for a run folder."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from achilles.commands.common import claim_out_dir
from achilles.config import ModelSpec, add_arguments, from_args, parse_int
from achilles.errors import AchillesError
from achilles.model.loading import load_model

logger = logging.getLogger(__name__)


def _recorded_model(run_dir: Path) -> str | None:
    """The model path or hub id the run recorded, when it can still be loaded from there."""
    from achilles.results.schema import read_json

    model = read_json(run_dir / "identification.json").get("config", {}).get("model", {}).get("model")
    if not isinstance(model, str):
        return None
    looks_local = model.startswith((".", "/", "~")) or Path(model).expanduser().exists()
    if looks_local and not Path(model).expanduser().exists():
        logger.warning("the run's model %s is gone: report without weights and controls "
                       "(give --model to recompute them)", model)
        return None
    logger.info("model: %s (recorded by the run)", model)
    return model


def _run_report(args: argparse.Namespace) -> int:
    from achilles.analysis.run import analyze_for_report, check_same_run, load_run
    from achilles.report import write_report

    run_dir = Path(args.run_dir)
    _check_run_model(args, run_dir)  # before RUN_DIR is claimed: a refusal leaves it untouched
    from achilles.report.build import check_run_inputs

    check_run_inputs(run_dir)  # a damaged mechanism/compression file: refused, no model loaded
    claim_out_dir(args, run_dir, flag="RUN_DIR")  # no second report or find writing into it

    for name in ("ranking.json", "identification.json"):
        if not (run_dir / name).is_file():
            raise AchillesError(f"{run_dir} has no {name}: point at a folder written by `achilles find`")
    check_same_run(*load_run(run_dir), run_dir)  # files of two runs mixed: refused, no model loaded
    lm = None
    if not args.no_model:
        model = args.model or _recorded_model(run_dir)
        if model is not None:
            lm = load_model(from_args(ModelSpec, args, model=model))
    analysis = analyze_for_report(  # the model analysis runs here; the report renders it
        run_dir, lm, top_n=args.top_n, seeds=args.seeds, tolerance=args.tolerance,
        fp32=args.fp32, progress=not args.quiet,
    )
    files = write_report(run_dir, analysis)
    print(f"written: {files.markdown}\nwritten: {files.html}\nwritten: {files.analysis}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="analyses, figures and report.md/report.html for a run folder",
        description="Analyse a run folder (layer distribution, phase transition; with the model "
        "also the weights behind the units and the controls: mean-ablation, random same-module "
        "sets, fp32 recheck) and write RUN_DIR/analysis.json, RUN_DIR/figures/*.png, "
        "RUN_DIR/report.md and a self-contained RUN_DIR/report.html.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="folder written by `achilles find`")
    p.add_argument("--model", default=None,
                   help="the run's model (folder or hub id) for the weights and controls "
                   "(default: the one the run recorded)")
    p.add_argument("--no-model", action="store_true",
                   help="do not load a model: keep the weights and controls of an existing "
                   "analysis.json")
    add_arguments(p, ModelSpec, exclude=("model",))
    g = p.add_argument_group("analysis")
    g.add_argument("--top-n", type=parse_int, default=100, help="ranking prefix for the layer figure (default: 100)")
    g.add_argument("--seeds", type=parse_int, default=10, help="random same-module sets (default: 10)")
    g.add_argument("--tolerance", type=float, default=0.1,
                   help="drop in Δ counted as non-monotone (default: 0.1)")
    g.add_argument("--fp32", action=argparse.BooleanOptionalAction, default=None,
                   help="recheck the final set in float32 (default: when the run used bf16/fp16)")
    g.add_argument("--force", action="store_true",
                   help="analyse with a --model other than the run's own (default: refused)")
    g.add_argument("--quiet", action="store_true", help="warnings only")
    g.add_argument("--verbose", action="store_true", help="debug logging")
    p.set_defaults(run=_run_report)


def _check_run_model(args: argparse.Namespace, run_dir: Path) -> None:
    """Refuse ``--model`` naming other weights than the run's, unless ``--force``."""
    if not getattr(args, "model", None) or not (run_dir / "identification.json").is_file():
        return
    from achilles.method.compat import check_same_model
    from achilles.results.schema import read_json

    ident = read_json(run_dir / "identification.json", kind="identification")
    check_same_model(
        ident.get("config") or {}, ident.get("env") or {}, from_args(ModelSpec, args),
        what="the run", force=args.force, hint="give the run's own --model",
    )

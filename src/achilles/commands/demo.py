"""``achilles demo``: the whole pipeline on a bundled model, in a few minutes on a laptop.

Runs ``find`` with the paper's defaults (α = 5, K = 100, ε = 1) on the bundled sink model
(or the natural one) and its demo text, then the baseline comparison on held-out text and the
report, and prints a short summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

from achilles.commands.common import check_writable, progress
from achilles.commands.core import summarize
from achilles.config import IdentifyConfig, ModelSpec, RankConfig
from achilles.errors import AchillesError
from achilles.loading import load_model
from achilles.pipeline import find

logger = logging.getLogger(__name__)

BUNDLED = ("sink", "natural")


def repo_root() -> Path:
    """The checkout this package runs from (``src/achilles/commands/demo.py`` -> root)."""
    return Path(__file__).resolve().parents[3]


def bundled_model(name: str) -> Path:
    """Path of a bundled model folder (``models/NAME``) in the checkout."""
    path = repo_root() / "models" / name
    if not (path / "config.json").is_file():
        raise AchillesError(
            f"bundled model {name!r} not found at {path}: run the demo from a checkout of "
            "achilles (models/ is not part of the installed package)"
        )
    return path


def bundled_data(name: str) -> Path:
    path = repo_root() / "data" / name
    if not path.is_file():
        raise AchillesError(f"bundled data file not found: {path} (run from a checkout)")
    return path


def run_demo(
    model: str, out_dir: Path, *, samples: int = 100, show_progress: bool = True, explain: bool = True
) -> int:
    path = bundled_model(model) if model in BUNDLED else Path(model)
    text = bundled_data("demo.txt").read_text(encoding="utf-8")
    heldout = bundled_data("heldout.txt")
    t0 = time.perf_counter()
    lm = load_model(ModelSpec(model=str(path), dtype="float32"))
    rcfg = RankConfig(samples=samples)
    icfg = IdentifyConfig()
    ranking, ident = find(lm, text, rcfg, icfg, progress=show_progress)
    ranking.save(out_dir / "ranking.json")
    ident.save(out_dir / "identification.json")
    t_find = time.perf_counter() - t0
    explained = []
    if explain and ident.found:
        from achilles.commands.explain import run_explain
        from achilles.explain import ExplainConfig

        explained = run_explain(out_dir, lm, ExplainConfig(), show_progress=show_progress, report=False)
    extra = _extras(lm, text, heldout, rcfg, out_dir, show_progress)
    print(f"model: {path}")
    print(summarize(ident, out_dir))
    print(f"find took {t_find:.1f} s; total {time.perf_counter() - t0:.1f} s")
    for line in explained + extra:
        print(line)
    return 0


DEMO_METHODS = ("perturbation", "activation", "gradient", "massive", "random")
DEMO_LEVELS = (1, 2, 3, 5, 10, 20, 50, 100)


def _extras(lm, text, heldout, rcfg, out_dir, show_progress) -> list[str]:  # noqa: ANN001
    """The baseline comparison on held-out text, then the analysis report."""
    from achilles.experiments.compare import compare
    from achilles.evaluation.data import load_corpus
    from achilles.evaluation.perplexity import PerplexityEvaluator
    from achilles.report import write_report

    corpus = load_corpus(str(heldout))
    ev = PerplexityEvaluator(
        lm.model, lm.tokenizer, corpus.documents, max_length=512, max_tokens=16384,
        batch_size=8, progress=False,
    )
    comparison = compare(
        lm, text, dataclasses.replace(rcfg, keep=max(DEMO_LEVELS)), DEMO_METHODS, DEMO_LEVELS,
        ev, random_runs=10, progress=show_progress,
    )
    comparison.save(out_dir / "comparison.json")
    from achilles.plots.comparison import plot_comparison

    plot_comparison(comparison.to_dict(), out_dir / "comparison.png")
    files = write_report(out_dir, lm)
    return [
        f"baselines (held-out perplexity vs n masked): {out_dir / 'comparison.png'}",
        f"report: {files.html}",
    ]


def _run(args: argparse.Namespace) -> int:
    out_dir = check_writable(Path(args.out_dir))
    return run_demo(
        args.model, out_dir, samples=args.samples, show_progress=progress(args), explain=args.explain
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on a bundled model",
        description="Run find (α=5, K=100, ε=1), the baseline comparison and the report on "
        "the bundled sink model (or --model natural) and print a summary.",
    )
    p.add_argument("--model", default="sink", help="sink (default), natural, or a model folder")
    p.add_argument("--out-dir", default="runs/demo", help="run folder (default: runs/demo)")
    p.add_argument("--samples", type=int, default=100, help="K noisy copies (default: 100)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--explain", action=argparse.BooleanOptionalAction, default=True,
                   help="explain the minimal set: mechanism.json + Mechanism section (default: on)")
    p.set_defaults(run=_run)

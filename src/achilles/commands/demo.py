"""``achilles demo``: the whole pipeline on a bundled model, in a few minutes on a laptop.

Runs ``find`` with the paper's defaults (α = 5, K = 100, ε = 1) on the bundled sink model
(or the natural one) and its demo text, then the baseline comparison on held-out text and the
report, and prints a short summary.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from achilles.commands.common import claim_out_dir, progress
from achilles.commands.core import summarize
from achilles.config import IdentifyConfig, ModelSpec, RankConfig
from achilles.errors import AchillesError
from achilles.model.loading import load_model
from achilles.method.pipeline import find, prepare

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
    run = prepare(lm, text, rank_config=rcfg)  # tokens, pool, clean forward, environment: once
    ranking, ident = find(lm, run, rcfg, icfg, progress=show_progress)
    ranking.save(out_dir / "ranking.json")
    ident.save(out_dir / "identification.json")
    t_find = time.perf_counter() - t0
    explained = []
    if explain and ident.found:
        from achilles.commands.explain import run_explain
        from achilles.explain import ExplainConfig

        explained = run_explain(out_dir, lm, ExplainConfig(), show_progress=show_progress,
                                report=False, prepared=run, ident=ident)
    t_explain = time.perf_counter() - t0 - t_find
    extra = _extras(lm, run, heldout, rcfg, out_dir, show_progress, ranking, ident)
    print(f"model: {path}")
    print(summarize(ident, out_dir))
    print(f"find took {t_find:.1f} s" + (f"; explain {t_explain:.1f} s" if explained else ""))
    for line in explained + extra:
        print(line)
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0


DEMO_METHODS = ("perturbation", "activation", "gradient", "massive", "random")
DEMO_LEVELS = (1, 3, 10, 30, 100)
DEMO_RANDOM_RUNS = 5
DEMO_HELDOUT_TOKENS = 4096
"""The demo's comparison: 5 levels, 5 random rankings, the first 4096 held-out tokens in the
bundled models' 256-token windows (46 evaluations of 4096 tokens, about a sixth of the full
comparison's cost); ``achilles compare`` runs the full one."""


def _extras(lm, run, heldout, rcfg, out_dir, show_progress, ranking, ident) -> list[str]:  # noqa: ANN001
    """The baseline comparison and the found set on held-out text, then the report."""
    from achilles.experiments.compare import compare
    from achilles.evaluation.data import load_corpus
    from achilles.evaluation.perplexity import PerplexityEvaluator
    from achilles.report import write_report

    corpus = load_corpus(str(heldout))
    ev = PerplexityEvaluator(
        lm.model, lm.tokenizer, corpus.documents, max_tokens=DEMO_HELDOUT_TOKENS,
        batch_size=8, progress=False,
    )
    t0 = time.perf_counter()
    comparison = compare(
        lm, run, dataclasses.replace(rcfg, keep=max(DEMO_LEVELS)), DEMO_METHODS, DEMO_LEVELS,
        ev, random_runs=DEMO_RANDOM_RUNS, progress=show_progress,
    )
    comparison.save(out_dir / "comparison.json")
    if ident.found:
        write_heldout(out_dir / "heldout.json", lm, ev, ranking, ident, str(heldout),
                      clean=comparison.baseline)
    from achilles.plots.comparison import plot_comparison

    plot_comparison(comparison.to_dict(), out_dir / "comparison.png")
    t_compare = time.perf_counter() - t0
    t0 = time.perf_counter()
    from achilles.analysis.run import analyze_for_report

    analysis = analyze_for_report(out_dir, lm, prepared=run, results=(ranking, ident),
                                  progress=show_progress)
    files = write_report(out_dir, analysis)
    t_report = time.perf_counter() - t0
    return [
        f"comparison and held-out check took {t_compare:.1f} s; analyses and report {t_report:.1f} s",
        f"baselines (held-out perplexity vs n masked): {out_dir / 'comparison.png'}",
        f"report: {files.html}",
    ]


def write_heldout(path, lm, ev, ranking, ident, data, *, clean=None) -> None:  # noqa: ANN001
    """``heldout.json``: perplexity of the evaluation data clean and with the final set masked."""
    from achilles.results.files import write_json
    from achilles.results.provenance import environment
    from achilles.results.schema import SCHEMA_VERSION
    from achilles.method.compat import pool_for_ranking

    which = "minimal" if ident.minimal_set else "critical"
    units = list(ident.minimal_set or ident.critical_set)
    masked = ev.evaluate(pool_for_ranking(lm, ranking), units)
    write_json(path, {
        "schema_version": SCHEMA_VERSION, "kind": "heldout",
        "config": {"data": data, "set": which, "n_units": len(units),
                   "model": dataclasses.asdict(lm.spec), "perplexity": ev.settings()},
        "clean": clean if clean is not None else ev.evaluate().summary(),
        "masked": masked.summary(),
        "env": environment(lm.model),
    })


def _run(args: argparse.Namespace) -> int:
    out_dir = claim_out_dir(args, args.out_dir)
    with _one_cpu_thread(args.model):
        return run_demo(args.model, out_dir, samples=args.samples, show_progress=progress(args),
                        explain=args.explain)


@contextlib.contextmanager
def _one_cpu_thread(model: str) -> Iterator[None]:
    """One torch thread for a bundled model on the CPU, unless ``OMP_NUM_THREADS`` says otherwise.

    The bundled models are 4 M parameters: their matmuls are too small to split, and on a
    2-core machine two threads took 77 s wall / 85 s CPU for the demo against 35 s / 33 s for
    one (docs/benchmarks.md). The results do not depend on the thread count.
    """
    import torch

    if model not in BUNDLED or "OMP_NUM_THREADS" in os.environ or torch.cuda.is_available():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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

"""``achilles demo``: the whole pipeline on a real model, in a few minutes on a laptop.

Runs ``find`` with the paper's defaults (α = 5, K = 100, ε = 1) on the demo text, by default
on SmolLM2-135M-Instruct (``--model smollm2``, the installed GGUF), or on a bundled model
whose truth is known (``sink``, ``natural``). On the bundled 4M-parameter models it then runs
the mechanism (``explain``), the baseline comparison on held-out text and the report; on the
real model it measures what fits in the time (:data:`DEMO_PLANS`) and prints what it skipped,
with the command that runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from achilles.commands.common import claim_out_dir, progress
from achilles.commands.core import summarize
from achilles.config import IdentifyConfig, ModelSpec, RankConfig, parse_int
from achilles.errors import AchillesError
from achilles.method.pipeline import find, prepare
from achilles.model.loading import load_model

logger = logging.getLogger(__name__)

BUNDLED = ("sink", "natural")


@dataclass(frozen=True)
class DemoPlan:
    """What the demo measures on a model (the rest is skipped, and said so)."""

    explain: bool
    compare: bool
    heldout_tokens: int
    prefix_batch: int | None = None
    """Masked prefixes per forward pass in stage 2 (None: from memory). The linear scan stops
    at the first pass whose curve reaches --curve-until; on SmolLM2 n = 1 already does, so a
    pass of 8 prefixes instead of 64 gives the same result for an eighth of the work."""


DEMO_PLANS: dict[str, DemoPlan] = {
    "bundled": DemoPlan(explain=True, compare=True, heldout_tokens=4096),
    # SmolLM2 is 135M parameters, 34x the bundled models: explain's activation patching
    # (2 + 2·30·(9 + 1) = 602 forward rows) and the comparison (46 held-out evaluations) take
    # several minutes each on 2 cores; find, the held-out check and the report fit in ~3.
    "real": DemoPlan(explain=False, compare=False, heldout_tokens=1024, prefix_batch=8),
}


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
    path = str(bundled_model(model)) if model in BUNDLED else model
    plan = DEMO_PLANS["bundled" if model in BUNDLED else "real"]
    text = bundled_data("demo.txt").read_text(encoding="utf-8")
    heldout = bundled_data("heldout.txt")
    t0 = time.perf_counter()
    lm = load_model(ModelSpec(model=path, dtype="float32"))
    t_load = time.perf_counter() - t0
    rcfg = RankConfig(samples=samples)
    icfg = IdentifyConfig(batch_size=plan.prefix_batch)
    run = prepare(lm, text, rank_config=rcfg)  # tokens, pool, clean forward, environment: once
    ranking, ident = find(lm, run, rcfg, icfg, progress=show_progress)
    ranking.save(out_dir / "ranking.json")
    ident.save(out_dir / "identification.json")
    t_find = time.perf_counter() - t0 - t_load
    explained = []
    if explain and plan.explain and ident.found:
        from achilles.commands.explain import run_explain
        from achilles.explain import ExplainConfig

        explained = run_explain(out_dir, lm, ExplainConfig(), show_progress=show_progress,
                                report=False, prepared=run, ident=ident)
    t_explain = time.perf_counter() - t0 - t_load - t_find
    extra = _extras(lm, run, heldout, rcfg, out_dir, show_progress, ranking, ident, plan)
    print(f"model: {path}")
    print(summarize(ident, out_dir))
    print(f"load took {t_load:.1f} s; find {t_find:.1f} s"
          + (f"; explain {t_explain:.1f} s" if explained else ""))
    for line in explained + extra + _skipped(model, plan, explain, out_dir):
        print(line)
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0


def _skipped(model: str, plan: DemoPlan, explain: bool, out_dir: Path) -> list[str]:
    """What the demo did not measure on this model, each with the command that does."""
    lines = []
    if explain and not plan.explain:
        lines.append(f"skipped: explain (activation patching of every head and MLP, minutes "
                     f"here): achilles explain {out_dir}")
    if not plan.compare:
        lines.append("skipped: the baseline comparison (46 held-out evaluations, minutes here): "
                     f"achilles compare --model {model} --text-file data/demo.txt --data "
                     "data/heldout.txt --out-dir runs/compare")
    return lines


DEMO_METHODS = ("perturbation", "activation", "gradient", "massive", "random")
DEMO_LEVELS = (1, 3, 10, 30, 100)
DEMO_RANDOM_RUNS = 5
DEMO_HELDOUT_TOKENS = 4096
"""The demo's comparison: 5 levels, 5 random rankings, the first 4096 held-out tokens in the
bundled models' 256-token windows (46 evaluations of 4096 tokens, about a sixth of the full
comparison's cost); ``achilles compare`` runs the full one."""


def _extras(lm, run, heldout, rcfg, out_dir, show_progress, ranking, ident, plan) -> list[str]:  # noqa: ANN001
    """The baseline comparison and the found set on held-out text, then the report."""
    from achilles.evaluation.data import load_corpus
    from achilles.evaluation.perplexity import PerplexityEvaluator
    from achilles.experiments.compare import compare
    from achilles.report import write_report

    corpus = load_corpus(str(heldout))
    ev = PerplexityEvaluator(
        lm.model, lm.tokenizer, corpus.documents, max_tokens=plan.heldout_tokens,
        batch_size=8, progress=False,
    )
    t0 = time.perf_counter()
    lines, comparison = [], None
    if plan.compare:
        comparison = compare(
            lm, run, dataclasses.replace(rcfg, keep=max(DEMO_LEVELS)), DEMO_METHODS, DEMO_LEVELS,
            ev, random_runs=DEMO_RANDOM_RUNS, progress=show_progress,
        )
        comparison.save(out_dir / "comparison.json")
        from achilles.plots.comparison import plot_comparison

        plot_comparison(comparison.to_dict(), out_dir / "comparison.png")
        lines.append(f"baselines (held-out perplexity vs n masked): {out_dir / 'comparison.png'}")
    if ident.found:
        held = write_heldout(out_dir / "heldout.json", lm, ev, ranking, ident, str(heldout),
                             clean=comparison.baseline if comparison is not None else None)
        lines.append(
            f"held-out check ({held['masked'].get('tokens', '?')} tokens of {heldout.name}): "
            f"perplexity {_ppl(held['clean'])} clean, {_ppl(held['masked'])} with the "
            f"{held['config']['set']} set masked"
        )
    t_compare = time.perf_counter() - t0
    t0 = time.perf_counter()
    from achilles.analysis.run import analyze_for_report

    analysis = analyze_for_report(out_dir, lm, prepared=run, results=(ranking, ident),
                                  progress=show_progress)
    files = write_report(out_dir, analysis)
    t_report = time.perf_counter() - t0
    what = "comparison and held-out check" if plan.compare else "held-out check"
    return [
        f"{what} took {t_compare:.1f} s; analyses and report {t_report:.1f} s",
        *lines,
        f"report: {files.html}",
    ]


def _ppl(summary: dict) -> str:
    from achilles.results.files import decode_float

    x = decode_float(summary.get("ppl"))
    return "?" if x is None else f"{x:.4g}"


def write_heldout(path, lm, ev, ranking, ident, data, *, clean=None) -> dict:  # noqa: ANN001
    """``heldout.json``: perplexity of the evaluation data clean and with the final set masked."""
    from achilles.method.compat import pool_for_ranking
    from achilles.results.envelope import envelope
    from achilles.results.files import write_json
    from achilles.results.provenance import environment

    which = "minimal" if ident.minimal_set else "critical"
    units = list(ident.minimal_set or ident.critical_set)
    masked = ev.evaluate(pool_for_ranking(lm, ranking), units)
    payload = {
        **envelope("heldout", config={"data": data, "set": which, "n_units": len(units),
                                      "model": dataclasses.asdict(lm.spec), "perplexity": ev.settings()},
                   env=environment(lm.model), run_id=ident.run_id),
        "clean": clean if clean is not None else ev.evaluate().summary(),
        "masked": masked.summary(),
    }
    write_json(path, payload)
    return payload


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
        help="run the whole pipeline on a real model (SmolLM2) or a bundled one",
        description="Run find (α=5, K=100, ε=1), a held-out check and the report on "
        "SmolLM2-135M-Instruct (or --model sink / natural, which add explain and the baseline "
        "comparison) and print a summary, with what was skipped.",
    )
    p.add_argument("--model", default="smollm2",
                   help="smollm2 (default: SmolLM2-135M-Instruct, installed by make setup), the "
                   "bundled sink or natural (models whose truth is known), or any --model of find")
    p.add_argument("--out-dir", default="runs/demo", help="run folder (default: runs/demo)")
    p.add_argument("--samples", type=parse_int, default=100, help="K noisy copies (default: 100)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--explain", action=argparse.BooleanOptionalAction, default=True,
                   help="explain the minimal set: mechanism.json + Mechanism section (default: on)")
    p.set_defaults(run=_run)

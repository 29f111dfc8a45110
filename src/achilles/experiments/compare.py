"""Compare ranking methods by the perplexity their top-n masks cause (the paper's Figure 3).

Every method ranks the **same** unit pool (the rank configuration with only ``method``
replaced), every mask is applied with the same operator (:func:`achilles.model.masking.masked`),
and every perplexity comes from **one** shared :class:`PerplexityEvaluator`, so the curves
differ only by which units each method puts first. ``random`` is run ``random_runs`` times
with seeds ``seed .. seed + runs - 1`` and reported as mean ± sample sd of perplexity.
Levels above a ranking's length (the pool size or ``--keep``) are skipped and reported.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from achilles.config import RankConfig, parse_numbers
from achilles.errors import AchillesError
from achilles.evaluation.perplexity import PerplexityEvaluator, PerplexityResult
from achilles.method.pipeline import PreparedRun, prepare, rank
from achilles.method.ranking import Ranking
from achilles.model.loading import LoadedModel
from achilles.model.units import UnitPool
from achilles.results.envelope import Enveloped

logger = logging.getLogger(__name__)

RANDOM = "random"


@dataclass
class Comparison(Enveloped):
    """Perplexity vs number of masked units, per ranking method (``comparison.json``)."""

    KIND = "comparison"

    levels: list[int]
    baseline: dict[str, Any]
    methods: dict[str, list[dict[str, Any]]]
    random: dict[str, Any] | None
    skipped: list[dict[str, Any]]
    pool: dict[str, Any]
    ranked: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Each method's top ``max(levels)`` units in rank order (random: in ``random.ranked``)."""

    def fields(self) -> dict[str, Any]:
        return {
            "pool": self.pool,
            "levels": self.levels,
            "baseline": self.baseline,
            "methods": self.methods,
            "random": self.random,
            "skipped": self.skipped,
            "ranked": self.ranked,
        }


def _point(n: int, r: PerplexityResult) -> dict[str, Any]:
    return {"n": n, "ppl": r.ppl, "log10_ppl": r.log10_ppl, "nll": r.nll,
            "nonfinite_windows": r.nonfinite_windows}


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    """Mean and sample sd; non-finite inputs make both non-finite (never dropped)."""
    if any(not math.isfinite(x) for x in xs):
        bad = math.nan if any(math.isnan(x) for x in xs) else math.inf
        return bad, math.nan
    if len(xs) == 1:
        return xs[0], 0.0
    return statistics.fmean(xs), statistics.stdev(xs)


def _top(ranking: Ranking, n: int) -> list[dict[str, Any]]:
    return [r.to_dict() for r in ranking.neurons[:n]]


def parse_levels(s: str) -> list[int]:
    """``"1,2,5,10"`` -> sorted unique positive ints."""
    levels = sorted(set(parse_numbers(s, "--levels", int)))
    if levels[0] < 1:
        raise AchillesError(f"--levels {s!r}: give positive integers, e.g. 1,2,5,10")
    return levels


def compare(
    lm: LoadedModel,
    text: str | PreparedRun,
    rank_config: RankConfig,
    methods: Sequence[str],
    levels: Sequence[int],
    evaluator: PerplexityEvaluator,
    *,
    random_runs: int = 10,
    progress: bool = False,
) -> Comparison:
    """Rank with each method, mask its top-n at each level, and measure perplexity.

    The text is prepared once (``text`` may be the prepared run): every method and seed
    ranks on the same token ids, pool and clean forward pass.
    """
    if not methods:
        raise AchillesError("--methods is empty: name at least one ranking method")
    if random_runs < 1:
        raise AchillesError("--random-runs must be >= 1")
    run = text if isinstance(text, PreparedRun) else prepare(lm, text, rank_config=rank_config)
    rankings: dict[str, list[Ranking]] = {}
    pools: list[UnitPool] = []
    for m in methods:
        seeds = (
            [rank_config.seed + k for k in range(random_runs)] if m == RANDOM else [rank_config.seed]
        )
        rankings[m] = []
        for s in seeds:
            logger.debug("ranking with %s (seed %d)", m, s)
            ranking, pool = rank(lm, run, dataclasses.replace(rank_config, method=m, seed=s),
                                 progress=progress)
            rankings[m].append(ranking)
            pools.append(pool)
    pool = pools[0]
    if any(p.fingerprint != pool.fingerprint for p in pools):  # pragma: no cover - invariant
        raise RuntimeError("ranking methods produced different unit pools")

    baseline = evaluator.evaluate()
    logger.info("baseline perplexity %.6g", baseline.ppl)
    todo = sum(
        len(runs) * sum(n <= len(runs[0].neurons) for n in levels) for runs in rankings.values()
    )
    bar = tqdm(total=todo, desc="compare: masked evaluations", disable=not progress)
    result_methods: dict[str, list[dict[str, Any]]] = {}
    random_block: dict[str, Any] | None = None
    skipped: list[dict[str, Any]] = []
    ranked: dict[str, list[dict[str, Any]]] = {}
    for m, runs in rankings.items():
        available = len(runs[0].neurons)
        points: list[dict[str, Any]] = []
        for n in levels:
            if n > available:
                why = (f"the pool has {pool.n_units} units" if n > pool.n_units
                       else f"only the top {available} units were kept (--keep)")
                skipped.append({"method": m, "n": n, "reason": why})
                continue
            per_run = []
            for r in runs:
                per_run.append(evaluator.evaluate(pool, r.units[:n]))
                bar.update()
            if m == RANDOM:
                ppls = [r.ppl for r in per_run]
                mean, sd = _mean_sd(ppls)
                lmean, lsd = _mean_sd([r.log10_ppl for r in per_run])
                points.append({
                    "n": n, "ppl_mean": mean, "ppl_sd": sd, "log10_ppl_mean": lmean,
                    "log10_ppl_sd": lsd, "ppl_runs": ppls,
                    "nonfinite_runs": sum(not r.finite for r in per_run),
                })
            else:
                points.append(_point(n, per_run[0]))
            logger.debug("%s n=%d: %s", m, n, points[-1].get("ppl", points[-1].get("ppl_mean")))
        if m == RANDOM:
            random_block = {
                "runs": len(runs), "seeds": [r.config["rank"]["seed"] for r in runs],
                "levels": points,
                "ranked": [_top(r, max(levels)) for r in runs],
            }
        else:
            result_methods[m] = points
            ranked[m] = _top(runs[0], max(levels))
    bar.close()
    if skipped:
        logger.warning("skipped levels: %s", ", ".join(f"{s['method']}@{s['n']}" for s in skipped))
    return Comparison(
        levels=list(levels),
        baseline=baseline.summary(),
        methods=result_methods,
        random=random_block,
        skipped=skipped,
        pool={**pool.summary()},
        ranked=ranked,
        config={
            "model": dataclasses.asdict(lm.spec),
            "text": run.text,
            "rank": dataclasses.asdict(rank_config),
            "methods": list(methods),
            "random_runs": random_runs,
            "perplexity": evaluator.settings(),
        },
        env=run.env, run_id=run.run_id,
    )

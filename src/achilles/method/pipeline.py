"""High-level library API: rank, identify and find, on a loaded model.

These functions attach the resolved configuration and the environment to their results;
the CLI is a thin shell over them.

Example::

    from achilles import ModelSpec, RankConfig, IdentifyConfig, load_model, find
    lm = load_model(ModelSpec(model="models/sink"))
    ranking, ident = find(lm, text, RankConfig(), IdentifyConfig())
    print(ident.n_star, [str(u) for u in ident.minimal_set])
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from achilles.config import IdentifyConfig, ModelSpec, RankConfig
from achilles.errors import AchillesError
from achilles.method.compat import (
    check_same_model,
    model_record,
    pool_for_ranking,
)
from achilles.method.identify import Identification, identify
from achilles.method.prepared import (
    PreparedRun,
    check_inputs,
    prepare,
)
from achilles.method.ranking import Ranking, get_method, rank_units
from achilles.method.recheck import fp32_check
from achilles.model.loading import LoadedModel, check_token_ids, inspect_model, tokenize
from achilles.model.units import UnitPool, build_pool

logger = logging.getLogger(__name__)

NONFINITE_REFUSE = 0.5
"""A ranking with more than this share of non-finite scores is refused, not saved."""


LONG_RUN_S = 600.0
"""Stage 1 estimated to take longer than this is announced with its estimate."""


def warn_if_long(what: str, passes: int, seconds_per_pass: float) -> None:
    """Warn with the estimated time when ``passes`` forward passes would take long.

    The estimate is one row per pass at the measured single-row time: an upper bound where
    batching helps (GPUs), about right on a CPU.
    """
    est = passes * seconds_per_pass
    if est > LONG_RUN_S:
        hours = est / 3600
        when = f"{hours:.1f} h" if hours >= 1 else f"{est / 60:.0f} min"
        logger.warning(
            "%s: %d forward passes at %.3g s each measured: about %s (up to); Ctrl-C stops it",
            what, passes, seconds_per_pass, when,
        )


def score_health(flat: torch.Tensor) -> dict[str, int]:
    """Counts of NaN, +inf and -inf among a pool's scores (``flat``, one per unit)."""
    return {
        "nan": int(torch.isnan(flat).sum()),
        "inf": int(torch.isposinf(flat).sum()),
        "-inf": int(torch.isneginf(flat).sum()),
        "n_units": int(flat.numel()),
    }


def _check_scores(health: dict[str, int], method: str) -> None:
    bad = health["nan"] + health["inf"] + health["-inf"]
    if not bad:
        return
    n = health["n_units"]
    msg = (
        f"{method}: {bad} of {n} unit scores are not finite (NaN {health['nan']}, "
        f"inf {health['inf']}, -inf {health['-inf']})"
    )
    if bad > NONFINITE_REFUSE * n:
        raise AchillesError(
            f"{msg}: the ranking would be mostly arbitrary; try --dtype float32 or a smaller --alpha"
        )
    logger.warning("%s; NaN scores are ranked last, counts are saved in the ranking", msg)


def _ranking(
    lm: LoadedModel, run: PreparedRun, scores: Any, config: RankConfig, tokens: int,
    text_config: dict[str, Any],
) -> Ranking:
    """Sort ``scores`` into a :class:`Ranking`, refusing (or counting) non-finite scores."""
    pool = run.pool
    health = score_health(scores.flat(pool))
    _check_scores(health, config.method)
    return Ranking(
        method=config.method,
        neurons=rank_units(scores, pool, config.keep),
        pool={**pool.summary(), "components": list(pool.components)},
        tokens=tokens,
        config={"model": model_record(lm), **text_config, "rank": dataclasses.asdict(config)},
        env=run.env,
        nonfinite=health,
        run_id=run.run_id,
    )


def _prepared(lm: LoadedModel, run: PreparedRun | str, config: RankConfig | None) -> PreparedRun:
    return run if isinstance(run, PreparedRun) else prepare(lm, run, rank_config=config)


def rank(
    lm: LoadedModel, run: PreparedRun | str, config: RankConfig, *, progress: bool = False
) -> tuple[Ranking, UnitPool]:
    """Stage 1 (or another ranking method): score every unit of the pool and sort them.

    ``run`` is the prepared run (:func:`prepare`; its text, token ids and pool are used as
    they are), or a text to prepare here with ``config``'s pool.
    """
    run = _prepared(lm, run, config)
    warn_if_long(f"stage 1 with --samples {config.samples}", config.samples, run.clean_seconds)
    method = get_method(config.method)
    torch.manual_seed(config.seed)
    scores = method(lm.model, run.input_ids, run.pool, config, progress=progress)
    return _ranking(lm, run, scores, config, run.tokens, {"text": run.text}), run.pool


def rank_texts(
    lm: LoadedModel, texts: Sequence[str | PreparedRun], config: RankConfig, *, progress: bool = False
) -> tuple[Ranking, UnitPool]:
    """One ranking pooled over several texts: each unit's scores summed over the texts.

    Every text is scored with the same method, seed and pool (as :func:`rank` would); a
    unit's pooled score is the sum of its per-text scores, so a unit that matters on every
    text outranks one that peaks on a single text. Pooled rankings carry no token position.
    """
    from achilles.method.ranking.base import Scores

    texts = list(texts)
    if len(texts) == 1:
        return rank(lm, texts[0], config, progress=progress)
    if not texts:
        raise AchillesError("give at least one text to rank on")
    first = _prepared(lm, texts[0], config)
    runs = [first] + [
        t if isinstance(t, PreparedRun) else prepare(lm, t, pool=first.pool, run_id=first.run_id)
        for t in texts[1:]
    ]
    method = get_method(config.method)
    total: dict[str, torch.Tensor] = {}
    for run in runs:
        torch.manual_seed(config.seed)
        scores = method(lm.model, run.input_ids, first.pool, config, progress=progress)
        for module, v in scores.values.items():
            v = v.float().cpu()
            total[module] = total[module] + v if module in total else v.clone()
    text_config = {"text": first.text, "texts": [r.text for r in runs],
                   "pooled": "sum of per-text scores"}
    tokens = sum(r.tokens for r in runs)
    return _ranking(lm, first, Scores(total), config, tokens, text_config), first.pool


def preflight(
    spec: ModelSpec,
    *,
    text: str | None = None,
    rank_config: RankConfig | None = None,
    ranking: Ranking | None = None,
    force: bool = False,
    truncate: bool | None = None,
) -> Any:
    """Validate inputs against the model's config and tokenizer before loading weights.

    Raises :class:`AchillesError` for a bad model path or id, a too-short text, an unknown or
    missing component, or a ranking made on another model (a ranking enters from disk:
    its pool and weights are checked here, once). Returns the weightless (meta-device)
    model with its tokenizer (pass ``.tokenizer`` on to ``load_model``); with ``truncate``
    given (``True`` or ``False``) and a text, the :class:`CheckedInputs` instead: the text
    fitted to the context, its token ids and the pool, for :func:`prepare`.
    """
    skeleton = inspect_model(spec)
    pool = None
    if ranking is not None:
        pool = pool_for_ranking(skeleton, ranking)
        check_same_model(ranking.config, ranking.env, spec, what="the ranking", force=force,
                         hint="rank this model first")
    if text is not None and truncate is not None:
        return check_inputs(skeleton, text, rank_config=rank_config, pool=pool, truncate=truncate)
    if text is not None:  # the context is the caller's (fit_text) to check
        check_token_ids(tokenize(skeleton.tokenizer, text), skeleton.model)
    if rank_config is not None:
        build_pool(skeleton.model, rank_config.pool, rank_config.components)
    return skeleton


def identify_with(
    lm: LoadedModel,
    run: PreparedRun | str,
    ranking: Ranking,
    config: IdentifyConfig,
    *,
    pool: UnitPool | None = None,
    force: bool = False,  # apply a ranking made on other weights of the same shapes
    progress: bool = False,
    before_recheck: Callable[[Identification], object] | None = None,
) -> Identification:
    """Stage 2 on the prepared run (or a text) over the prefixes of ``ranking``.

    A ranking of this very run (same ``run_id``) is used as it is. A ranking from elsewhere
    (a file) is checked once: its pool against the run's (by fingerprint) and, when ``run``
    is a text, its weights against the model (:func:`check_same_model`).

    ``before_recheck(result)`` is called with the complete result before the float32
    re-check runs (a command saves it there, so a failing re-check loses nothing); the
    re-check then fills ``result.fp32_check``.
    """
    if not isinstance(run, PreparedRun):
        pool = pool or pool_for_ranking(lm, ranking)
        check_same_model(ranking.config, ranking.env, lm.spec, what="the ranking", force=force,
                         hint="rank this model first")
        run = prepare(lm, run, pool=pool)
    units = ranking.units
    if ranking.run_id != run.run_id:  # entered from disk: its pool must be this run's
        fp = ranking.pool.get("fingerprint")
        if fp is not None and fp != run.pool.fingerprint:
            raise AchillesError(
                "the ranking's unit pool does not match this run's (another model, pool or "
                "components): rank this model first"
            )
        units = run.pool.validate(units)
    result = identify(lm.model, run.input_ids, run.pool, units, config, progress=progress,
                      clean_nll=run.clean_nll)
    result.config = {
        "model": model_record(lm),
        "text": run.text,
        "identify": dataclasses.asdict(config),
        "ranking": {"method": ranking.method, **ranking.config.get("rank", {})},
        "pool": ranking.pool,
    }
    result.env = run.env
    result.run_id = run.run_id
    result.ranking_run_id = ranking.run_id
    if before_recheck is not None:
        before_recheck(result)
    if config.fp32_check and lm.dtype != torch.float32:
        result.fp32_check = fp32_check(lm, run.text, run.pool, result, input_ids=run.input_ids)
    return result


def find(
    lm: LoadedModel,
    text: str | PreparedRun,
    rank_config: RankConfig,
    identify_config: IdentifyConfig,
    *,
    progress: bool = False,
) -> tuple[Ranking, Identification]:
    """Both stages on one text (prepared once): the ranking and the identified critical set."""
    run = _prepared(lm, text, rank_config)
    ranking, _ = rank(lm, run, rank_config, progress=progress)
    ident = identify_with(lm, run, ranking, identify_config, progress=progress)
    return ranking, ident

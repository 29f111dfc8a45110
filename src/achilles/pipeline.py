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
from collections.abc import Callable
from typing import Any

import torch

from achilles.config import IdentifyConfig, ModelSpec, RankConfig
from achilles.errors import AchillesError
from achilles.identify import Identification, identify
from achilles.io import environment
from achilles.loading import LoadedModel, inspect_model, load_model, tokenize
from achilles.ranking import Ranking, get_method, rank_units
from achilles.recheck import fp32_check
from achilles.units import UnitPool, build_pool

logger = logging.getLogger(__name__)


def _model_record(lm: LoadedModel) -> dict[str, Any]:
    return dataclasses.asdict(lm.spec)


def rank(
    lm: LoadedModel, text: str, config: RankConfig, *, progress: bool = False
) -> tuple[Ranking, UnitPool]:
    """Stage 1 (or another ranking method): score every unit of the pool and sort them."""
    pool = build_pool(lm.model, config.pool, config.components)
    input_ids = tokenize(lm.tokenizer, text)
    method = get_method(config.method)
    torch.manual_seed(config.seed)
    scores = method(lm.model, input_ids, pool, config, progress=progress)
    neurons = rank_units(scores, pool, config.keep)
    ranking = Ranking(
        method=config.method,
        neurons=neurons,
        pool={**pool.summary(), "components": list(pool.components)},
        tokens=int(input_ids.shape[1]),
        config={"model": _model_record(lm), "text": text, "rank": dataclasses.asdict(config)},
        env=environment(lm.model),
    )
    return ranking, pool


def rank_texts(
    lm: LoadedModel, texts: list[str], config: RankConfig, *, progress: bool = False
) -> tuple[Ranking, UnitPool]:
    """One ranking pooled over several texts: each unit's scores summed over the texts.

    Every text is scored with the same method, seed and pool (as :func:`rank` would); a
    unit's pooled score is the sum of its per-text scores, so a unit that matters on every
    text outranks one that peaks on a single text. Pooled rankings carry no token position.
    """
    from achilles.ranking.base import Scores

    texts = list(texts)
    if len(texts) == 1:
        return rank(lm, texts[0], config, progress=progress)
    if not texts:
        raise AchillesError("give at least one text to rank on")
    pool = build_pool(lm.model, config.pool, config.components)
    method = get_method(config.method)
    total: dict[str, torch.Tensor] = {}
    tokens = 0
    for text in texts:
        input_ids = tokenize(lm.tokenizer, text)
        tokens += int(input_ids.shape[1])
        torch.manual_seed(config.seed)
        scores = method(lm.model, input_ids, pool, config, progress=progress)
        for module, v in scores.values.items():
            v = v.float().cpu()
            total[module] = total[module] + v if module in total else v.clone()
    neurons = rank_units(Scores(total), pool, config.keep)
    ranking = Ranking(
        method=config.method,
        neurons=neurons,
        pool={**pool.summary(), "components": list(pool.components)},
        tokens=tokens,
        config={"model": _model_record(lm), "text": texts[0], "texts": texts,
                "pooled": "sum of per-text scores", "rank": dataclasses.asdict(config)},
        env=environment(lm.model),
    )
    return ranking, pool


def pool_for_ranking(lm: LoadedModel, ranking: Ranking) -> UnitPool:
    """Rebuild the unit pool a ranking was made over, checking it fits this model."""
    comps = ranking.pool.get("components")
    pool = build_pool(lm.model, components=comps) if comps else build_pool(lm.model)
    fp = ranking.pool.get("fingerprint")
    if fp is not None and fp != pool.fingerprint:
        made = ranking.config.get("model", {}).get("model", "another model")
        raise AchillesError(
            f"the ranking was made on {made!r} ({ranking.pool.get('model_type')}, "
            f"{ranking.pool.get('n_units')} units), which does not match this model "
            f"({pool.model_type}, {pool.n_units} units): rank this model first"
        )
    made = ranking.config.get("model", {}).get("model")
    if made is not None and made != lm.spec.model:
        logger.warning("ranking was made on %s; applying it to %s (same shapes)", made, lm.spec.model)
    return pool


def preflight(
    spec: ModelSpec,
    *,
    text: str | None = None,
    rank_config: RankConfig | None = None,
    ranking: Ranking | None = None,
) -> LoadedModel:
    """Validate inputs against the model's config and tokenizer before loading weights.

    Raises :class:`AchillesError` for a bad model path or id, a too-short text, an unknown or
    missing component, or a ranking made on another model. Returns the weightless
    (meta-device) model with its tokenizer; pass ``.tokenizer`` on to ``load_model``.
    """
    skeleton = inspect_model(spec)
    if text is not None:
        tokenize(skeleton.tokenizer, text)
    if rank_config is not None:
        build_pool(skeleton.model, rank_config.pool, rank_config.components)
    if ranking is not None:
        pool_for_ranking(skeleton, ranking)
    return skeleton


def identify_with(
    lm: LoadedModel,
    text: str,
    ranking: Ranking,
    config: IdentifyConfig,
    *,
    pool: UnitPool | None = None,
    progress: bool = False,
    before_recheck: Callable[[Identification], None] | None = None,
) -> Identification:
    """Stage 2 on ``text`` over the prefixes of ``ranking``.

    ``before_recheck(result)`` is called with the complete result before the float32
    re-check runs (a command saves it there, so a failing re-check loses nothing); the
    re-check then fills ``result.fp32_check``.
    """
    pool = pool or pool_for_ranking(lm, ranking)
    units = pool.validate(ranking.units)
    input_ids = tokenize(lm.tokenizer, text)
    result = identify(lm.model, input_ids, pool, units, config, progress=progress)
    result.config = {
        "model": _model_record(lm),
        "text": text,
        "identify": dataclasses.asdict(config),
        "ranking": {"method": ranking.method, **ranking.config.get("rank", {})},
        "pool": ranking.pool,
    }
    result.env = environment(lm.model)
    if before_recheck is not None:
        before_recheck(result)
    if config.fp32_check and lm.dtype != torch.float32:
        result.fp32_check = fp32_check(lm, text, pool, result)
    return result


def find(
    lm: LoadedModel,
    text: str,
    rank_config: RankConfig,
    identify_config: IdentifyConfig,
    *,
    progress: bool = False,
) -> tuple[Ranking, Identification]:
    """Both stages on one text: the ranking and the identified critical set."""
    ranking, pool = rank(lm, text, rank_config, progress=progress)
    ident = identify_with(lm, text, ranking, identify_config, pool=pool, progress=progress)
    return ranking, ident

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
from achilles.method.identify import Identification, identify
from achilles.method.ranking import Ranking, get_method, rank_units
from achilles.method.recheck import fp32_check
from achilles.model.loading import (
    LoadedModel,
    check_token_ids,
    context_length,
    inspect_model,
    load_model,
    tokenize,
)
from achilles.model.units import UnitPool, build_pool
from achilles.results.provenance import environment, weights_fingerprint

logger = logging.getLogger(__name__)


def _model_record(lm: LoadedModel) -> dict[str, Any]:
    return dataclasses.asdict(lm.spec)


NONFINITE_REFUSE = 0.5
"""A ranking with more than this share of non-finite scores is refused, not saved."""


@torch.no_grad()
def check_clean_forward(lm: LoadedModel, input_ids: torch.Tensor, pool: UnitPool) -> float:
    """Refuse a model whose clean (unmasked) forward pass on the text is not finite.

    Watches every site of ``pool`` and the NLL: a NaN or inf here means the weights are
    broken or overflow in this dtype, before any unit is masked, so no ranking or critical
    set measured on it would mean anything. A text longer than the model's context is
    refused too. Returns the seconds the clean forward pass took.
    """
    import math
    import time

    from achilles.method.metrics import sequence_nll
    from achilles.model.hooks import observed_io

    model = lm.model
    check_token_ids(input_ids, model)
    limit = context_length(model)
    if limit is not None and input_ids.shape[1] > limit:
        raise AchillesError(
            f"the text is {input_ids.shape[1]} tokens, longer than the model's context of {limit}: "
            "shorten it (or cut it with achilles.model.loading.fit_text / --truncate)"
        )
    bad: list[str] = []

    def watch(site: str):  # noqa: ANN202
        def fn(_x: torch.Tensor, out: torch.Tensor) -> None:
            if not bad and not bool(torch.isfinite(out).all()):
                bad.append(site)
        return fn

    sites = {s.module: s for s in pool.sites}
    start = time.perf_counter()
    with observed_io(model, {name: watch(name) for name in sites}):
        nll = float(sequence_nll(model, input_ids)[0])
    seconds = time.perf_counter() - start
    dtype = str(lm.dtype).removeprefix("torch.")
    if lm.dtype == torch.float32:
        why = "the model is broken (a NaN or inf in its weights?); check the checkpoint"
    else:
        alt = "--dtype float32 or --dtype bfloat16" if lm.dtype == torch.float16 else "--dtype float32"
        why = f"the model overflows in {dtype} or is broken; try {alt}"
    if bad:
        s = sites[bad[0]]
        raise AchillesError(
            f"the clean forward pass is not finite from layer {s.layer} ({s.component}) on "
            f"({dtype}), before any masking: {why}"
        )
    if not math.isfinite(nll):
        raise AchillesError(f"the clean NLL of the text is {nll} ({dtype}), before any masking: {why}")
    return seconds


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
    lm: LoadedModel, pool: UnitPool, scores: Any, config: RankConfig, tokens: int,
    text_config: dict[str, Any],
) -> Ranking:
    """Sort ``scores`` into a :class:`Ranking`, refusing (or counting) non-finite scores."""
    health = score_health(scores.flat(pool))
    _check_scores(health, config.method)
    return Ranking(
        method=config.method,
        neurons=rank_units(scores, pool, config.keep),
        pool={**pool.summary(), "components": list(pool.components)},
        tokens=tokens,
        config={"model": _model_record(lm), **text_config, "rank": dataclasses.asdict(config)},
        env=environment(lm.model),
        nonfinite=health,
    )


def rank(
    lm: LoadedModel, text: str, config: RankConfig, *, progress: bool = False
) -> tuple[Ranking, UnitPool]:
    """Stage 1 (or another ranking method): score every unit of the pool and sort them."""
    pool = build_pool(lm.model, config.pool, config.components)
    input_ids = tokenize(lm.tokenizer, text)
    seconds = check_clean_forward(lm, input_ids, pool)
    warn_if_long(f"stage 1 with --samples {config.samples}", config.samples, seconds)
    method = get_method(config.method)
    torch.manual_seed(config.seed)
    scores = method(lm.model, input_ids, pool, config, progress=progress)
    return _ranking(lm, pool, scores, config, int(input_ids.shape[1]), {"text": text}), pool


def rank_texts(
    lm: LoadedModel, texts: list[str], config: RankConfig, *, progress: bool = False
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
    pool = build_pool(lm.model, config.pool, config.components)
    method = get_method(config.method)
    total: dict[str, torch.Tensor] = {}
    tokens = 0
    for text in texts:
        input_ids = tokenize(lm.tokenizer, text)
        tokens += int(input_ids.shape[1])
        check_clean_forward(lm, input_ids, pool)
        torch.manual_seed(config.seed)
        scores = method(lm.model, input_ids, pool, config, progress=progress)
        for module, v in scores.values.items():
            v = v.float().cpu()
            total[module] = total[module] + v if module in total else v.clone()
    text_config = {"text": texts[0], "texts": texts, "pooled": "sum of per-text scores"}
    return _ranking(lm, pool, Scores(total), config, tokens, text_config), pool


def pool_for_ranking(lm: LoadedModel, ranking: Ranking) -> UnitPool:
    """Rebuild the unit pool a ranking was made over, checking it fits this model's shapes.

    Whether it was made on these weights is :func:`check_same_model`'s question.
    """
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
    return pool


def check_same_model(
    config: dict[str, Any], env: dict[str, Any], spec: ModelSpec, *, what: str, force: bool,
    hint: str,
) -> None:
    """Refuse (unless ``force``) a result made on other weights than ``spec``'s model.

    Weights are compared by fingerprint where both are known (so another spelling of the
    path, or a copy of the folder, matches), else by resolved path.
    """
    from pathlib import Path

    made = (config.get("model") or {}).get("model")
    local = Path(spec.model).expanduser()
    fp = weights_fingerprint(spec.model, None) if local.is_dir() else None
    got = _model_identity(made, env)
    want = _model_identity(spec.model, {"weights_fingerprint": fp})
    if _same_model(got, want) is False:
        refuse_mixed(
            f"{what} (on {made!r}, not {spec.model!r})", ["model (weights)"],
            force=force, hint=hint,
        )


def preflight(
    spec: ModelSpec,
    *,
    text: str | None = None,
    rank_config: RankConfig | None = None,
    ranking: Ranking | None = None,
    force: bool = False,
) -> LoadedModel:
    """Validate inputs against the model's config and tokenizer before loading weights.

    Raises :class:`AchillesError` for a bad model path or id, a too-short text, an unknown or
    missing component, or a ranking made on another model. Returns the weightless
    (meta-device) model with its tokenizer; pass ``.tokenizer`` on to ``load_model``.
    """
    skeleton = inspect_model(spec)
    if text is not None:
        check_token_ids(tokenize(skeleton.tokenizer, text), skeleton.model)
    if rank_config is not None:
        build_pool(skeleton.model, rank_config.pool, rank_config.components)
    if ranking is not None:
        pool_for_ranking(skeleton, ranking)
        check_same_model(ranking.config, ranking.env, spec, what="the ranking", force=force,
                         hint="rank this model first")
    return skeleton


def identify_with(
    lm: LoadedModel,
    text: str,
    ranking: Ranking,
    config: IdentifyConfig,
    *,
    pool: UnitPool | None = None,
    force: bool = False,  # apply a ranking made on other weights of the same shapes
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
    check_same_model(ranking.config, ranking.env, lm.spec, what="the ranking", force=force,
                     hint="rank this model first")
    input_ids = tokenize(lm.tokenizer, text)
    check_clean_forward(lm, input_ids, pool)
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


def _model_identity(name: str | None, env: dict[str, Any]) -> dict[str, str | None]:
    """A model's weights fingerprint (from ``env``) and its resolved path or hub id."""
    from pathlib import Path

    fp = env.get("weights_fingerprint")
    local = Path(name).expanduser() if name else None
    return {
        "weights": fp if isinstance(fp, str) and fp.startswith("sha256:") else None,
        "path": (str(local.resolve()) if local is not None and local.exists() else name),
    }


def _same_model(a: dict[str, str | None], b: dict[str, str | None]) -> bool | None:
    """Same weights where both fingerprints are known, else the same resolved path."""
    if a["weights"] and b["weights"]:
        return a["weights"] == b["weights"]
    if a["path"] and b["path"]:
        return a["path"] == b["path"]
    return None


def run_settings(config: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """The settings two results must share to be compared, mixed or reused for each other.

    Model identity (weights fingerprint, else resolved path), dtype, device type, device
    map, revision, unit pool and text; another spelling of the same model folder matches.
    """
    model = config.get("model") or {}
    device = env.get("device")
    return {
        "model": _model_identity(model.get("model"), env),
        "dtype": env.get("dtype"),
        "device": str(device).split(":")[0] if device else None,
        "device_map": model.get("device_map"),
        "revision": model.get("revision"),
        "pool": (config.get("pool") or {}).get("fingerprint"),
        "text": config.get("text"),
    }


def current_settings(lm: LoadedModel, text: str | None, pool: UnitPool | None) -> dict[str, Any]:
    """:func:`run_settings` of what ``lm`` would produce now on ``text`` over ``pool``."""
    config = {
        "model": _model_record(lm),
        "text": text,
        "pool": {"fingerprint": pool.fingerprint} if pool is not None else {},
    }
    return run_settings(config, environment(lm.model))


def settings_mismatch(
    got: dict[str, Any], want: dict[str, Any], *, keys: tuple[str, ...] | None = None
) -> list[str]:
    """The setting names where ``got`` and ``want`` differ (a ``None`` on either side is unknown)."""
    out = []
    for k in keys or tuple(want):
        a, b = got.get(k), want.get(k)
        if k == "model" and a is not None and b is not None:
            if _same_model(a, b) is False:
                out.append("model")
        elif a is not None and b is not None and a != b:
            out.append(k)
    return out


def refuse_mixed(what: str, diff: list[str], *, force: bool, hint: str) -> None:
    """Raise (or, with ``force``, warn) when results of different settings would be mixed."""
    if not diff:
        return
    msg = f"{what} was made with a different {', '.join(diff)}"
    if force:
        logger.warning("%s; using it anyway%s", msg, " (--force)" if hint else "")
        return
    raise AchillesError(f"{msg}: {hint}, or pass --force")

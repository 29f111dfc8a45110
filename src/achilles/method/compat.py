"""Compatibility of results that enter a run from disk: same model, same pool, same settings.

These checks run only where a ranking or identification is read from a file (``identify
--ranking``, ``--mask``, ``report``, ``explain``, a sweep's reused points): results made
within one prepared run are compatible by construction and are not re-checked.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from achilles.config import ModelSpec
from achilles.errors import AchillesError
from achilles.method.ranking import Ranking
from achilles.model.loading import LoadedModel
from achilles.model.units import UnitPool, build_pool
from achilles.results.provenance import environment, weights_fingerprint

logger = logging.getLogger(__name__)


def model_record(lm: LoadedModel) -> dict[str, Any]:
    """The model spec as recorded in a result's ``config.model``."""
    return dataclasses.asdict(lm.spec)


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


def _model_identity(name: str | None, env: dict[str, Any]) -> dict[str, str | None]:
    """A model's weights fingerprint (from ``env``) and its resolved path or hub id."""
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
        "model": model_record(lm),
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



def same_model_record(
    made: str | None, made_env: dict[str, Any], other: str | None, other_env: dict[str, Any]
) -> bool | None:
    """Whether two results' recorded models are the same weights (by fingerprint, else by
    resolved path; ``None`` when unknown), without loading either."""
    return _same_model(_model_identity(made, made_env), _model_identity(other, other_env))

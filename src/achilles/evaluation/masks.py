"""Masks from result files: ``identification.json`` sets and ``ranking.json`` prefixes.

The unit pool is rebuilt from the file's own configuration (the pool preset/components
its ranking used) and every unit is checked against this model, so a mask made on another
model fails with a clear message instead of masking the wrong channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from achilles.errors import AchillesError
from achilles.method.compat import check_same_model, pool_for_ranking
from achilles.method.identify import Identification
from achilles.method.ranking import Ranking
from achilles.model.loading import LoadedModel
from achilles.model.units import Unit, UnitPool, build_pool
from achilles.results.envelope import run_id_of
from achilles.results.schema import read_json

SetName = Literal["critical", "minimal"]


@dataclass(frozen=True)
class Mask:
    """Units to zero, their pool, and where they came from."""

    units: list[Unit]
    pool: UnitPool
    source: dict[str, Any]
    """The file, the set and the ``run_id`` of the run it came from (``None`` for a file made
    before run ids): results made with the mask belong to that run."""

    @property
    def run_id(self) -> str | None:
        """The run the results made with this mask belong to (``None``: matched by model)."""
        return run_id_of(self.source)


def load_mask(
    lm: LoadedModel, path: str, *, top: int | None = None, set_name: SetName = "minimal"
) -> Mask:
    """The mask in ``path``: an identification's ``set_name`` set, or a ranking's top ``top``."""
    kind = read_json(path).get("kind")
    if kind == "identification":
        ident = Identification.load(path)
        units = ident.minimal_set if set_name == "minimal" else ident.critical_set
        if top is not None:
            units = units[:top]
        rcfg = ident.config.get("ranking", {})
        comps = rcfg.get("components")
        try:
            pool = build_pool(lm.model, rcfg.get("pool") or "paper", comps or None)
        except AchillesError as e:
            raise AchillesError(f"{path}: its unit pool does not fit this model ({e})") from None
        made_on = (ident.config.get("pool") or {}).get("fingerprint")
        if made_on is not None and made_on != pool.fingerprint:
            made = ident.config.get("model", {}).get("model", "another model")
            raise AchillesError(
                f"{path} was made on {made!r}, whose unit pool does not match this model's "
                "(another architecture or size): identify this model first"
            )
        units = pool.validate(units, source=path)
        check_same_model(ident.config, ident.env, lm.spec, what=f"the identification {path}",
                         force=True, hint="")  # a mask from other weights: said, not refused
        source = {"file": str(path), "kind": kind, "set": set_name, "n_star": ident.n_star,
                  "epsilon": ident.epsilon, "run_id": ident.run_id}
    elif kind == "ranking":
        if top is None:
            raise AchillesError(f"{path} is a ranking: say how many top units to mask with --top N")
        ranking = Ranking.load(path)
        if top > len(ranking.neurons):
            raise AchillesError(
                f"--top {top} exceeds the {len(ranking.neurons)} units saved in {path} "
                "(rank again with a larger --keep)"
            )
        pool = pool_for_ranking(lm, ranking)
        check_same_model(ranking.config, ranking.env, lm.spec, what=f"the ranking {path}",
                         force=True, hint="")  # a mask from other weights: said, not refused
        units = pool.validate(ranking.units[:top], source=path)
        source = {"file": str(path), "kind": kind, "method": ranking.method, "run_id": ranking.run_id}
    else:
        raise AchillesError(
            f"{path} is a {kind!r} file: --mask takes an identification.json or a ranking.json"
        )
    if top is not None:
        source["top"] = top
    return Mask(units=list(units), pool=pool, source=source)

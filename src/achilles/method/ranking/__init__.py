"""Ranking methods, by name: the registry the CLI's ``--method`` choices come from.

Each entry is ``"module:function"`` imported lazily, so a method's dependencies load only
when it is chosen. A method's function has the signature
``fn(model, input_ids, pool, config: RankConfig, *, progress: bool) -> Scores``.
"""

from __future__ import annotations

import importlib

from achilles.method.ranking.base import RankedUnit, Ranking, Scores, rank_units

METHODS: dict[str, str] = {
    "perturbation": "achilles.method.ranking.perturbation:perturbation_scores",
    "activation": "achilles.method.ranking.activation:activation_scores",
    "gradient": "achilles.method.ranking.gradient:gradient_scores",
    "taylor": "achilles.method.ranking.gradient:taylor_scores",
    "wanda": "achilles.method.ranking.wanda:wanda_scores",
    "massive": "achilles.method.ranking.massive:massive_scores",
    "random": "achilles.method.ranking.random:random_scores",
}


def register_method(name: str, target: str) -> None:
    """Register ranking method ``name`` as ``"module:function"``."""
    METHODS[name] = target


def get_method(name: str):  # noqa: ANN201
    from achilles.errors import AchillesError

    target = METHODS.get(name)
    if target is None:
        raise AchillesError(f"unknown ranking method {name!r}: choose from {', '.join(METHODS)}")
    module, fn = target.split(":")
    return getattr(importlib.import_module(module), fn)


__all__ = ["METHODS", "Ranking", "RankedUnit", "Scores", "get_method", "rank_units", "register_method"]

"""Random ranking: a seeded uniform random order of the whole unit pool (a baseline).

A CPU ``torch.Generator`` seeded with ``config.seed`` draws a uniform random permutation
``π`` of the ``n`` units (``torch.randperm``); the unit drawn ``i``-th (0-based) scores
``(n - i) / n``, so the scores are distinct, in ``(0, 1]``, and sorting them recovers ``π``.
The same seed gives the same order on any device; different seeds give different orders.
Scores are float32, exact for pools up to 2**24 units (larger pools may get ties, which the
ranking breaks by pool order). No positions are reported and the model is not run.

Unlike the reference's random baseline (PAPER.md §5.1), the pool is the same one every other
method ranks: no ``lm_head`` rows, and activation and norm units included when selected.
"""

from __future__ import annotations

import logging

import torch

from achilles.config import RankConfig
from achilles.method.ranking.base import Scores
from achilles.model.units import UnitPool

logger = logging.getLogger(__name__)


def random_scores(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    pool: UnitPool,
    config: RankConfig,
    *,
    progress: bool = False,
) -> Scores:
    """Scores that rank ``pool`` in a uniform random order seeded by ``config.seed``.

    Args:
        model: unused.
        input_ids: unused.
        pool: the units to order.
        config: only ``seed`` is used.
        progress: unused.

    Returns:
        One float32 score per unit, distinct across the pool; no positions.
    """
    n = pool.n_units
    g = torch.Generator(device="cpu").manual_seed(config.seed)
    order = torch.randperm(n, generator=g)
    flat = torch.empty(n, dtype=torch.float32)
    flat[order] = torch.arange(n, 0, -1, dtype=torch.float32) / n
    widths = [s.width for s in pool.sites]
    values = dict(zip((s.module for s in pool.sites), flat.split(widths), strict=True))
    logger.debug("random: ordered %d units with seed %d", n, config.seed)
    return Scores(values)

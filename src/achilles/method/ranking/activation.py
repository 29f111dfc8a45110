"""Activation-magnitude ranking (the paper's "AM" baseline, fixed to rank by magnitude).

One clean forward pass of the decoder stack (no LM head). The score of unit ``c`` of a site
is ``|a[t, c]|``, the absolute value of the site's output at position ``t``, reduced over the
``T`` positions by ``config.reduce``: ``max_t`` (default) or ``mean_t``; the position kept is
the arg-max over ``t`` in both cases, as in stage 1.

The reference code sorted by the *signed* value, so large negative activations ranked last
(PAPER.md §7 item 12); this method uses the magnitude.
"""

from __future__ import annotations

import logging

import torch

from achilles.config import RankConfig
from achilles.method.ranking.base import Scores
from achilles.method.ranking.perturbation import decoder
from achilles.model.batching import input_device
from achilles.model.hooks import hooked
from achilles.model.units import UnitPool

logger = logging.getLogger(__name__)


@torch.no_grad()
def capture_outputs(
    model: torch.nn.Module, input_ids: torch.Tensor, pool: UnitPool
) -> dict[str, torch.Tensor]:
    """Float32 ``[T, C]`` output of every site of ``pool`` on one clean decoder pass."""
    input_ids = input_ids.to(input_device(model))
    acts: dict[str, torch.Tensor] = {}

    def keep(name: str):  # noqa: ANN202
        def fn(out: torch.Tensor) -> None:
            acts[name] = out[0].float()

        return fn

    with hooked(model, {s.module: keep(s.module) for s in pool.sites}):
        decoder(model)(input_ids=input_ids, use_cache=False)
    return acts


def activation_scores(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    pool: UnitPool,
    config: RankConfig,
    *,
    progress: bool = False,
) -> Scores:
    """Score each unit by ``|a|`` at each position, reduced over positions by ``config.reduce``.

    Args:
        model: a causal LM in eval mode (left unchanged).
        input_ids: token ids ``[1, T]``.
        pool: the units to score.
        config: only ``reduce`` is used.
        progress: unused (a single forward pass).

    Returns:
        One float32 score per unit, with the position of its largest ``|a|``.
    """
    acts = capture_outputs(model, input_ids, pool)
    logger.debug("activation: scoring %d units on %d tokens", pool.n_units, input_ids.shape[1])
    return Scores.from_positions(pool, config.reduce, lambda m: acts[m].abs())

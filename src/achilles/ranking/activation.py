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
from achilles.hooks import hooked
from achilles.ranking.base import Scores
from achilles.ranking.perturbation import decoder
from achilles.units import UnitPool

logger = logging.getLogger(__name__)


def reduce_positions(per_pos: torch.Tensor, reduce: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce ``[T, C]`` per-position scores to ``[C]`` as stage 1 does.

    Args:
        per_pos: float32 scores of each channel at each position.
        reduce: ``"max"`` (largest score over positions) or ``"mean"``.

    Returns:
        ``(values [C] float32, positions [C] long)``; the position is the arg-max over
        positions for both reductions, so reports can show where a unit peaked.
    """
    peak, pos = per_pos.max(0)
    if reduce == "max":
        return peak, pos
    if reduce == "mean":
        return per_pos.mean(0), pos
    raise ValueError(f"unknown reduce {reduce!r}: expected 'max' or 'mean'")


@torch.no_grad()
def capture_outputs(
    model: torch.nn.Module, input_ids: torch.Tensor, pool: UnitPool
) -> dict[str, torch.Tensor]:
    """Float32 ``[T, C]`` output of every site of ``pool`` on one clean decoder pass."""
    embed = model.get_input_embeddings()
    input_ids = input_ids.to(embed.weight.device)
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
    values: dict[str, torch.Tensor] = {}
    positions: dict[str, torch.Tensor] = {}
    for s in pool.sites:
        v, p = reduce_positions(acts[s.module].abs(), config.reduce)
        values[s.module], positions[s.module] = v, p
    logger.debug("activation: scored %d units on %d tokens", pool.n_units, input_ids.shape[1])
    return Scores(values, positions)

"""Massive-activation ranking (Sun et al. 2024, "Massive Activations in Large Language Models").

One clean forward pass of the decoder stack (no LM head). For each site, ``m`` is the median
of ``|a|`` over all of the site's channels and positions; unit ``c`` scores
``|a[t, c]| / m`` at position ``t``, reduced over positions by ``config.reduce`` (``max``
by default; arg-max position kept). Sun et al. call an activation massive when it is about
three orders of magnitude above the median, so a score of ~1000 flags one.

Comparing a critical set with the top of this ranking shows how much of it is just the
few massive channels (often on the first token).

If more than half of a site's outputs are exactly zero (a ReLU-like site), the median is 0;
the median of the non-zero ``|a|`` is used instead, and a site that is all zero scores 0.
"""

from __future__ import annotations

import logging

import torch

from achilles.config import RankConfig
from achilles.method.ranking.activation import capture_outputs
from achilles.method.ranking.base import Scores
from achilles.model.units import UnitPool

logger = logging.getLogger(__name__)


def median_magnitude(mag: torch.Tensor) -> torch.Tensor:
    """The median of ``mag`` (``|a|``), or of its non-zero entries when that median is 0.

    Returns 1 for an all-zero tensor, so its relative magnitudes stay 0 rather than NaN.
    """
    med = mag.median()
    if med > 0:
        return med
    nonzero = mag[mag > 0]
    return nonzero.median() if nonzero.numel() else torch.ones((), device=mag.device)


def massive_scores(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    pool: UnitPool,
    config: RankConfig,
    *,
    progress: bool = False,
) -> Scores:
    """Score each unit by ``|a| / median(|a| of its site)``, reduced over positions.

    Args:
        model: a causal LM in eval mode (left unchanged).
        input_ids: token ids ``[1, T]``.
        pool: the units to score.
        config: only ``reduce`` is used.
        progress: unused (a single forward pass).

    Returns:
        One float32 score per unit (how many site medians its magnitude is), with the
        position of its largest ``|a|``.
    """
    acts = capture_outputs(model, input_ids, pool)

    def relative(module: str) -> torch.Tensor:
        mag = acts.pop(module).abs_()  # [T, C]; pop: free each site once scored
        return mag / median_magnitude(mag)

    return Scores.from_positions(pool, config.reduce, relative)

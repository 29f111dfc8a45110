"""Gradient and Taylor (gradient × activation) rankings, on the live computation graph.

One forward pass of the whole model (LM head included) and one backward pass. ``L`` is the
LM loss on the text: the mean next-token NLL over the ``T - 1`` targets, from float32 logits.
For the output ``a`` ``[T, C]`` of each site:

* ``gradient``: ``|∂L/∂a[t, c]|``;
* ``taylor``: ``|a[t, c] · ∂L/∂a[t, c]|`` (first-order estimate of the loss change when the
  unit is zeroed at position ``t``);

each reduced over positions by ``config.reduce`` (``max`` or ``mean``, arg-max position kept).

``∂L/∂a`` is the *total* derivative through every path after the site (later modules of the
same block, the residual stream, later layers), taken with ``torch.autograd.grad`` on the
captured output tensors themselves. The reference code replaced every hooked output by a
detached leaf, which cut every path inside a block, so only ``o_proj``/``down_proj`` got
gradients and all of them got the same one (PAPER.md §5.1); here each site gets its own.

The model is left as it was: gradients flow from a leaf copy of the input embeddings, the
parameters' ``requires_grad`` flags are switched off for the pass (no weight gradients are
computed or stored) and restored afterwards, and no ``.grad`` is written anywhere. Dropout
follows the model's mode (eval after :func:`achilles.load_model`; the reference used train).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
import torch.nn.functional as F

from achilles.config import RankConfig
from achilles.method.ranking.base import Scores
from achilles.model.batching import input_device
from achilles.model.hooks import hooked
from achilles.model.units import UnitPool

logger = logging.getLogger(__name__)


@contextmanager
def _frozen_params(model: torch.nn.Module) -> Iterator[None]:
    """Turn ``requires_grad`` off on every parameter for the block, then restore each flag.

    Without weight gradients the forward pass saves fewer tensors, and nothing can leak into
    ``.grad``.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in trainable:
            p.requires_grad_(False)
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of ``input_ids [1, T]`` over its ``T - 1`` targets (float32 logits)."""
    lg = logits[0, :-1].float()  # [T-1, V]
    return F.cross_entropy(lg, input_ids[0, 1:].to(lg.device))


def activations_and_grads(
    model: torch.nn.Module, input_ids: torch.Tensor, pool: UnitPool
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Each site's output ``a`` and ``∂L/∂a``, both float32 ``[T, C]`` on the site's device.

    A site whose output does not reach the loss (never the case in a decoder) gets zeros.
    """
    embed = cast(Any, model).get_input_embeddings()
    input_ids = input_ids.to(input_device(model))
    live: dict[str, torch.Tensor] = {}

    def keep(name: str):  # noqa: ANN202
        def fn(out: torch.Tensor) -> None:
            live[name] = out  # the live tensor, still in the graph: gradients pass through it

        return fn

    with _frozen_params(model), torch.enable_grad():
        # A leaf the graph grows from, since the parameters no longer require grad.
        emb = embed(input_ids).detach().requires_grad_(True)
        with hooked(model, {s.module: keep(s.module) for s in pool.sites}):
            logits = model(inputs_embeds=emb, use_cache=False).logits
        loss = lm_loss(logits, input_ids)
        names = [s.module for s in pool.sites]
        grads = torch.autograd.grad(loss, [live[n] for n in names], allow_unused=True)
    acts = {n: live[n][0].detach().float() for n in names}
    out_grads = {
        n: (g[0].float() if g is not None else torch.zeros_like(acts[n]))
        for n, g in zip(names, grads, strict=True)
    }
    logger.debug("gradient: loss %.4f on %d targets", float(loss.detach()), input_ids.shape[1] - 1)
    return acts, out_grads


def gradient_scores(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    pool: UnitPool,
    config: RankConfig,
    *,
    progress: bool = False,
) -> Scores:
    """Score each unit by ``|∂L/∂a|`` per position, reduced over positions by ``config.reduce``.

    Args:
        model: a causal LM (left unchanged: parameters, flags and ``.grad``).
        input_ids: token ids ``[1, T]``.
        pool: the units to score.
        config: only ``reduce`` is used.
        progress: unused (one forward and one backward pass).

    Returns:
        One float32 score per unit, with the position of its largest ``|∂L/∂a|``.
    """
    _, grads = activations_and_grads(model, input_ids, pool)
    return Scores.from_positions(pool, config.reduce, lambda m: grads[m].abs())


def taylor_scores(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    pool: UnitPool,
    config: RankConfig,
    *,
    progress: bool = False,
) -> Scores:
    """Score each unit by ``|a · ∂L/∂a|`` per position, reduced over positions.

    Args:
        model: a causal LM (left unchanged: parameters, flags and ``.grad``).
        input_ids: token ids ``[1, T]``.
        pool: the units to score.
        config: only ``reduce`` is used.
        progress: unused (one forward and one backward pass).

    Returns:
        One float32 score per unit, with the position of its largest ``|a · ∂L/∂a|``.
    """
    acts, grads = activations_and_grads(model, input_ids, pool)
    return Scores.from_positions(pool, config.reduce, lambda m: (acts[m] * grads[m]).abs())

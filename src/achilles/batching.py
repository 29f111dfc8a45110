"""Batch sizes from available memory, and halving on out-of-memory errors.

Stage 1 runs K noisy copies and stage 2 runs many masked copies of the same text; both are
batched along the batch axis. The batch size starts from an estimate of the activation memory
one row needs against the memory free on the device, and halves when a forward pass still
runs out of memory (``accelerate.utils.find_executable_batch_size`` does the same for a
function; here the work list must resume where it failed, so the loop is explicit).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")

CPU_TOKENS_PER_BATCH = 4096
"""On CPU, rows per batch are chosen so that a batch holds about this many tokens."""


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def row_bytes_estimate(model: torch.nn.Module, tokens: int, widest_site: int) -> int:
    """Rough activation bytes one row of ``tokens`` tokens needs in a forward pass.

    Counts a handful of live ``[T, hidden]`` and ``[T, intermediate]`` tensors in the model
    dtype, the float32 temporaries a scoring hook makes of its widest site, the attention
    scores of one layer, and the float32 logits when a head is run.
    """
    cfg = model.config
    get = lambda *names: next((getattr(cfg, n) for n in names if getattr(cfg, n, None)), 0)  # noqa: E731
    hidden = get("hidden_size", "n_embd")
    inter = get("intermediate_size", "n_inner") or 4 * hidden
    heads = get("num_attention_heads", "n_head") or 1
    vocab = get("vocab_size")
    elt = next(model.parameters()).element_size()
    per_token = elt * (8 * hidden + 3 * inter) + 4 * 3 * widest_site + 4 * 2 * vocab
    return int(tokens * per_token + elt * heads * tokens * tokens)


def choose_batch_size(
    model: torch.nn.Module, tokens: int, rows: int, widest_site: int, requested: int | None = None
) -> int:
    """Rows per forward pass: ``requested`` if given, else an estimate from free memory."""
    if requested is not None:
        return max(1, min(requested, rows))
    device = next(model.parameters()).device
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        per_row = row_bytes_estimate(model, tokens, widest_site)
        b = int(0.7 * free // max(per_row, 1))
    else:
        b = CPU_TOKENS_PER_BATCH // max(tokens, 1)
    return max(1, min(b, rows))


def run_batched(
    items: Sequence[T],
    fn: Callable[[Sequence[T]], None],
    batch_size: int,
    *,
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Call ``fn`` on consecutive slices of ``items``; halve the slice on out-of-memory.

    ``fn`` must leave no partial effect when it raises (stage 1 stages each batch's sums
    and commits them only after the forward pass succeeds). Returns the final batch size.
    """
    i = 0
    while i < len(items):
        chunk = items[i : i + batch_size]
        try:
            fn(chunk)
        except Exception as e:  # noqa: BLE001 - re-raised unless it is an OOM
            if not _is_oom(e) or batch_size == 1:
                raise
            batch_size = max(1, batch_size // 2)
            logger.warning("out of memory; retrying with batch size %d", batch_size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        i += len(chunk)
        if on_progress is not None:
            on_progress(len(chunk))
    return batch_size

"""Batch sizes from available memory, and halving on out-of-memory errors.

Stage 1 runs K noisy copies and stage 2 runs many masked copies of the same text; both are
batched along the batch axis. The batch size starts from an estimate of the activation memory
one row needs against the memory free on the device, and halves when a forward pass still
runs out of memory (``accelerate.utils.find_executable_batch_size`` does the same for a
function; here the work list must resume where it failed, so the loop is explicit).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar, cast

import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")

CPU_TOKENS_PER_BATCH = 4096
"""On CPU, rows per batch are chosen so that a batch holds about this many tokens."""


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` is an accelerator out-of-memory error."""
    if isinstance(e, torch.cuda.OutOfMemoryError):  # also spelled torch.OutOfMemoryError (2.5+)
        return True
    msg = str(e).lower()  # also the CPU allocator's: MemoryError, "can't allocate memory"
    return isinstance(e, MemoryError) or isinstance(e, RuntimeError) and (
        "out of memory" in msg or "can't allocate memory" in msg
    )


_is_oom = is_oom


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a batch of token ids or input embeddings must go: the embedding's device.

    Under an accelerate ``device_map`` with offloading, the embedding weight may sit on the
    ``meta`` device; its ``AlignDevicesHook`` then names the device it executes on.
    """
    embed = cast(Any, model).get_input_embeddings()
    device = embed.weight.device
    if device.type == "meta":
        hook = getattr(embed, "_hf_hook", None)
        execution = getattr(hook, "execution_device", None)
        if execution is not None:
            return torch.device(execution)
    return device


@contextmanager
def weights_on_device(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run the block with ``module``'s own parameters readable (not on ``meta``).

    Under accelerate offloading (``cpu_offload``, a ``device_map`` with ``"cpu"``/``"disk"``)
    a module's weights sit on ``meta`` outside its forward; this moves them to its execution
    device for the block (``accelerate.utils.align_module_device``) and back afterwards.
    A plain module is left as it is.
    """
    from accelerate.utils import align_module_device

    with align_module_device(module):
        yield module


def model_devices(model: torch.nn.Module) -> list[torch.device]:
    """The devices holding the model's parameters (``meta``, i.e. offloaded, left out)."""
    return sorted({p.device for p in model.parameters() if p.device.type != "meta"}, key=str)


def free_cuda_bytes(device: torch.device) -> int:
    """Bytes a new allocation can use on ``device``: free on the driver plus cached-unused."""
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


LOGIT_CHUNK = 8
"""Rows whose logits :func:`achilles.method.metrics.sequence_nll` materialises at once."""


def head_bytes(model: torch.nn.Module, tokens: int) -> int:
    """Bytes of one chunk of logits: ``LOGIT_CHUNK`` rows in the model dtype, their float32
    copy and the log-softmax's float32 output. Fixed per pass, whatever the batch size."""
    vocab = getattr(model.config, "vocab_size", 0) or 0
    elt = next(model.parameters()).element_size()
    return LOGIT_CHUNK * tokens * vocab * (elt + 4 + 4)


def row_bytes_estimate(
    model: torch.nn.Module, tokens: int, widest_site: int, *, logits: bool = True
) -> int:
    """Rough activation bytes one row of ``tokens`` tokens needs in a forward pass.

    Counts a handful of live ``[T, hidden]`` and ``[T, intermediate]`` tensors in the model
    dtype, the float32 temporaries a scoring hook makes of its widest site, the attention
    scores of one layer, and (``logits=True``) the float32 logits of a whole-batch LM head.
    :func:`choose_batch_size` counts the chunked head of ``sequence_nll`` instead.
    """
    cfg = model.config
    get = lambda *names: next((getattr(cfg, n) for n in names if getattr(cfg, n, None)), 0)  # noqa: E731
    hidden = get("hidden_size", "n_embd")
    inter = get("intermediate_size", "n_inner") or 4 * hidden
    heads = get("num_attention_heads", "n_head") or 1
    vocab = get("vocab_size") if logits else 0
    elt = next(model.parameters()).element_size()
    per_token = elt * (8 * hidden + 3 * inter) + 4 * 3 * widest_site + 4 * 2 * vocab
    return int(tokens * per_token + elt * heads * tokens * tokens)


def choose_batch_size(
    model: torch.nn.Module,
    tokens: int,
    rows: int,
    widest_site: int,
    requested: int | None = None,
    *,
    logits: bool = True,
) -> int:
    """Rows per forward pass: ``requested`` if given, else an estimate from free memory.

    On CUDA the estimate uses the *least* free memory over the GPUs holding the model (with
    a ``device_map`` every GPU runs its layers on the whole batch); the memory already held
    by the caller (stage 1's accumulators, say) is not free and so is accounted for.
    """
    if requested is not None:
        return max(1, min(requested, rows))
    cuda = [d for d in model_devices(model) if d.type == "cuda"]
    if cuda:
        free = min(free_cuda_bytes(d) for d in cuda)
        return batch_size_for_memory(model, free, tokens, rows, widest_site, logits=logits)
    b = CPU_TOKENS_PER_BATCH // max(tokens, 1)
    return max(1, min(b, rows))


def batch_size_for_memory(
    model: torch.nn.Module,
    free_bytes: int,
    tokens: int,
    rows: int,
    widest_site: int,
    *,
    logits: bool = True,
) -> int:
    """Rows per forward pass on a GPU with ``free_bytes`` free: 70 % of it over a row's bytes.

    The memory rule of :func:`choose_batch_size` without the device query, so ``achilles
    plan`` applies it to a meta-device model and a GPU it does not have. The NLL's head runs
    ``LOGIT_CHUNK`` rows at a time, so its logits are a fixed cost per pass, not per row.
    """
    if logits:
        free_bytes -= head_bytes(model, tokens)
    per_row = row_bytes_estimate(model, tokens, widest_site, logits=False)
    b = int(0.7 * max(free_bytes, 0) // max(per_row, 1))
    return max(1, min(b, rows))


def run_batched(
    items: Sequence[T],
    fn: Callable[[Sequence[T]], None],
    batch_size: int,
    *,
    on_progress: Callable[[int], object] | None = None,
) -> int:
    """Call ``fn`` on consecutive slices of ``items``; halve the slice on out-of-memory.

    ``fn`` must leave no partial effect when it raises (stage 1 stages each batch's sums
    and commits them only after the forward pass succeeds). Returns the final batch size.
    """
    i = 0
    while i < len(items):
        chunk = items[i : i + batch_size]
        oom = False
        try:
            fn(chunk)
        except Exception as e:  # noqa: BLE001 - re-raised unless it is an OOM
            if not _is_oom(e) or batch_size == 1:
                raise  # the CLI reports an OOM at batch size 1 in one line
            oom = True
        if oom:
            # Outside the except block: the exception's traceback (and the activations its
            # frames hold) is gone, so the cache can really be released before the retry.
            batch_size = max(1, batch_size // 2)
            logger.warning("out of memory; retrying with batch size %d", batch_size)
            gc.collect()  # frames of the failed pass may sit in reference cycles
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        i += len(chunk)
        if on_progress is not None:
            on_progress(len(chunk))
    return batch_size

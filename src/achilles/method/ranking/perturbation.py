"""Stage 1 of the paper: rank units by their sensitivity to noise on the input embeddings.

For K noisy copies ``x_i = x + σ·ε_i`` (``ε_i ~ N(0, I)`` on every position, BOS included;
``σ = α``, or ``α · RMS(x)`` with ``noise="relative"``), the score of a unit is the mean over
samples of ``|a_clean - a_noisy|``, reduced over token positions by max (default) or mean.

Reference-compatible noise: sample ``i``'s noise is the ``i``-th ``randn([1, T, d])`` draw of a
CPU ``torch.Generator`` seeded with ``seed``, whatever the batch size and device.

The implementation is vectorised and streaming: the K copies run in batches, each hooked
module adds each sample's ``|a_clean - a_noisy|`` into a float32 ``[T, C]`` running sum on
the module's own device, in sample order (so the scores are bit-identical for every batch
size), and the ranking is one sort. Memory is O(units × T), never
O(K × units × T); no Python loop touches individual elements. The language-model head is
skipped: only the decoder stack runs.

Memory, exactly: the model, one batch of activations (and of noise, drawn lazily on the
host), and three float32 ``[T, C]`` tensors per site: the clean activation, the running sum,
and the staged running sum of the batch. The staged sums are committed only after the batch's
forward pass succeeds, so an out-of-memory error mid-batch (retried at half the batch size)
leaves no partial sums behind. Under an accelerate ``device_map`` all three live on the site's
GPU (they are made from the hooked output); the noise goes to the embedding's device.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any, cast

import torch
from tqdm.auto import tqdm

from achilles.config import RankConfig
from achilles.method.ranking.base import Scores
from achilles.model.batching import choose_batch_size, input_device, run_batched
from achilles.model.hooks import hooked
from achilles.model.units import UnitPool


def noise_draws(seed: int, samples: int, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """The first ``samples`` float32 ``randn(shape)`` draws of a CPU generator seeded ``seed``.

    The eager reference (``samples`` tensors at once); stage 1 draws them lazily, one batch at
    a time, through :class:`NoiseStream`, which yields the same tensors.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(samples)]


class NoiseStream:
    """Lazy :func:`noise_draws`: draw ``i`` is the ``i``-th ``randn(shape)`` of a seeded CPU generator.

    Batches are taken in order, and the current batch can be taken again (a retry after an
    out-of-memory error, possibly smaller): the generator state at the batch start is kept.
    Only one batch of noise exists at a time, never all K draws. Each draw is its own
    ``randn`` call because one ``randn([b, T, d])`` does not give the same numbers as ``b``
    calls of ``randn([1, T, d])``.
    """

    def __init__(self, seed: int, shape: tuple[int, ...], *, pin_memory: bool = False) -> None:
        self.shape = tuple(shape)
        self.pin_memory = pin_memory
        self._g = torch.Generator(device="cpu").manual_seed(seed)
        self._next = 0
        self._start, self._start_state = 0, self._g.get_state()

    def take(self, start: int, n: int) -> torch.Tensor:
        """Draws ``start .. start+n-1`` stacked on dim 0: float32 ``[n * shape[0], *shape[1:]]``."""
        if start != self._next:
            if start != self._start:
                raise ValueError(
                    f"noise draws are taken in order: asked for {start}, next is {self._next}"
                )
            self._g.set_state(self._start_state)
        else:
            self._start, self._start_state = start, self._g.get_state()
        lead = self.shape[0]
        out = torch.empty((n * lead, *self.shape[1:]), pin_memory=self.pin_memory)
        for j in range(n):
            torch.randn(self.shape, generator=self._g, out=out[j * lead : (j + 1) * lead])
        self._next = start + n
        return out

    def _snapshot(self) -> tuple[int, int, torch.Tensor, torch.Tensor]:
        return self._next, self._start, self._start_state, self._g.get_state()

    def _restore(self, snap: tuple[int, int, torch.Tensor, torch.Tensor]) -> None:
        self._next, self._start, self._start_state = snap[:3]
        self._g.set_state(snap[3])


class PrefetchedNoise:
    """A :class:`NoiseStream` that draws the next batch on a thread while this one runs.

    After ``take(start, n)`` returns, draws ``start+n .. start+2n-1`` are made in the
    background (into pinned memory when the stream pins), so on a GPU the host-side
    ``randn`` overlaps the forward pass. The tensors are those of the plain stream: a request
    that is not the prefetched one (a smaller retry after an out-of-memory error, the last
    short batch) discards the prefetch and rewinds the generator first. Use as a context
    manager; the thread stops on exit.
    """

    def __init__(self, stream: NoiseStream, total: int) -> None:
        self.stream = stream
        self.total = total
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="achilles-noise")
        self._pending: tuple[tuple[int, int], Future[torch.Tensor], tuple] | None = None

    def take(self, start: int, n: int) -> torch.Tensor:
        if self._pending is not None:
            key, future, snap = self._pending
            self._pending = None
            out = future.result()
            if key != (start, n):
                self.stream._restore(snap)  # not the batch asked for: as if never drawn
                out = self.stream.take(start, n)
        else:
            out = self.stream.take(start, n)
        nxt = start + n
        if nxt < self.total:
            k = min(n, self.total - nxt)
            snap = self.stream._snapshot()
            self._pending = ((nxt, k), self._pool.submit(self.stream.take, nxt, k), snap)
        return out

    def __enter__(self) -> PrefetchedNoise:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pending is not None:
            self._pending[1].cancel()
            self._pending = None
        self._pool.shutdown(wait=True)


SCALES_INPUTS_EMBEDS = frozenset({"gemma", "gemma2"})
"""Families whose model multiplies the embeddings by √d: inside the embedding module in
recent transformers (it then has an ``embed_scale``), or on ``inputs_embeds`` in older ones."""


def inputs_embeds_scale(model: torch.nn.Module) -> float:
    """The factor the model applies to ``inputs_embeds`` before its first layer (1 for most).

    Gemma's √d embedding scale moved from the model's forward (transformers 4.x, where it
    multiplies ``inputs_embeds`` too) into the embedding module (5.x, where it does not).
    """
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in SCALES_INPUTS_EMBEDS:
        return 1.0
    if hasattr(cast(Any, model).get_input_embeddings(), "embed_scale"):
        return 1.0  # already in the embedding's output
    return float(cfg.hidden_size) ** 0.5


def decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack without the LM head (``model.base_model``), to save its compute."""
    return getattr(model, "base_model", model)


@torch.no_grad()
def perturbation_scores(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    pool: UnitPool,
    config: RankConfig,
    *,
    progress: bool = False,
    prefetch: bool | None = None,
) -> Scores:
    """Noise-sensitivity scores of every unit of ``pool`` on the text ``input_ids [1, T]``.

    ``prefetch`` draws the next batch's noise on a thread while the current batch runs
    (default: on CUDA, where the host-side draws would otherwise idle the GPU); the draws
    are the same either way.
    """
    body = decoder(model)
    embed = cast(Any, model).get_input_embeddings()
    input_ids = input_ids.to(input_device(model))
    emb = embed(input_ids)  # [1, T, d], model dtype, on the embedding's (execution) device
    _, n_tok, d_model = emb.shape
    emb32 = emb.float()
    # The noise is defined on what the first layer sees: after any embedding scale, whether
    # the embedding module applies it or the model applies it to ``inputs_embeds``.
    scale = inputs_embeds_scale(model)
    sigma = config.alpha
    if config.noise == "relative":
        sigma = config.alpha * float(emb32.pow(2).mean().sqrt()) * scale
    sigma /= scale  # added before the model's own scale, which multiplies it back

    # Clean pass: one [T, C] float32 activation per site, created from the hooked output, so
    # it lives on that site's device (under a device_map, each GPU keeps its layers' sums).
    clean: dict[str, torch.Tensor] = {}

    def keep_clean(name: str):  # noqa: ANN202
        def fn(out: torch.Tensor) -> None:
            # copy=True: a float32 output would otherwise be kept by reference
            clean[name] = out[0].to(torch.float32, copy=True)

        return fn

    with hooked(model, {s.module: keep_clean(s.module) for s in pool.sites}):
        body(inputs_embeds=emb, use_cache=False)

    total = {m: torch.zeros_like(a) for m, a in clean.items()}  # Σ_i |clean - noisy_i|
    staged: dict[str, torch.Tensor] = {}  # this batch's sums, committed after success

    # CPU: one float32 [T, C] scratch row per width, shared by every site of that width.
    scratch: dict[int, torch.Tensor] = {}

    def accumulate(name: str):  # noqa: ANN202
        ref = clean[name]

        def fn(out: torch.Tensor) -> None:
            # out [b, T, C] (model dtype) -> total + |out_0 - clean| + |out_1 - clean| + …
            # [T, C] float32, added one sample at a time in sample order: the sums (and so
            # the scores) are bit-identical whatever the batch size. The subtraction promotes
            # to float32 in one kernel (no separate upcast copy).
            acc = total[name].clone()
            if out.device.type == "cpu":
                # Row by row into a reused scratch row: the [T, C] operands stay in cache and
                # only the hooked output is read from memory, once; no [b, T, C] difference
                # is allocated, written and read back. Elementwise, so the same bits.
                row = scratch.get(ref.shape[-1])
                if row is None or row.shape != ref.shape:
                    row = scratch[ref.shape[-1]] = torch.empty_like(ref)
                for sample in out:
                    acc += torch.sub(sample, ref, out=row).abs_()
            else:  # one difference kernel for the batch: fewer launches
                for diff in torch.sub(out, ref).abs_():
                    acc += diff
            staged[name] = acc

        return fn

    on_gpu = emb.device.type == "cuda"
    prefetch = on_gpu if prefetch is None else prefetch
    stream = NoiseStream(config.seed, (1, n_tok, d_model), pin_memory=on_gpu)
    noise_source = PrefetchedNoise(stream, config.samples) if prefetch else nullcontext(stream)
    widest = max(s.width for s in pool.sites)
    batch = choose_batch_size(
        model, n_tok, config.samples, widest, config.batch_size, logits=False
    )

    def run(chunk: Sequence[int]) -> None:
        assert isinstance(chunk, range)  # run_batched slices range(config.samples) into ranges
        staged.clear()
        eps = noise.take(chunk.start, len(chunk))  # [b, T, d] float32, pinned on CUDA
        eps = eps.to(emb.device, non_blocking=True)
        noisy = eps.mul_(sigma).add_(emb32).to(emb.dtype)
        del eps
        body(inputs_embeds=noisy, use_cache=False)
        total.update(staged)  # commit: the staged sums already include the previous total
        staged.clear()

    bar = tqdm(total=config.samples, desc="stage 1: noisy passes", disable=not progress)
    with noise_source as noise, hooked(model, {s.module: accumulate(s.module) for s in pool.sites}):
        run_batched(range(config.samples), run, batch, on_progress=bar.update)
    bar.close()

    # mean over samples per (position, channel), then reduced over positions
    return Scores.from_positions(pool, config.reduce, lambda m: total[m] / config.samples)

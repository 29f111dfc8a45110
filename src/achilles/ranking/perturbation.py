"""Stage 1 of the paper: rank units by their sensitivity to noise on the input embeddings.

For K noisy copies ``x_i = x + σ·ε_i`` (``ε_i ~ N(0, I)`` on every position, BOS included;
``σ = α``, or ``α · RMS(x)`` with ``noise="relative"``), the score of a unit is the mean over
samples of ``|a_clean - a_noisy|``, reduced over token positions by max (default) or mean.

Reference-compatible noise: sample ``i``'s noise is the ``i``-th ``randn([1, T, d])`` draw of a
CPU ``torch.Generator`` seeded with ``seed``, whatever the batch size and device.

The implementation is vectorised and streaming: the K copies run in batches, each hooked
module adds ``Σ_batch |a_clean - a_noisy|`` into a float32 ``[T, C]`` running sum on the
module's own device, and the ranking is one sort. Memory is O(units × T), never
O(K × units × T); no Python loop touches individual elements. The language-model head is
skipped: only the decoder stack runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from achilles.batching import choose_batch_size, run_batched
from achilles.config import RankConfig
from achilles.hooks import hooked
from achilles.ranking.base import Scores
from achilles.units import UnitPool


def noise_draws(seed: int, samples: int, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """The first ``samples`` float32 ``randn(shape)`` draws of a CPU generator seeded ``seed``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(samples)]


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
) -> Scores:
    """Noise-sensitivity scores of every unit of ``pool`` on the text ``input_ids [1, T]``."""
    body = decoder(model)
    embed = model.get_input_embeddings()
    input_ids = input_ids.to(embed.weight.device)
    emb = embed(input_ids)  # [1, T, d], model dtype
    _, n_tok, d_model = emb.shape
    emb32 = emb.float()
    sigma = config.alpha
    if config.noise == "relative":
        sigma = config.alpha * float(emb32.pow(2).mean().sqrt())

    # Clean pass: one [T, C] float32 activation per site, on the site's device.
    clean: dict[str, torch.Tensor] = {}

    def keep_clean(name: str):  # noqa: ANN202
        def fn(out: torch.Tensor) -> None:
            clean[name] = out[0].float()

        return fn

    with hooked(model, {s.module: keep_clean(s.module) for s in pool.sites}):
        body(inputs_embeds=emb, use_cache=False)

    total = {m: torch.zeros_like(a) for m, a in clean.items()}  # Σ_i |clean - noisy_i|
    staged: dict[str, torch.Tensor] = {}  # this batch's sums, committed after success

    def accumulate(name: str):  # noqa: ANN202
        def fn(out: torch.Tensor) -> None:
            # out [b, T, C] -> Σ_b |out - clean|  [T, C], float32
            staged[name] = (out.float() - clean[name]).abs_().sum(0)

        return fn

    draws = noise_draws(config.seed, config.samples, (1, n_tok, d_model))
    widest = max(s.width for s in pool.sites)
    batch = choose_batch_size(model, n_tok, config.samples, widest, config.batch_size)

    def run(chunk: Sequence[torch.Tensor]) -> None:
        staged.clear()
        noise = torch.cat(list(chunk)).to(emb.device)  # [b, T, d] float32
        noisy = (emb32 + sigma * noise).to(emb.dtype)
        body(inputs_embeds=noisy, use_cache=False)
        for name, s in staged.items():
            total[name] += s

    bar = tqdm(total=config.samples, desc="stage 1: noisy passes", disable=not progress)
    with hooked(model, {s.module: accumulate(s.module) for s in pool.sites}):
        run_batched(draws, run, batch, on_progress=bar.update)
    bar.close()

    values: dict[str, torch.Tensor] = {}
    positions: dict[str, torch.Tensor] = {}
    for s in pool.sites:
        mean = total[s.module] / config.samples  # [T, C]
        if config.reduce == "max":
            v, p = mean.max(0)
        else:
            v, p = mean.mean(0), mean.argmax(0)
        values[s.module] = v
        positions[s.module] = p
    return Scores(values, positions)

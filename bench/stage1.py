"""Stage-1 cost: ``perturbation_scores`` against the bare (K+1) decoder passes it is built on.

For random-weight Llama-shaped models of growing width and depth and several text lengths T,
times our stage 1 (clean pass + K noisy passes with the scoring hooks, noise drawn lazily)
and the *bare* floor: the same decoder (``model.base_model``, no LM head) on the same batch
sizes, with the noisy embeddings prepared beforehand and no hooks. Prints both, their
ratio, and the peak memory of each, then checks that host memory does not grow with K.

    nice -n 10 python bench/stage1.py                      # the CPU grid of docs/benchmarks.md
    python bench/stage1.py --device cuda --dtype bfloat16 --hidden 2048 --layers 16
    python bench/stage1.py --accumulation         # cost of the batch-invariant (in-order) sums
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
from common import (
    Shape,
    build_model,
    machine,
    malloc_mode,
    mib,
    peak_since,
    random_ids,
    reset_peak,
    small_shape,
    table,
    timed,
    timed2,
)

from achilles.config import RankConfig
from achilles.method.ranking.perturbation import NoiseStream, decoder, perturbation_scores
from achilles.model.batching import choose_batch_size
from achilles.model.units import build_pool

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@torch.no_grad()
def bare_passes(
    model: torch.nn.Module, ids: torch.Tensor, samples: int, batch: int, alpha: float
) -> Callable[[], None]:
    """The floor: clean + ``samples`` noisy decoder passes in batches of ``batch``, no hooks."""
    body = decoder(model)
    emb = model.get_input_embeddings()(ids)
    stream = NoiseStream(0, (1, *emb.shape[1:]))
    batches = [
        (emb.float() + alpha * stream.take(i, min(batch, samples - i)).to(emb.device)).to(emb.dtype)
        for i in range(0, samples, batch)
    ]  # prepared outside the timed region

    @torch.no_grad()  # as in stage 1: no autograd graph, no saved activations
    def run() -> None:
        body(inputs_embeds=emb, use_cache=False)
        for x in batches:
            body(inputs_embeds=x, use_cache=False)

    return run


def measure(
    model: torch.nn.Module, ids: torch.Tensor, samples: int, batch: int | None, device: str,
    repeat: int, tuned_malloc: bool = True,
) -> dict[str, float]:
    """Interleaved best-of-``repeat`` timings and peaks; ``tuned_malloc=False`` times with
    glibc's default allocator settings (what ``achilles rank`` runs with), page faults included."""
    pool = build_pool(model)
    widest = max(s.width for s in pool.sites)
    b = choose_batch_size(model, ids.shape[1], samples, widest, batch, logits=False)
    cfg = RankConfig(samples=samples, batch_size=b)
    bare = bare_passes(model, ids, samples, b, cfg.alpha)
    perturbation_scores(model, ids, pool, RankConfig(samples=min(2, samples), batch_size=b))  # warm-up
    t_bare, t_ours = [], []
    if tuned_malloc:
        malloc_mode("timing")
    for _ in range(repeat):  # interleaved, best of `repeat` (the CPU is shared)
        t_bare.append(timed2(bare, device))
        t_ours.append(timed2(lambda: perturbation_scores(model, ids, pool, cfg), device))
    malloc_mode("memory")  # one more run of each for the peak
    base = reset_peak(device)
    bare()
    m_bare = peak_since(device, base)
    base = reset_peak(device)
    perturbation_scores(model, ids, pool, cfg)
    m_ours = peak_since(device, base)
    (wb, cb), (wo, co) = min(t_bare), min(t_ours)
    return {
        "batch": b, "units": pool.n_units, "bare_s": wb, "ours_s": wo, "ratio": wo / wb,
        "bare_cpu": cb, "ours_cpu": co, "cpu_ratio": co / cb,
        "bare_peak": m_bare, "ours_peak": m_ours,
        "acc_bytes": 3 * pool.n_units * ids.shape[1] * 4,  # clean + running sum + staged, fp32
    }


def accumulation_cost(
    batch: int, tokens: int, width: int, device: str, dtype: torch.dtype, repeat: int
) -> list[object]:
    """One site's hook arithmetic per batch: the former batched sum vs the in-order adds.

    ``Σ_b |out - clean|`` as one reduction (fast, but its float32 rounding depends on the
    batch size) against ``total + |out_0 - clean| + |out_1 - clean| + …`` in sample order
    (what stage 1 does, bit-identical for every batch size).
    """
    g = torch.Generator().manual_seed(0)
    out = torch.randn(batch, tokens, width, generator=g).to(device, dtype)
    ref = torch.randn(tokens, width, generator=g).to(device)
    total = torch.zeros(tokens, width, device=device)

    def batched() -> None:
        total.add_(torch.sub(out, ref).abs_().sum(0))

    def in_order() -> None:
        diff = torch.sub(out, ref).abs_()
        acc = total.clone()
        for row in diff:
            acc += row

    batched(), in_order()  # warm-up
    tb = min(timed(batched, device)[0] for _ in range(repeat))
    to = min(timed(in_order, device)[0] for _ in range(repeat))
    return [batch, tokens, width, f"{tb * 1e3:.2f}", f"{to * 1e3:.2f}", f"{to / tb:.2f}"]


def growth_check(shape: Shape, tokens: int, device: str, dtype: torch.dtype, batch: int) -> list[list[object]]:
    """Peak memory of stage 1 at K=10 and K=100, same model, text and batch size."""
    model = build_model(shape, device, dtype)
    ids = random_ids(tokens, shape.vocab).to(device)
    pool = build_pool(model)
    perturbation_scores(model, ids, pool, RankConfig(samples=2, batch_size=batch))
    rows = []
    malloc_mode("memory")
    for k in (10, 100, 10):
        base = reset_peak(device)
        t, _ = timed(lambda: perturbation_scores(model, ids, pool, RankConfig(samples=k, batch_size=batch)), device)
        rows.append([shape.label, tokens, k, batch, f"{t:.2f}", mib(peak_since(device, base))])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--tokens", type=int, nargs="+", default=[30, 115, 512])
    ap.add_argument("--samples", type=int, default=20, help="K")
    ap.add_argument("--batch-size", type=int, default=None, help="default: choose_batch_size")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--no-growth-check", action="store_true")
    ap.add_argument(
        "--accumulation", action="store_true",
        help="only time one site's hook arithmetic: batched sum vs in-order adds",
    )
    ap.add_argument(
        "--threads", type=int, default=1,
        help="CPU threads (default 1: on a shared, oversubscribed CPU, multi-threaded memory-bound "
        "ops wait on descheduled threads and the timings mean nothing)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    print(machine())
    print(f"threads {torch.get_num_threads()}")
    if args.accumulation:
        head = ["batch", "T", "width", "batched sum ms", "in-order ms", "ratio"]
        acc = [
            accumulation_cost(b, t, w, args.device, dtype, max(args.repeat, 3))
            for b, t, w in [(10, 115, 512), (35, 115, 1376), (100, 115, 4096), (100, 115, 14336)]
        ]
        print(table(head, acc))
        return 0
    print(f"device {args.device}, dtype {args.dtype}, K={args.samples}, paper pool, best of {args.repeat}\n")
    header = ["model", "T", "K", "batch", "units", "bare s", "stage 1 s", "ratio (wall)",
              "bare CPU s", "stage 1 CPU s", "ratio (CPU)", "bare peak MiB", "stage 1 peak MiB",
              "accumulators MiB"]
    rows = []
    for hidden in args.hidden:
        for layers in args.layers:
            shape = small_shape(hidden, layers)
            model = build_model(shape, args.device, dtype)
            for tokens in args.tokens:
                ids = random_ids(tokens, shape.vocab).to(args.device)
                r = measure(model, ids, args.samples, args.batch_size, args.device, args.repeat)
                rows.append([
                    shape.label, tokens, args.samples, r["batch"], r["units"],
                    f"{r['bare_s']:.3f}", f"{r['ours_s']:.3f}", f"{r['ratio']:.2f}",
                    f"{r['bare_cpu']:.3f}", f"{r['ours_cpu']:.3f}", f"{r['cpu_ratio']:.2f}",
                    mib(r["bare_peak"]), mib(r["ours_peak"]), mib(r["acc_bytes"]),
                ])
                print(table(header, rows[-1:]).splitlines()[-1], flush=True)
            del model
    print()
    print(table(header, rows))
    if not args.no_growth_check:
        print("\nhost/device memory vs K (same model, T, batch):\n")
        g = growth_check(small_shape(256, 4), 115, args.device, dtype, batch=10)
        print(table(["model", "T", "K", "batch", "stage 1 s", "peak MiB"], g))
    return 0


if __name__ == "__main__":
    sys.exit(main())

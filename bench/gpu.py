"""Stage 1 and stage 2 at real model shapes, for a machine with a GPU.

Builds random-weight models of real shapes (Llama-3-8B, Qwen2.5-7B) directly on the GPU in
bfloat16 with ``from_config`` (no download: the cost of the method does not depend on the
weights' values), then reports for T=115 tokens and K=100 noisy copies:

* stage 1: wall time after loading, tokens/s, the bare-forward floor (the same decoder on
  the same batches without hooks) and our fraction of it, peak GPU memory;
* stage 2: wall time and forward passes of a linear prefix scan and of bisection over
  ``--max-neurons`` prefixes (random weights never collapse, so the linear scan runs to the
  end: its worst case), and the float32 re-check (an upcast copy, one masked pass).

    python bench/gpu.py                                  # both shapes, on cuda
    python bench/gpu.py --shape llama-3-8b --samples 100 --tokens 115
    python bench/gpu.py --tiny --device cpu              # smoke test of this script (CPU)

The targets from the project brief: 8B-shape stage 1 < 10 s on one H200, and stage 1 within
1.5× of the bare forward passes.
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys

import torch

from achilles.batching import choose_batch_size
from achilles.config import IdentifyConfig, RankConfig
from achilles.identify import MaskEvaluator, identify
from achilles.ranking import rank_units
from achilles.ranking.perturbation import perturbation_scores
from achilles.units import build_pool
from common import (
    LLAMA3_8B, QWEN25_7B, build_model, machine, mib, peak_since, random_ids, reset_peak,
    small_shape, table, timed,
)
from stage1 import bare_passes

SHAPES = {s.name: s for s in (LLAMA3_8B, QWEN25_7B)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run_shape(shape, args) -> tuple[list[object], list[list[object]]]:  # noqa: ANN001
    dev, dtype = args.device, DTYPES[args.dtype]
    t_load, model = timed(lambda: build_model(shape, dev, dtype), dev)
    n_params = sum(p.numel() for p in model.parameters())
    ids = random_ids(args.tokens, shape.vocab).to(dev)
    pool = build_pool(model)
    cfg = RankConfig(samples=args.samples, batch_size=args.batch_size)
    perturbation_scores(model, ids, pool, RankConfig(samples=2))  # warm-up (kernels, allocator)

    base = reset_peak(dev)
    t1, scores = timed(lambda: perturbation_scores(model, ids, pool, cfg), dev)
    peak1 = peak_since(dev, base)
    # the floor runs on the batch size stage 1 chose (the same estimate, made again)
    b = args.batch_size or choose_batch_size(
        model, args.tokens, args.samples, max(s.width for s in pool.sites), logits=False
    )
    bare = bare_passes(model, ids, args.samples, b, cfg.alpha)
    base = reset_peak(dev)
    t_bare, _ = timed(bare, dev)
    peak_bare = peak_since(dev, base)
    del bare
    gc.collect()
    tokens = (args.samples + 1) * args.tokens
    s1 = [
        shape.label, f"{n_params / 1e9:.2f}B" if n_params >= 1e8 else f"{n_params / 1e6:.2f}M", args.tokens, args.samples, b, pool.n_units,
        f"{t_load:.1f}", f"{t1:.2f}", f"{tokens / t1:,.0f}", f"{t_bare:.2f}",
        f"{t_bare / t1:.2f}", f"{t1 / t_bare:.2f}", mib(peak1), mib(peak_bare),
        mib(torch.cuda.memory_allocated() if dev.startswith("cuda") else 0),
    ]

    ranking = [r.unit for r in rank_units(scores, pool, args.max_neurons)]
    rows2 = []
    for search in ("linear", "bisect"):
        icfg = IdentifyConfig(
            epsilon=1.0, max_neurons=args.max_neurons, search=search, minimize=False,
            fp32_check=False, batch_size=args.stage2_batch,
        )
        base = reset_peak(dev)
        t2, ident = timed(lambda icfg=icfg: identify(model, ids, pool, ranking, icfg), dev)
        rows2.append([
            shape.label, search, args.max_neurons, ident.n_star, ident.forward_passes,
            len(ident.curve), f"{t2:.2f}", mib(peak_since(dev, base)),
        ])

    def fp32_recheck() -> float:
        m32 = copy.deepcopy(model).float()
        units = ranking[:10]
        ev = MaskEvaluator(m32, pool, ids, modules=list({u.module for u in units}), batch_size=1)
        return ev.measure([units])[0].delta

    base = reset_peak(dev)
    try:
        t3, d = timed(fp32_recheck, dev)
        rows2.append([shape.label, "fp32 re-check (copy+upcast)", 10, "-", 2, 1, f"{t3:.2f}",
                      mib(peak_since(dev, base))])
    except torch.OutOfMemoryError:
        rows2.append([shape.label, "fp32 re-check (copy+upcast)", 10, "-", "-", "-", "OOM", "-"])
    del model
    gc.collect()
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
    return s1, rows2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--tiny", action="store_true", help="a tiny shape instead (smoke test)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--tokens", type=int, default=115)
    ap.add_argument("--samples", type=int, default=None, help="K (default 100; 20 with --tiny)")
    ap.add_argument("--batch-size", type=int, default=None, help="stage 1 (default: from memory)")
    ap.add_argument("--max-neurons", type=int, default=None, help="stage 2 (default 1000; 100 tiny)")
    ap.add_argument("--stage2-batch", type=int, default=None, help="stage 2 (default: from memory)")
    args = ap.parse_args(argv)
    args.samples = args.samples or (20 if args.tiny else 100)
    args.max_neurons = args.max_neurons or (100 if args.tiny else 1000)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run with --tiny --device cpu for a smoke test", file=sys.stderr)
        return 2
    if args.device == "cpu":
        torch.set_num_threads(1)
    shapes = [small_shape(128, 2, vocab=1024)] if args.tiny else [SHAPES[s] for s in args.shape]
    print(machine())
    print(f"device {args.device}, dtype {args.dtype}, T={args.tokens}, K={args.samples}, paper pool\n")
    s1_rows, s2_rows = [], []
    for shape in shapes:
        s1, s2 = run_shape(shape, args)
        s1_rows.append(s1)
        s2_rows += s2
    print("stage 1 (noise ranking)\n")
    print(table(
        ["model", "params", "T", "K", "batch", "units", "build s", "stage 1 s", "tokens/s",
         "bare s", "fraction of floor", "overhead ×", "stage 1 peak MiB", "bare peak MiB",
         "resident MiB"],
        s1_rows,
    ))
    print("\nstage 2 (prefix masking; random weights: no collapse, worst case)\n")
    print(table(["model", "search", "max prefix", "n*", "forward passes", "prefixes measured",
                 "wall s", "peak MiB"], s2_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Stage 1 and stage 2 at real model shapes, as `achilles find` runs them, for a GPU machine.

Builds random-weight models of real shapes (Llama-3-8B, Qwen2.5-7B) directly on the GPU in
bfloat16 with ``from_config`` (no download: the cost of the method does not depend on the
weights' values), then times, for T=115 tokens and the `find` defaults (K=100, linear scan
up to 1000 prefixes, minimisation, fp32 re-check), each after a warm-up of the same code:

* stage 1: wall time, tokens/s, the bare-forward floor (the same decoder on the same batches
  without hooks) and our fraction of it, peak GPU memory;
* stage 2 with the `find` defaults: random weights never reach ε = 1, so the linear scan runs
  to the end (its worst case); bisection over the same prefixes;
* minimisation: ε is set to half the Δ of the largest prefix, so that a set is found and
  minimised (the batch of speculative removals is chosen by timing, as in `find`);
* the fp32 re-check of the minimal set (each layer upcast in place around its forward);
* with several GPUs, stage 1 and the linear scan again with the model spread by an
  accelerate device map over all of them; on CPU (``--tiny``), the same rows with
  ``cpu_offload`` (weights on ``meta``, moved in per forward) as a smoke test of that path.

No ``empty_cache`` runs right before a timed region (a user's run does not get one either).

    python bench/gpu.py                                  # both shapes, on cuda
    python bench/gpu.py --shape llama-3-8b --samples 100 --tokens 115
    python bench/gpu.py --tiny --device cpu              # smoke test of this script (CPU)

The targets from the project brief: 8B-shape stage 1 < 10 s on one H200, and stage 1 within
1.5× of the bare forward passes.
"""

from __future__ import annotations

import argparse
import gc
import sys

import torch
from common import (
    LLAMA3_8B,
    QWEN25_7B,
    build_model,
    machine,
    mib,
    peak_since,
    random_ids,
    small_shape,
    table,
    timed,
)
from stage1 import bare_passes

from achilles.config import IdentifyConfig, RankConfig
from achilles.method.identify import MaskEvaluator, identify
from achilles.method.ranking import rank_units
from achilles.method.ranking.perturbation import perturbation_scores
from achilles.method.recheck import float32_forward
from achilles.model.batching import choose_batch_size, is_oom
from achilles.model.masking import PrefixIndex
from achilles.model.units import build_pool

SHAPES = {s.name: s for s in (LLAMA3_8B, QWEN25_7B)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def peak_window(device: str) -> int:
    """Start a peak-memory window without releasing the allocator's cache (no ``empty_cache``)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    from common import reset_peak

    return reset_peak(device)


def spread(model: torch.nn.Module, device: str) -> tuple[torch.nn.Module, str] | None:
    """The model under an accelerate device map: every GPU when there are several, else
    (on CPU) ``cpu_offload``; ``None`` when neither applies."""
    from accelerate import cpu_offload, dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if device.startswith("cuda") and torch.cuda.device_count() > 1:
        model = model.cpu()
        gc.collect()
        torch.cuda.empty_cache()  # setup, not a timed region
        layer_cls = type(model.model.layers[0]).__name__
        mem = get_balanced_memory(model, no_split_module_classes=[layer_cls])
        dmap = infer_auto_device_map(model, max_memory=mem, no_split_module_classes=[layer_cls])
        return dispatch_model(model, dmap), f"device_map over {torch.cuda.device_count()} GPUs"
    if device == "cpu":
        return cpu_offload(model, execution_device=torch.device("cpu")), "cpu_offload (smoke)"
    return None


def stage1(model, ids, pool, cfg, dev):  # noqa: ANN001, ANN201
    perturbation_scores(model, ids, pool, RankConfig(samples=2, batch_size=cfg.batch_size))  # warm-up
    base = peak_window(dev)
    t, scores = timed(lambda: perturbation_scores(model, ids, pool, cfg), dev)
    return t, scores, peak_since(dev, base)


def stage2(model, ids, pool, ranking, icfg, dev):  # noqa: ANN001, ANN201
    warm = IdentifyConfig(epsilon=icfg.epsilon, max_neurons=min(8, icfg.max_neurons), search=icfg.search,
                          minimize=False, fp32_check=False, batch_size=icfg.batch_size)
    identify(model, ids, pool, ranking, warm)  # warm-up: kernels for the batch shapes, allocator
    base = peak_window(dev)
    t, ident = timed(lambda: identify(model, ids, pool, ranking, icfg), dev)
    return t, ident, peak_since(dev, base)


def run_shape(shape, args) -> tuple[list[list[object]], list[list[object]]]:  # noqa: ANN001
    dev, dtype = args.device, DTYPES[args.dtype]
    t_load, model = timed(lambda: build_model(shape, dev, dtype), dev)
    n_params = sum(p.numel() for p in model.parameters())
    size = f"{n_params / 1e9:.2f}B" if n_params >= 1e8 else f"{n_params / 1e6:.2f}M"
    ids = random_ids(args.tokens, shape.vocab).to(dev)
    pool = build_pool(model)
    cfg = RankConfig(samples=args.samples, batch_size=args.batch_size)

    t1, scores, peak1 = stage1(model, ids, pool, cfg, dev)
    # the floor runs on the batch size stage 1 chose (the same estimate, made again)
    b = args.batch_size or choose_batch_size(
        model, args.tokens, args.samples, max(s.width for s in pool.sites), logits=False
    )
    bare = bare_passes(model, ids, args.samples, b, cfg.alpha)
    bare()  # warm-up
    base = peak_window(dev)
    t_bare, _ = timed(bare, dev)
    peak_bare = peak_since(dev, base)
    del bare
    tokens = (args.samples + 1) * args.tokens
    resident = mib(torch.cuda.memory_allocated() if dev.startswith("cuda") else 0)
    s1 = [[
        shape.label, "single device", size, args.tokens, args.samples, b, pool.n_units,
        f"{t_load:.1f}", f"{t1:.2f}", f"{tokens / t1:,.0f}", f"{t_bare:.2f}",
        f"{t_bare / t1:.2f}", f"{t1 / t_bare:.2f}", mib(peak1), mib(peak_bare), resident,
    ]]

    ranking = [r.unit for r in rank_units(scores, pool, args.max_neurons)]
    rows2 = []
    d_find = IdentifyConfig(max_neurons=args.max_neurons, fp32_check=False, batch_size=args.stage2_batch)
    for label, icfg in (
        ("linear (find defaults)", d_find),
        ("bisect", IdentifyConfig(max_neurons=args.max_neurons, search="bisect", minimize=False,
                                  fp32_check=False, batch_size=args.stage2_batch)),
    ):
        t2, ident, peak = stage2(model, ids, pool, ranking, icfg, dev)
        rows2.append([shape.label, label, icfg.epsilon, args.max_neurons, ident.n_star,
                      len(ident.minimal_set) if ident.found else "-", ident.forward_passes,
                      f"{t2:.2f}", mib(peak)])

    # minimisation: ε at half the Δ of the largest prefix, so that a set is found
    ev = MaskEvaluator(model, pool, ids, batch_size=1)
    d_all = ev.measure_prefixes(PrefixIndex.build(pool, ranking), [len(ranking)])[0].delta
    units = ranking[:10]
    if d_all > 0:
        eps = d_all / 2
        icfg = IdentifyConfig(epsilon=eps, max_neurons=args.max_neurons, fp32_check=False,
                              batch_size=args.stage2_batch)
        t2, ident, peak = stage2(model, ids, pool, ranking, icfg, dev)
        rows2.append([shape.label, "linear + minimisation", f"{eps:.3g}", args.max_neurons,
                      ident.n_star, len(ident.minimal_set) if ident.found else "-",
                      ident.forward_passes, f"{t2:.2f}", mib(peak)])
        units = ident.minimal_set or units
    else:
        rows2.append([shape.label, f"minimisation skipped: Δ of the largest prefix {d_all:.2g} ≤ 0",
                      "-", args.max_neurons, "-", "-", "-", "-", "-"])

    def recheck(m: torch.nn.Module = model) -> float:  # the model as it is now (del'd below)
        with float32_forward(m):
            ev32 = MaskEvaluator(m, pool, ids, modules=list({u.module for u in units}), batch_size=1)
            return ev32.measure([units])[0].delta

    recheck()  # warm-up (float32 kernels)
    base = peak_window(dev)
    try:
        t3, _ = timed(recheck, dev)
        rows2.append([shape.label, "fp32 re-check (in-place upcast)", "-", len(units), "-", "-", 2,
                      f"{t3:.2f}", mib(peak_since(dev, base))])
    except Exception as e:  # noqa: BLE001 - an OOM is a result here, anything else is a bug
        if not is_oom(e):
            raise
        rows2.append([shape.label, "fp32 re-check (in-place upcast)", "-", len(units), "-", "-", "-", "OOM", "-"])

    spread_model = spread(model, dev) if args.device_map else None
    if spread_model is not None:
        model, how = spread_model
        t1m, _, peak1m = stage1(model, ids, pool, cfg, dev)
        s1.append([shape.label, how, size, args.tokens, args.samples, b, pool.n_units, "-",
                   f"{t1m:.2f}", f"{tokens / t1m:,.0f}", "-", "-", "-", mib(peak1m), "-", "-"])
        t2m, identm, peakm = stage2(model, ids, pool, ranking, d_find, dev)
        rows2.append([shape.label, f"linear (find defaults), {how}", d_find.epsilon, args.max_neurons,
                      identm.n_star, len(identm.minimal_set) if identm.found else "-",
                      identm.forward_passes, f"{t2m:.2f}", mib(peakm)])
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
    ap.add_argument(
        "--device-map", action=argparse.BooleanOptionalAction, default=True,
        help="also time the model spread over all GPUs (cpu_offload on CPU)",
    )
    args = ap.parse_args(argv)
    args.samples = args.samples or (20 if args.tiny else 100)
    args.max_neurons = args.max_neurons or (40 if args.tiny else 1000)
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
        s1_rows += s1
        s2_rows += s2
    print("stage 1 (noise ranking)\n")
    print(table(
        ["model", "placement", "params", "T", "K", "batch", "units", "build s", "stage 1 s",
         "tokens/s", "bare s", "fraction of floor", "overhead ×", "stage 1 peak MiB",
         "bare peak MiB", "resident MiB"],
        s1_rows,
    ))
    print("\nstage 2 (random weights: no collapse at ε=1, the linear scan's worst case)\n")
    print(table(["model", "run", "ε", "max prefix / set", "n*", "minimal", "forward passes",
                 "wall s", "peak MiB"], s2_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

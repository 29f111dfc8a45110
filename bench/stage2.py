"""Stage-2 cost: linear prefix scan against bisection, in forward passes and wall time.

Part 1 runs the pure search functions (``achilles.method.search``) on synthetic Δ(n) curves (steps
at several n*, ramps, a noisy non-monotone ramp) and counts what a model would pay: masked
rows evaluated and forward passes (the linear scan evaluates ``--batch`` prefixes per pass;
bisection one per pass). Part 2 runs ``identify`` both ways on a real model: the bundled
sink model at ``models/sink`` if present, else the bundled ``models/natural``, else a random
tiny Llama whose MLPs are scaled up so that masking matters (the output says which).

    nice -n 10 python bench/stage2.py
    python bench/stage2.py --model models/sink --epsilon 1 --max-neurons 1000
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import build_model, machine, small_shape, table

from achilles.config import IdentifyConfig, ModelSpec, RankConfig
from achilles.method.identify import identify
from achilles.method.ranking import rank_units
from achilles.method.ranking.perturbation import perturbation_scores
from achilles.method.search import bisect_search, linear_search
from achilles.model.loading import load_model, tokenize
from achilles.model.units import build_pool

TEXT = (
    "Bookends is a 2003 film about two sisters who return to the family home after many years "
    "away. The house by the river is as they left it, and the summer they spend there brings "
    "back the arguments, the jokes and the quiet evenings of their childhood, until a letter "
    "from their mother's old friend changes what they thought they knew about the family."
)


FALLBACKS = (Path("models/natural"),)
"""Trained models tried, in order, when ``--model`` is not there."""


def curves(n_max: int, epsilon: float) -> dict[str, Callable[[int], float]]:
    """Synthetic Δ(n) curves, named by where they first reach ``epsilon``."""
    rng = random.Random(0)
    noise = [rng.gauss(0, 0.15 * epsilon) for _ in range(n_max + 1)]
    out: dict[str, Callable[[int], float]] = {}
    for n_star in (1, 7, 60, 400, n_max):
        out[f"step at n*={n_star}"] = lambda n, s=n_star: 5.0 * epsilon if n >= s else 0.0
    for n_star in (30, 300):
        out[f"ramp reaching ε at {n_star}"] = lambda n, s=n_star: epsilon * n / s
    out["noisy ramp (non-monotone), ε near 150"] = lambda n: epsilon * n / 150 + noise[n]
    out["never reaches ε"] = lambda n: 0.5 * epsilon * (1 - math.exp(-n / 50))
    return out


def synthetic(n_max: int, epsilon: float, batch: int) -> list[list[object]]:
    rows = []
    for name, f in curves(n_max, epsilon).items():
        res = []
        for search in ("linear", "bisect"):
            calls = 0

            def objective(ns, f=f):  # noqa: ANN001, ANN202
                nonlocal calls
                calls += 1
                return [f(n) for n in ns]

            t = time.perf_counter()
            if search == "linear":
                tr = linear_search(objective, epsilon=epsilon, n_max=n_max, batch=batch)
            else:
                tr = bisect_search(objective, epsilon=epsilon, n_max=n_max)
            res.append((tr.n_star, tr.evaluations, calls, (time.perf_counter() - t) * 1e3))
        (ln, lr, lc, lt), (bn, br, bc, bt) = res
        rows.append([name, ln, lr, lc, f"{lt:.2f}", bn, br, bc, f"{bt:.2f}"])
    return rows


def real_model(args: argparse.Namespace) -> tuple[str, list[list[object]]]:
    sink = Path(args.model)
    found = [p for p in (sink, *FALLBACKS) if (p / "config.json").is_file()]
    if found:
        path = found[0]
        lm = load_model(ModelSpec(model=str(path), device=args.device))
        model, ids = lm.model, tokenize(lm.tokenizer, TEXT)
        n = sum(p.numel() for p in model.parameters())
        what = (
            f"{path} ({model.config.model_type}, {n / 1e6:.1f}M parameters, {lm.dtype}, "
            f"T={ids.shape[1]})" + ("" if path == sink else f"; {sink} not found")
        )
    else:
        model = build_model(small_shape(128, 2, vocab=1024), args.device)
        with torch.no_grad():  # make masking matter: MLPs dominate the residual stream
            for layer in model.model.layers:
                layer.mlp.down_proj.weight.mul_(40)
            model.lm_head.weight.mul_(10)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(2, 1024, (1, 115), generator=g)
        what = f"{sink} not found: random tiny Llama (d=128, L=2, MLPs ×40), T=115"
        args.epsilon = min(args.epsilon, 0.05)
    pool = build_pool(model)
    scores = perturbation_scores(model, ids, pool, RankConfig(samples=args.samples))
    ranking = [r.unit for r in rank_units(scores, pool, args.max_neurons)]
    rows = []
    for search in ("linear", "bisect"):
        for minimize in (False, True):
            cfg = IdentifyConfig(
                epsilon=args.epsilon, max_neurons=args.max_neurons, search=search,
                minimize=minimize, fp32_check=False, curve_until=args.epsilon,
            )
            t = time.perf_counter()
            ident = identify(model, ids, pool, ranking, cfg)
            dt = time.perf_counter() - t
            rows.append([
                search, minimize, args.epsilon, ident.n_star,
                len(ident.minimal_set) if minimize and ident.found else "-",
                len(ident.curve), ident.forward_passes, f"{dt:.2f}",
            ])
    return what, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-max", type=int, default=1000, help="synthetic curves: largest prefix")
    ap.add_argument("--batch", type=int, default=64, help="synthetic linear scan: prefixes/pass")
    ap.add_argument("--epsilon", type=float, default=1.0)
    ap.add_argument("--model", default="models/sink")
    ap.add_argument("--max-neurons", type=int, default=300)
    ap.add_argument("--samples", type=int, default=20, help="stage-1 K for the real-model ranking")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(machine())
    print(f"\nsynthetic curves: ε={args.epsilon}, n ≤ {args.n_max}, linear batch {args.batch}\n")
    print(table(
        ["curve", "linear n*", "linear rows", "linear passes", "linear ms", "bisect n*",
         "bisect rows", "bisect passes", "bisect ms"],
        synthetic(args.n_max, args.epsilon, args.batch),
    ))
    what, rows = real_model(args)
    print(f"\nreal model: {what}\n")
    print(table(["search", "minimize", "ε", "n*", "minimal", "prefixes measured", "forward passes",
                 "wall s"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

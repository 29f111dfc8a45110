"""Stage-2 mask cost at the Llama-3-8B paper-pool shape: bytes and time of one mask install.

Builds the unit pool of a weightless (``meta``) Llama-3-8B-shaped model, then installs the
masks one stage-2 call uses with :class:`~achilles.model.masking.ChannelMasker` (on the CPU here;
on a GPU the same tensors are built on each site's device) for the calls a run makes: a
batch of linear-scan prefixes, a minimisation batch of removals, and a single bisection
prefix. The masks are sized to the rows of the call, not to the largest batch the masker
may take, and touch only the sites the call's units live in.

    python bench/masker.py                      # 544 rows: the 8B linear-scan batch on an H200 before the chunked LM head
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import transformers as T
from common import LLAMA3_8B, machine, table

from achilles.model.masking import ChannelMasker, PrefixIndex
from achilles.model.units import build_pool


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=544, help="the masker's capacity (linear-scan batch)")
    ap.add_argument("--prefix", type=int, default=1000, help="ranking length (max neurons)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    s = LLAMA3_8B
    cfg = T.LlamaConfig(
        vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.inter,
        num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
    )
    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(cfg)
    pool = build_pool(model)
    masker = ChannelMasker(model, pool, rows=args.rows)
    masker._devices = {site.module: torch.device("cpu") for site in pool.sites}  # meta model
    g = torch.Generator().manual_seed(0)
    ranking = pool.units(torch.randperm(pool.n_units, generator=g)[: args.prefix].tolist())
    index = PrefixIndex.build(pool, ranking)
    minimal = ranking[:46]
    calls = {
        f"linear scan: {args.rows} prefixes": lambda: masker.set_prefixes(
            index, [1 + (i * (args.prefix - 1)) // max(args.rows - 1, 1) for i in range(args.rows)]
        ),
        "minimisation: 16 removals of a 46-unit set": lambda: masker.set_rows(
            [[x for x in minimal if x != u] for u in minimal[:16]]
        ),
        f"bisection: 1 prefix of {args.prefix // 2}": lambda: masker.set_prefixes(index, [args.prefix // 2]),
    }
    rows = []
    for name, call in calls.items():
        call()
        best = min(_timed(call) for _ in range(args.repeat))
        rows.append([name, len(masker._masks), f"{masker.mask_bytes() / 2**20:.2f}", f"{best * 1e3:.1f}"])
    print(machine())
    print(f"Llama-3-8B paper pool: {len(pool.sites)} sites, {pool.n_units} units; masker capacity "
          f"{args.rows} rows; ranking of {args.prefix} random units; best of {args.repeat}\n")
    print(table(["call", "sites masked", "mask MiB", "install ms"], rows))
    return 0


def _timed(fn) -> float:  # noqa: ANN001
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    sys.exit(main())

"""Cost of ``achilles explain``: rows, wall time, and the eager-attention pass, on CPU.

For Llama-3-proportioned random-weight shapes at T tokens, measures

* one bare forward row (batched ``sequence_nll``, the model's default attention kernel);
* the traced two-row pass with eager attention against the same two rows with the default
  kernel (the price of reading attention probabilities);
* the whole ``explain`` call, its row count against the formula ``2 + 2·L·(H+1)``, and its
  time per row against a bare row,

then extrapolates the row count to Llama-3-8B. Run from the repository root:

    nice -n 10 python bench/explain.py
    python bench/explain.py --hidden 256 512 --layers 4 8 --tokens 128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from common import LLAMA3_8B, build_model, machine, random_ids, small_shape, table, timed2

from achilles.config import ModelSpec
from achilles.explain import ExplainConfig, explain
from achilles.explain.trace import Layout, trace
from achilles.method.metrics import sequence_nll
from achilles.model.loading import LoadedModel
from achilles.model.masking import ChannelMasker
from achilles.model.units import Unit, build_pool


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Path(__file__).resolve().parents[1] / "models" / "natural")
    print(machine())
    rows = []
    for hidden in args.hidden:
        for layers in args.layers:
            shape = small_shape(hidden, layers, vocab=len(tok))
            model = build_model(shape)
            ids = random_ids(args.tokens, len(tok))
            text = tok.decode(ids[0, 1:])
            lm = LoadedModel(model, tok, ModelSpec(model=shape.name))
            pool = build_pool(model)
            site = next(s for s in pool.sites if s.component == "mlp.down" and s.layer == 0)
            units = [Unit(site.module, c, 0, "mlp.down") for c in range(8)]
            ids = lm.tokenizer(text, return_tensors="pt").input_ids
            T = int(ids.shape[1])
            layout = Layout.of(model)
            sequence_nll(model, ids.expand(2, -1))  # warm-up
            # process CPU seconds (one thread): the wall clock of a shared CPU says little
            _, bare2 = timed2(lambda: sequence_nll(model, ids.expand(2, -1)), "cpu")
            m2 = ChannelMasker(model, pool, rows=2)
            m2.set_rows([[], units])
            _, eager2 = timed2(lambda: trace(model, layout, ids, m2, 0), "cpu")
            bs = 16
            _, bare16 = timed2(lambda: sequence_nll(model, ids.expand(bs, -1)), "cpu")
            got = []
            wall, cpu = timed2(lambda: got.append(explain(lm, text, units, pool, ExplainConfig())), "cpu")
            mech = got[0]
            n = mech.cost["forward_rows"]
            per_row = bare16 / bs
            rows.append([
                shape.label, T, layout.heads, n, mech.cost["formula_rows"],
                f"{per_row * 1e3:.1f}", f"{eager2:.3f}", f"{bare2:.3f}", f"{eager2 / bare2:.2f}",
                f"{wall:.2f}", f"{cpu:.2f}", f"{cpu / (n * per_row):.2f}",
            ])
            print(table(
                ["shape", "T", "heads", "rows", "2+2L(H+1)", "bare row CPU ms (batch 16)",
                 "traced 2 rows, eager CPU s", "2 rows, sdpa CPU s", "eager / sdpa", "explain wall s",
                 "explain CPU s", "CPU / (rows × bare row)"], rows[-1:]), flush=True)
    print()
    print(table(
        ["shape", "T", "heads", "rows", "2+2L(H+1)", "bare row CPU ms (batch 16)",
         "traced 2 rows, eager CPU s", "2 rows, sdpa CPU s", "eager / sdpa", "explain wall s",
         "explain CPU s", "CPU / (rows × bare row)"], rows))
    s = LLAMA3_8B
    rows_8b = 2 + 2 * s.layers * (s.heads + 1)
    print(f"\n{s.label}: {rows_8b} rows (+ |S| writer rows + top_components + 2 joint rows) at T tokens")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

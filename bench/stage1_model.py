"""Stage 1 on a real model against its bare *batched* decoder passes (one run, one thread).

The same measurement as ``bench/stage1.py`` (``measure``: the clean pass and K noisy passes
with the scoring hooks, against ``model.base_model`` run on the same batches with the noisy
embeddings prepared beforehand and no hooks), on a model loaded as ``achilles`` loads it and a
real text, with the paper pool. Prints the batch, the unit count, both wall and CPU times,
their ratio, and the peak memory of each.

    OMP_NUM_THREADS=1 python bench/stage1_model.py                            # smollm2, demo text, K=25
    OMP_NUM_THREADS=1 python bench/stage1_model.py --model /path/to/folder --repeat 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from common import machine, mib
from stage1 import measure

from achilles.config import ModelSpec
from achilles.model.loading import load_model, tokenize

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="what achilles --model accepts (default: smollm2)")
    ap.add_argument("--text-file", default=str(ROOT / "data" / "demo.txt"))
    ap.add_argument("--samples", type=int, default=25, help="K (default 25)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: choose_batch_size")
    ap.add_argument("--repeat", type=int, default=1, help="interleaved runs; the best is kept")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    ap.add_argument(
        "--default-malloc", action="store_true",
        help="time with glibc's default malloc settings, as achilles runs (default: the "
        "benchmarks' timing mode, large tensors kept on the heap, no page faults)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lm = load_model(ModelSpec(model=args.model, dtype="float32", device="cpu"))
    ids = tokenize(lm.tokenizer, Path(args.text_file).read_text(encoding="utf-8"))
    print(machine())
    print(f"threads {torch.get_num_threads()}, model {args.model} ({lm.model.config.model_type}, "
          f"float32), T={ids.shape[1]}, K={args.samples}, paper pool, best of {args.repeat}, "
          f"{'default' if args.default_malloc else 'timing-mode'} malloc")
    r = measure(lm.model, ids, args.samples, args.batch_size, "cpu", args.repeat,
                tuned_malloc=not args.default_malloc)
    print(f"batch {r['batch']}, units {r['units']}")
    print(f"bare passes   {r['bare_s']:.2f} s wall, {r['bare_cpu']:.2f} s CPU, peak +{mib(r['bare_peak'])} MiB")
    print(f"stage 1       {r['ours_s']:.2f} s wall, {r['ours_cpu']:.2f} s CPU, peak +{mib(r['ours_peak'])} MiB")
    print(f"ratio         {r['ratio']:.3f} wall, {r['cpu_ratio']:.3f} CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``find`` + report, old code against new, in one run: wall and CPU seconds and their ratio.

Usage (from the repository root)::

    git archive 3eb2c18 src | tar -x -C /tmp/achilles-old   # the code before the change
    python bench/find_report.py --old /tmp/achilles-old/src [--model smollm2] [--samples 100]

Runs ``achilles find --model M --text-file data/demo.txt`` (stage 1, stage 2, explain and
the report with its controls: the CLI defaults) on ``models/sink`` and on ``--model``
(``smollm2``: /work/cache/smollm2-fp32), once with the code under ``--old`` and once with
this checkout's ``src``, alternating old/new ``--repeat`` times, with one CPU thread.
CPU seconds (user + system of the child) are less sensitive to other load on the machine
than wall seconds; both are printed, with new/old ratios of the medians.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"smollm2": "/work/cache/smollm2-fp32", "sink": "models/sink"}


def run_find(src: Path, model: str, samples: int, out: Path, extra: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one CLI ``find`` (with explain and report) run from ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "achilles", "find", "--model", model, "--text-file",
           "data/demo.txt", "--samples", str(samples), "--out-dir", str(out), "--quiet", *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", type=Path, required=True, help="src folder of the code before")
    p.add_argument("--model", default="smollm2", help="the real model (default: smollm2)")
    p.add_argument("--samples", type=int, default=100, help="stage 1 samples K (default: 100)")
    p.add_argument("--repeat", type=int, default=1, help="old/new pairs per model (default: 1)")
    p.add_argument("--no-explain", action="store_true",
                   help="find --no-explain (stages 1 and 2 and the report only), both codes")
    a = p.parse_args()
    new = ROOT / "src"
    extra = ["--no-explain"] if a.no_explain else []
    print(f"python {sys.version.split()[0]}, one thread, K = {a.samples}, {a.repeat} pair(s)"
          + (", --no-explain" if a.no_explain else ""))
    print(f"{'model':<28} {'code':<4} {'wall s':>8} {'cpu s':>8}")
    for model in ("sink", a.model):
        path = MODELS.get(model, model)
        times: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
        for _ in range(a.repeat):
            for label, src in (("old", a.old), ("new", new)):
                out = Path(tempfile.mkdtemp(prefix="achilles-bench-")) / "run"
                try:
                    times[label].append(run_find(src, path, a.samples, out, extra))
                finally:
                    shutil.rmtree(out.parent, ignore_errors=True)
                wall, cpu = times[label][-1]
                print(f"{model:<28} {label:<4} {wall:8.1f} {cpu:8.1f}", flush=True)
        med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
               for k, v in times.items()}
        print(f"{model:<28} new/old: wall {med['new'][0] / med['old'][0]:.3f}, "
              f"cpu {med['new'][1] / med['old'][1]:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

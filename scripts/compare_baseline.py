"""Run find / explain / compare / report on the bundled models and compare every JSON result
with a baseline folder made by another checkout: the numbers must be bit-identical.

Usage::

    python scripts/compare_baseline.py BASELINE_DIR [--out OUT_DIR] [--skip-run]

``BASELINE_DIR`` holds ``sink/``, ``natural/`` and ``cmp-sink/`` as made by the same three
commands with the code before the change (``find`` on models/sink and models/natural,
``compare`` on models/sink); ``OUT_DIR`` (default: a fresh temporary folder) gets this
checkout's. Keys that are not measurements are excluded: ``env`` (versions, git sha),
``run_id`` and ``ranking_run_id``, wall times (every key ending in ``seconds``) and paths of the output folder
(``run_dir``). Prints each difference and exits 1 when there is one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
IGNORED = {"env", "run_id", "ranking_run_id", "run_dir"}
"""Keys that are not measurements (and every key ending in ``seconds``: a wall time)."""
ENVELOPE = {"config"}
"""Envelope keys a result may gain (an empty ``config`` on ``analysis.json``)."""
COMMANDS = {
    "sink": ["find", "--model", "models/sink", "--text-file", "data/demo.txt"],
    "natural": ["find", "--model", "models/natural", "--text-file", "data/demo.txt"],
    "cmp-sink": ["compare", "--model", "models/sink", "--text-file", "data/demo.txt",
                 "--methods", "perturbation,activation,random", "--levels", "1,2,5,10",
                 "--random-runs", "3", "--data", "data/heldout.txt"],
}


def run_all(out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    for name, cmd in COMMANDS.items():
        args = [sys.executable, "-m", "achilles", *cmd, "--out-dir", str(out / name), "--quiet"]
        print("+", " ".join(args[2:]), flush=True)
        subprocess.run(args, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)


def diff(a: Any, b: Any, where: str, out: list[str]) -> None:
    """Append to ``out`` every place where ``a`` and ``b`` differ (floats compared exactly)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k in IGNORED or k.endswith("seconds"):
                continue
            if k not in a and k in ENVELOPE:
                continue
            if k not in a or k not in b:
                out.append(f"{where}.{k}: only in {'new' if k in b else 'baseline'}")
                continue
            diff(a[k], b[k], f"{where}.{k}", out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{where}: {len(a)} items in the baseline, {len(b)} new")
        for i, (x, y) in enumerate(zip(a, b)):
            diff(x, y, f"{where}[{i}]", out)
    elif a != b or type(a) is not type(b):
        out.append(f"{where}: baseline {a!r:.80} != new {b!r:.80}")


def compare_folders(base: Path, new: Path) -> list[str]:
    problems: list[str] = []
    for f in sorted(base.rglob("*.json")):
        rel = f.relative_to(base)
        g = new / rel
        if not g.is_file():
            problems.append(f"{rel}: missing in the new output")
            continue
        diff(json.loads(f.read_text()), json.loads(g.read_text()), str(rel), problems)
    return problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("baseline", type=Path)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--skip-run", action="store_true", help="compare an existing --out only")
    a = p.parse_args()
    out = a.out or Path(tempfile.mkdtemp(prefix="achilles-compare-"))
    if not a.skip_run:
        run_all(out)
    problems = compare_folders(a.baseline, out)
    n = len(list(a.baseline.rglob("*.json")))
    for line in problems:
        print(line)
    print(f"{n} JSON files compared with {a.baseline}: "
          + ("bit-identical" if not problems else f"{len(problems)} difference(s)"))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())

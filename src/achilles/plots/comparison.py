"""Figure 3: perplexity against the number of masked units, one line per ranking method.

Input is the ``comparison.json`` payload (:meth:`achilles.experiments.compare.Comparison.to_dict`), so a
figure can be redrawn from a saved file. Log y (perplexity) against log x (n); ``random`` is
drawn as its mean with a ±sd band; the unmasked baseline is a horizontal line. Non-finite
perplexities cannot be drawn: they are listed in a note under the axes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from achilles.model.names import model_name  # noqa: E402
from achilles.plots import save_figure
from achilles.results.files import decode_float  # noqa: E402


def _f(x: Any) -> float:
    v = decode_float(x)
    return math.nan if v is None else float(v)


def identical_curves(methods: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    """Each method mapped to the first method whose curve it repeats exactly (itself if none)."""
    first: dict[tuple, str] = {}
    out: dict[str, str] = {}
    for name, points in methods.items():
        key = tuple((p["n"], repr(_f(p["ppl"]))) for p in points)
        out[name] = first.setdefault(key, name)
    return out


def plot_comparison(data: dict[str, Any], path: str | Path, *, title: str | None = None) -> Path:
    """Draw ``data`` (a comparison payload) to ``path`` (PNG) and return the path."""
    fig, ax = plt.subplots(figsize=(8.6, 4.6), dpi=150)
    nonfinite: list[str] = []
    markers = "o^vDPX*"
    methods = data.get("methods", {})
    same = identical_curves(methods)
    for k, (name, points) in enumerate(methods.items()):
        if name in same and same[name] != name:
            continue  # drawn once, under the first name of its group
        xs = [p["n"] for p in points if math.isfinite(_f(p["ppl"]))]
        ys = [_f(p["ppl"]) for p in points if math.isfinite(_f(p["ppl"]))]
        nonfinite += [f"{name}@{p['n']}" for p in points if not math.isfinite(_f(p["ppl"]))]
        group = [m for m, first in same.items() if first == name]
        label = " = ".join(group) + " (identical)" if len(group) > 1 else name
        ax.plot(xs, ys, marker=markers[k % len(markers)], ms=5, lw=1.5, alpha=0.85, label=label)
    rnd = data.get("random")
    if rnd and rnd.get("levels"):
        pts = [p for p in rnd["levels"] if math.isfinite(_f(p["ppl_mean"]))]
        nonfinite += [f"random@{p['n']}" for p in rnd["levels"] if p not in pts]
        xs = [p["n"] for p in pts]
        mean = [_f(p["ppl_mean"]) for p in pts]
        sd = [_f(p["ppl_sd"]) if math.isfinite(_f(p["ppl_sd"])) else 0.0 for p in pts]
        line = ax.plot(xs, mean, marker="s", ms=3.5, lw=1.4, ls="--", color="0.35",
                       label=f"random (mean ± sd, {rnd.get('runs', '?')} runs)")[0]
        lo = [max(m - s, m * 1e-3) for m, s in zip(mean, sd)]  # keep the band on a log axis
        hi = [m + s for m, s in zip(mean, sd)]
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    base = _f(data.get("baseline", {}).get("ppl"))
    if math.isfinite(base):
        ax.axhline(base, color="black", lw=1, ls=":", label=f"unmasked ({base:.4g})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("number of masked units n (top-n of each ranking)")
    ax.set_ylabel("perplexity (log scale)")
    cfg = data.get("config", {})
    model = cfg.get("model", {}).get("model", "")
    ax.set_title(title or f"Masking the top-n units of each ranking: {model_name(model)}",
                 fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=True)  # off the data
    if nonfinite:
        fig.text(0.01, 0.01, "non-finite perplexity (not drawn): " + ", ".join(nonfinite),
                 fontsize=7, color="firebrick")
    fig.tight_layout(rect=(0, 0.04 if nonfinite else 0, 1, 1))
    return save_figure(fig, path, dpi="figure")  # the figure was made at 150 dpi

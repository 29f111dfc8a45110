"""Sensitivity of the critical set to the stage-1 hyper-parameters α and K (paper Figure 4).

:func:`run_sweep` reruns both stages (:func:`achilles.method.pipeline.find`) over a grid of
(α, K) points on one loaded model:

* ``grid="axes"`` (default, the paper's protocol): the α grid at the anchor K, and the K
  grid at the anchor α (the anchor point belongs to both sweeps);
* ``grid="full"``: the cross product.

Every point writes ``DIR/points/alpha=…_K=…/{ranking,identification}.json``. A point whose
``identification.json`` is already there (writes are atomic, so it is complete) is read back
instead of recomputed, so an interrupted sweep resumes where it stopped. ``DIR/sweep.json``
summarises n*(ε), the minimal-set size and the Jaccard overlap of each point's minimal set
(and top units) with the anchor point's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from achilles.config import IdentifyConfig, RankConfig
from achilles.errors import require
from achilles.experiments.overlap import jaccard
from achilles.method.compat import current_settings, refuse_mixed, run_settings, settings_mismatch
from achilles.method.identify import Identification
from achilles.method.pipeline import find
from achilles.method.ranking import Ranking
from achilles.model.loading import LoadedModel
from achilles.model.units import build_pool
from achilles.results.envelope import Enveloped
from achilles.results.files import _jsonable
from achilles.results.provenance import environment

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepConfig:
    """The (α, K) grid of a sweep.

    Args:
        alphas: the α values.
        samples: the K values.
        grid: ``"axes"`` (α grid at ``anchor_samples``, K grid at ``anchor_alpha``) or
            ``"full"`` (every pair).
        anchor_alpha: α held fixed in the K sweep; the anchor point is the reference for
            the Jaccard columns.
        anchor_samples: K held fixed in the α sweep.
        top: size of the top-of-ranking sets compared with the anchor point.
    """

    alphas: tuple[float, ...] = (1.0, 3.0, 5.0, 7.0)
    samples: tuple[int, ...] = (25, 50, 75, 100, 125)
    grid: Literal["axes", "full"] = "axes"
    anchor_alpha: float = 5.0
    anchor_samples: int = 100
    top: int = 10

    def __post_init__(self) -> None:
        require(bool(self.alphas) and bool(self.samples), "the α and K grids must be non-empty")
        require(
            all(math.isfinite(a) and a > 0 for a in (*self.alphas, self.anchor_alpha)),
            "every α (--alpha, --anchor-alpha) must be > 0",
        )
        require(
            all(k >= 1 for k in (*self.samples, self.anchor_samples)),
            "every K (--samples, --anchor-samples) must be >= 1",
        )
        require(self.grid in ("axes", "full"), "--grid must be 'axes' or 'full'")
        names: dict[str, float] = {}
        for a in sorted({*self.alphas, self.anchor_alpha}):
            other = names.setdefault(f"{a:g}", a)
            require(
                other == a,
                f"α values {other!r} and {a!r} would share the point folder alpha={a:g}: "
                "give values that differ in the first 6 significant digits",
            )
        require(self.top >= 1, "--top must be >= 1")

    def points(self) -> list[tuple[float, int]]:
        """The (α, K) points in run order, anchor first, without duplicates."""
        alphas = sorted(set(self.alphas))
        ks = sorted(set(self.samples))
        anchor = (self.anchor_alpha, self.anchor_samples)
        if self.grid == "full":
            pts = [(a, k) for a in alphas for k in ks]
        else:
            pts = [(a, self.anchor_samples) for a in alphas] + [(self.anchor_alpha, k) for k in ks]
        return list(dict.fromkeys([anchor, *pts]))


def point_name(alpha: float, samples: int) -> str:
    """Folder name of a grid point, e.g. ``alpha=5_K=100``."""
    return f"alpha={alpha:g}_K={samples}"


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The parts of a result's config that must match for a saved point to be reused."""
    c = json.loads(json.dumps(_jsonable(config)))
    ident = {k: v for k, v in c.get("identify", {}).items() if k != "batch_size"}
    rank = {k: v for k, v in c.get("ranking", {}).items() if k != "batch_size"}
    return {"model": c.get("model", {}).get("model"), "text": c.get("text"),
            "identify": ident, "ranking": rank}


def _expected_config(
    lm: LoadedModel, text: str, rank_config: RankConfig, identify_config: IdentifyConfig
) -> dict[str, Any]:
    return _comparable({
        "model": {"model": lm.spec.model},
        "text": text,
        "identify": dataclasses.asdict(identify_config),
        "ranking": dataclasses.asdict(rank_config),
    })


def find_cached(
    lm: LoadedModel,
    text: str,
    rank_config: RankConfig,
    identify_config: IdentifyConfig,
    folder: str | Path,
    *,
    progress: bool = False,
    force: bool = False,
) -> tuple[Ranking, Identification, bool]:
    """:func:`~achilles.method.pipeline.find` into ``folder``, or read it back if already done.

    Returns ``(ranking, identification, reused)``. A finished folder made with another
    model (weights), dtype, device, revision, unit pool, text or configuration is refused
    rather than silently reused (``force``: reused with a warning).
    """
    folder = Path(folder)
    rfile, ifile = folder / "ranking.json", folder / "identification.json"
    if ifile.is_file() and rfile.is_file():
        ident = Identification.load(str(ifile))
        got = _comparable(ident.config)
        want = _expected_config(lm, text, rank_config, identify_config)
        diff = sorted(k for k in want if k != "model" and got.get(k) != want[k])
        pool = build_pool(lm.model, rank_config.pool, rank_config.components)
        diff += [k for k in settings_mismatch(
            run_settings(ident.config, ident.env), current_settings(lm, text, pool)
        ) if k not in diff]
        refuse_mixed(
            f"the finished run in {folder}", diff, force=force,
            hint="use a new --out-dir (or delete that folder) to recompute",
        )
        logger.info("reusing finished run %s", folder)
        return Ranking.load(str(rfile)), ident, True
    ranking, ident = find(lm, text, rank_config, identify_config, progress=progress)
    ranking.save(str(rfile))
    ident.save(str(ifile))  # written last: its presence marks the folder finished
    return ranking, ident, False


@dataclass
class SweepPoint:
    """One (α, K) point of a sweep."""

    alpha: float
    samples: int
    axes: list[str]  # "alpha" and/or "samples" (the 1-D sweeps it belongs to), or ["grid"]
    folder: str
    n_star: int | None
    n_star_by_epsilon: dict[str, int | None]
    n_minimal: int | None
    minimal_set: list[str]
    top_units: list[str]
    jaccard_minimal_vs_anchor: float | None = None
    jaccard_top_vs_anchor: float | None = None
    same_minimal_as_anchor: bool | None = None
    reused: bool = False


@dataclass
class SweepResult(Enveloped):
    """A whole sweep (saved as ``sweep.json``)."""

    KIND = "sweep"

    sweep: SweepConfig
    epsilon: float
    max_neurons: int
    points: list[SweepPoint]
    evaluated: int
    reused: int

    @property
    def anchor(self) -> SweepPoint:
        key = (self.sweep.anchor_alpha, self.sweep.anchor_samples)
        return next(p for p in self.points if (p.alpha, p.samples) == key)

    @property
    def stable(self) -> bool:
        """Whether every point found the anchor's minimal set."""
        return all(p.same_minimal_as_anchor for p in self.points)

    def __post_init__(self) -> None:
        self.config = {**self.config, "sweep": dataclasses.asdict(self.sweep)}

    def fields(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon,
            "max_neurons": self.max_neurons,
            "anchor": {"alpha": self.sweep.anchor_alpha, "samples": self.sweep.anchor_samples},
            "stable": self.stable,
            "evaluated": self.evaluated,
            "reused": self.reused,
            "points": [dataclasses.asdict(p) for p in self.points],
        }

    def summary(self) -> str:
        """A table of the points, one line each."""
        lines = [f"{'alpha':>8} {'K':>6} {'n*':>6} {'|min|':>6} {'J(min)':>7} {'J(top)':>7}"]

        def f(x: float | None) -> str:
            return "-" if x is None else f"{x:.2f}"

        for p in self.points:
            lines.append(
                f"{p.alpha:>8g} {p.samples:>6} {p.n_star if p.n_star is not None else '-':>6} "
                f"{p.n_minimal if p.n_minimal is not None else '-':>6} "
                f"{f(p.jaccard_minimal_vs_anchor):>7} {f(p.jaccard_top_vs_anchor):>7}"
            )
        lines.append(
            f"{self.evaluated} point(s) computed, {self.reused} reused; minimal set "
            f"{'identical at every point' if self.stable else 'varies across points'} "
            f"(anchor α={self.sweep.anchor_alpha:g}, K={self.sweep.anchor_samples})"
        )
        return "\n".join(lines)


def run_sweep(
    lm: LoadedModel,
    text: str,
    rank_config: RankConfig,
    identify_config: IdentifyConfig,
    sweep: SweepConfig,
    out_dir: str | Path,
    *,
    progress: bool = False,
    force: bool = False,
) -> SweepResult:
    """Run both stages at every point of ``sweep`` (resuming finished points) and summarise.

    ``rank_config``'s α and K are replaced at each point; everything else is kept.
    """
    out_dir = Path(out_dir)
    grid = sweep.points()
    alpha_set, k_set = set(sweep.alphas), set(sweep.samples)
    points: list[SweepPoint] = []
    minimal: dict[tuple[float, int], set[tuple[str, int]]] = {}
    tops: dict[tuple[float, int], set[tuple[str, int]]] = {}
    evaluated = reused = 0
    for i, (a, k) in enumerate(grid):
        folder = out_dir / "points" / point_name(a, k)
        logger.info("sweep point %d/%d: α=%g, K=%d", i + 1, len(grid), a, k)
        rcfg = dataclasses.replace(rank_config, alpha=a, samples=k)
        ranking, ident, was_reused = find_cached(
            lm, text, rcfg, identify_config, folder, progress=progress, force=force
        )
        reused += was_reused
        evaluated += not was_reused
        if sweep.grid == "full":
            axes = ["grid"]
        else:
            axes = [n for n, ok in (("alpha", k == sweep.anchor_samples and a in alpha_set),
                                    ("samples", a == sweep.anchor_alpha and k in k_set)) if ok]
        minimal[(a, k)] = {u.key for u in ident.minimal_set}
        tops[(a, k)] = {u.key for u in ranking.units[: sweep.top]}
        points.append(SweepPoint(
            alpha=a,
            samples=k,
            axes=axes or ["anchor"],
            folder=str(folder.relative_to(out_dir)),
            n_star=ident.n_star,
            n_star_by_epsilon=dict(ident.n_star_by_epsilon),
            n_minimal=len(ident.minimal_set) if ident.found else None,
            minimal_set=[str(u) for u in ident.minimal_set],
            top_units=[str(u) for u in ranking.units[: sweep.top]],
            reused=was_reused,
        ))
    anchor = (sweep.anchor_alpha, sweep.anchor_samples)
    for p in points:
        key = (p.alpha, p.samples)
        p.jaccard_minimal_vs_anchor = jaccard(minimal[key], minimal[anchor])
        p.jaccard_top_vs_anchor = jaccard(tops[key], tops[anchor])
        p.same_minimal_as_anchor = minimal[key] == minimal[anchor]
    logger.info("sweep: %d point(s) computed, %d reused", evaluated, reused)
    return SweepResult(
        sweep=sweep,
        epsilon=identify_config.epsilon,
        max_neurons=identify_config.max_neurons,
        points=points,
        evaluated=evaluated,
        reused=reused,
        config={
            "model": dataclasses.asdict(lm.spec),
            "text": text,
            "rank": dataclasses.asdict(rank_config),
            "identify": dataclasses.asdict(identify_config),
        },
        env=environment(lm.model),
    )

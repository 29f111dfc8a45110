"""Set overlap between runs: Jaccard indices, rank correlation, and run-folder comparison.

Two identities of a unit are used:

* **within one model** (robustness across texts, sweeps): ``(module, channel)``, i.e.
  :attr:`achilles.model.units.Unit.key`;
* **across models** (base vs fine-tuned checkpoints of one architecture):
  ``(layer, component, channel)``, which does not depend on module paths, so two checkpoints
  whose modules are named differently still compare.

:func:`compare_runs` compares two run folders (``ranking.json`` + ``identification.json``,
as written by ``achilles find``) and returns an :class:`Overlap`, saved as ``overlap.json``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from achilles.errors import AchillesError
from achilles.method.identify import Identification
from achilles.method.ranking import Ranking
from achilles.model.units import Unit
from achilles.results.envelope import Enveloped
from achilles.results.provenance import environment

logger = logging.getLogger(__name__)

ArchKey = tuple[int, str, int]
"""A unit's identity across models: ``(layer, component, channel)``."""


def jaccard(a: Iterable[Hashable], b: Iterable[Hashable]) -> float | None:
    """|A ∩ B| / |A ∪ B|; ``None`` when both sets are empty (the index is undefined)."""
    sa, sb = set(a), set(b)
    union = sa | sb
    if not union:
        return None
    return len(sa & sb) / len(union)


def arch_key(u: Unit) -> ArchKey:
    """The cross-model identity of ``u``."""
    return (u.layer, u.component, u.channel)


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation of paired values (no ties expected: they are ranks).

    ``None`` for fewer than two pairs or a constant series.
    """
    if len(x) != len(y):
        raise ValueError("spearman needs paired values")
    n = len(x)
    if n < 2:
        return None

    def ranks(v: Sequence[float]) -> list[float]:
        order = sorted(range(n), key=lambda i: v[i])
        r = [0.0] * n
        for pos, i in enumerate(order):
            r[i] = float(pos)
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return None
    return cov / math.sqrt(vx * vy)


def _key_dict(k: ArchKey) -> dict[str, Any]:
    return {"layer": k[0], "component": k[1], "channel": k[2]}


def _key_str(k: ArchKey) -> str:
    return f"L{k[0]}.{k[1]}[{k[2]}]"


@dataclass
class RunFolder:
    """A run folder's results: its ranking and (when present) its identification."""

    path: Path
    ranking: Ranking
    identification: Identification | None

    @classmethod
    def load(cls, path: str | Path) -> RunFolder:
        """Read ``path/ranking.json`` and, if present, ``path/identification.json``."""
        p = Path(path)
        if not p.is_dir():
            raise AchillesError(f"run folder not found: {p} (give a folder written by `achilles find`)")
        rfile = p / "ranking.json"
        if not rfile.is_file():
            raise AchillesError(f"{p} has no ranking.json: give a folder written by `achilles find`")
        ifile = p / "identification.json"
        ident = Identification.load(str(ifile)) if ifile.is_file() else None
        return cls(p, Ranking.load(str(rfile)), ident)


@dataclass
class Overlap(Enveloped):
    """Comparison of two runs by ``(layer, component, channel)`` (saved as ``overlap.json``)."""

    KIND = "overlap"

    run_a: str
    run_b: str
    top: int
    model_type: str
    same_size: bool
    jaccard_minimal: float | None
    jaccard_critical: float | None
    jaccard_top: float | None
    spearman_top: float | None
    shared_minimal: list[ArchKey]
    shared_critical: list[ArchKey]
    shared_top: list[tuple[ArchKey, int, int]]  # key, rank in A, rank in B (1-based)
    sizes: dict[str, dict[str, int | None]]

    def __post_init__(self) -> None:
        self.config = {**self.config, "run_a": self.run_a, "run_b": self.run_b, "top": self.top,
                       "identity": "(layer, component, channel)"}

    def fields(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "same_size": self.same_size,
            "sizes": self.sizes,
            "jaccard_minimal": self.jaccard_minimal,
            "jaccard_critical": self.jaccard_critical,
            "jaccard_top": self.jaccard_top,
            "spearman_top": self.spearman_top,
            "shared_minimal": [_key_dict(k) for k in self.shared_minimal],
            "shared_critical": [_key_dict(k) for k in self.shared_critical],
            "shared_top": [
                {**_key_dict(k), "rank_a": ra, "rank_b": rb} for k, ra, rb in self.shared_top
            ],
        }

    def summary(self) -> str:
        """A few human lines."""

        def f(x: float | None) -> str:
            return "-" if x is None else f"{x:.3f}"

        shared = ", ".join(_key_str(k) for k in self.shared_minimal[:10]) or "none"
        return "\n".join([
            f"model type: {self.model_type}{'' if self.same_size else ' (different sizes)'}",
            f"Jaccard minimal sets: {f(self.jaccard_minimal)}   critical sets: "
            f"{f(self.jaccard_critical)}   top-{self.top}: {f(self.jaccard_top)}",
            f"shared top-{self.top} units: {len(self.shared_top)}, Spearman of their ranks: "
            f"{f(self.spearman_top)}",
            f"shared minimal-set units: {shared}",
        ])


def _check_same_architecture(a: RunFolder, b: RunFolder) -> bool:
    """Refuse different architectures; return whether the pools also have the same size."""
    pa, pb = a.ranking.pool, b.ranking.pool
    if pa.get("model_type") != pb.get("model_type"):
        raise AchillesError(
            f"{a.path} is a {pa.get('model_type')!r} run and {b.path} a {pb.get('model_type')!r} "
            "run: overlap compares runs of one architecture"
        )
    ca, cb = set(pa.get("components") or []), set(pb.get("components") or [])
    if ca != cb:
        raise AchillesError(
            f"the runs rank different component sets ({', '.join(sorted(ca))} vs "
            f"{', '.join(sorted(cb))}): rerun one with the other's --pool/--components"
        )
    same = (pa.get("n_units"), pa.get("units_per_component")) == (
        pb.get("n_units"), pb.get("units_per_component")
    )
    if not same:
        logger.warning(
            "the runs' models have different sizes (%s vs %s units); comparing by "
            "(layer, component, channel) anyway", pa.get("n_units"), pb.get("n_units"),
        )
    return same


def compare_runs(run_a: str | Path, run_b: str | Path, *, top: int = 100) -> Overlap:
    """Compare two run folders of one architecture by ``(layer, component, channel)``."""
    if top < 1:
        raise AchillesError("--top must be >= 1")
    a, b = RunFolder.load(run_a), RunFolder.load(run_b)
    same = _check_same_architecture(a, b)

    def keys(units: Sequence[Unit]) -> list[ArchKey]:
        return [arch_key(u) for u in units]

    top_a = keys(a.ranking.units[:top])
    top_b = keys(b.ranking.units[:top])
    if min(len(top_a), len(top_b)) < top:
        logger.warning("a ranking holds fewer than %d units; comparing what it has", top)
    rank_b = {k: i + 1 for i, k in enumerate(top_b)}
    shared_top = [(k, i + 1, rank_b[k]) for i, k in enumerate(top_a) if k in rank_b]
    rho = spearman([float(r) for _, r, _ in shared_top], [float(r) for _, _, r in shared_top])

    ia, ib = a.identification, b.identification
    both = ia is not None and ib is not None
    if not both:
        logger.warning("a run folder has no identification.json: set overlaps are not reported")

    def set_overlap(attr: str) -> tuple[float | None, list[ArchKey]]:
        if not both:
            return None, []
        sa, sb = keys(getattr(ia, attr)), keys(getattr(ib, attr))
        shared_set = set(sb)
        return jaccard(sa, sb), [k for k in sa if k in shared_set]

    j_min, shared_min = set_overlap("minimal_set")
    j_crit, shared_crit = set_overlap("critical_set")

    def sizes(r: RunFolder) -> dict[str, int | None]:
        i = r.identification
        return {
            "n_units": r.ranking.pool.get("n_units"),
            "ranking": len(r.ranking.neurons),
            "critical": len(i.critical_set) if i else None,
            "minimal": len(i.minimal_set) if i else None,
        }

    return Overlap(
        run_a=str(a.path),
        run_b=str(b.path),
        top=top,
        model_type=str(a.ranking.pool.get("model_type")),
        same_size=same,
        jaccard_minimal=j_min,
        jaccard_critical=j_crit,
        jaccard_top=jaccard(top_a, top_b),
        spearman_top=rho,
        shared_minimal=shared_min,
        shared_critical=shared_crit,
        shared_top=shared_top,
        sizes={"a": sizes(a), "b": sizes(b)},
        env=environment(),
    )

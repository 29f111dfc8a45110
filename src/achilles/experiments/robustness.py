"""Robustness of the critical set across input texts (paper §6).

:func:`run_robustness` runs both stages on each text with one loaded model and compares the
results pairwise by unit identity ``(module, channel)``: Jaccard overlap of the minimal
sets, of the critical sets, and of the top-N rankings. Each text's run is written to
``DIR/texts/<label>/`` (finished ones are reused, as in a sweep); the comparison is an
:class:`Robustness`, saved as ``robustness.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from achilles.config import IdentifyConfig, RankConfig
from achilles.errors import AchillesError, require
from achilles.experiments.overlap import jaccard
from achilles.experiments.sweep import find_cached
from achilles.model.loading import LoadedModel
from achilles.results.envelope import Enveloped
from achilles.results.inputs import read_text_input
from achilles.results.provenance import environment

logger = logging.getLogger(__name__)

Matrix = list[list[float | None]]


@dataclass(frozen=True)
class LabelledText:
    """An input text and its label (the file stem on the command line)."""

    label: str
    text: str


def safe_label(name: str) -> str:
    """``name`` as a folder name that stays inside its parent: runs of characters other
    than letters, digits, ``_``, ``-`` and ``.`` become ``_``; leading/trailing dots go
    (``..`` or ``...`` would climb out); empty becomes ``text``."""
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip(".")
    return label or "text"


def texts_from_files(paths: Sequence[str]) -> list[LabelledText]:
    """Read the text files, labelled by sanitised file stem (see :func:`safe_label`);
    refuse fewer than two, unreadable ones, or clashing labels."""
    require(
        len(paths) >= 2,
        f"robustness compares texts: give at least two --text-file (got {len(paths)})",
    )
    out: list[LabelledText] = []
    for p in map(Path, paths):
        text = read_text_input(p, "--text-file")
        out.append(LabelledText(safe_label(p.stem), text))
    labels = [t.label for t in out]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise AchillesError(f"text files share the label {dup[0]!r} (the file stem, sanitised): rename one")
    return out


@dataclass
class TextRun:
    """One text's result, as compared."""

    label: str
    tokens: int
    n_star: int | None
    n_minimal: int | None
    minimal_set: list[str]
    critical_set: list[str]
    top_units: list[str]
    folder: str
    reused: bool = False


@dataclass
class Robustness(Enveloped):
    """Pairwise overlaps of the texts' results (saved as ``robustness.json``)."""

    KIND = "robustness"

    labels: list[str]
    top: int
    runs: list[TextRun]
    jaccard_minimal: Matrix
    jaccard_critical: Matrix
    jaccard_top: Matrix
    shared_minimal: list[str]

    @property
    def identical_minimal(self) -> bool:
        """Whether every text found a minimal set, and the same one."""
        sets = [set(r.minimal_set) for r in self.runs]
        return all(r.n_star is not None for r in self.runs) and all(s == sets[0] for s in sets)

    def fields(self) -> dict[str, Any]:
        return {
            "identity": "(module, channel)",
            "labels": self.labels,
            "top": self.top,
            "identical_minimal": self.identical_minimal,
            "shared_minimal": self.shared_minimal,
            "texts": [dataclasses.asdict(r) for r in self.runs],
            "jaccard_minimal": self.jaccard_minimal,
            "jaccard_critical": self.jaccard_critical,
            "jaccard_top": self.jaccard_top,
        }

    def summary(self) -> str:
        """Per-text sets and the minimal-set Jaccard matrix as text."""
        lines = []
        for r in self.runs:
            units = ", ".join(r.minimal_set[:8]) + (" ..." if len(r.minimal_set) > 8 else "")
            n = "-" if r.n_star is None else r.n_star
            lines.append(f"{r.label}: n* = {n}, minimal set ({len(r.minimal_set)}): {units or 'none'}")
        w = max(len(x) for x in self.labels)
        lines.append("Jaccard of minimal sets:")
        for lab, row in zip(self.labels, self.jaccard_minimal, strict=True):
            cells = " ".join("   -" if v is None else f"{v:4.2f}" for v in row)
            lines.append(f"  {lab:>{w}} {cells}")
        verdict = "identical" if self.identical_minimal else "not identical"
        lines.append(f"minimal sets are {verdict} across texts; shared by all: "
                     f"{', '.join(self.shared_minimal) or 'none'}")
        return "\n".join(lines)


def pairwise(sets: Sequence[set[Any]]) -> Matrix:
    """The matrix of :func:`~achilles.experiments.overlap.jaccard` indices between ``sets``."""
    return [[jaccard(a, b) for b in sets] for a in sets]


def run_robustness(
    lm: LoadedModel,
    texts: Sequence[LabelledText],
    rank_config: RankConfig,
    identify_config: IdentifyConfig,
    out_dir: str | Path,
    *,
    top: int = 100,
    progress: bool = False,
    force: bool = False,
) -> Robustness:
    """Find the critical set of every text and compare the results pairwise."""
    if len(texts) < 2:
        raise AchillesError("robustness compares texts: give at least two")
    require(top >= 1, "--top must be >= 1")
    out_dir = Path(out_dir)
    runs: list[TextRun] = []
    minimal, critical, tops = [], [], []
    by_key: dict[tuple[str, int], str] = {}
    labels = [t.label for t in texts]
    require(
        all(safe_label(x) == x for x in labels) and len(set(labels)) == len(labels),
        f"text labels must be unique folder names (letters, digits, '_', '-', '.'), got {labels}",
    )
    for i, t in enumerate(texts):
        logger.info("text %d/%d: %s", i + 1, len(texts), t.label)
        folder = out_dir / "texts" / t.label
        ranking, ident, reused = find_cached(
            lm, t.text, rank_config, identify_config, folder, progress=progress, force=force
        )
        minimal.append({u.key for u in ident.minimal_set})
        critical.append({u.key for u in ident.critical_set})
        tops.append({u.key for u in ranking.units[:top]})
        by_key.update({u.key: str(u) for u in ident.minimal_set})
        runs.append(TextRun(
            label=t.label,
            tokens=ident.tokens + 1,
            n_star=ident.n_star,
            n_minimal=len(ident.minimal_set) if ident.found else None,
            minimal_set=[str(u) for u in ident.minimal_set],
            critical_set=[str(u) for u in ident.critical_set],
            top_units=[str(u) for u in ranking.units[:top]],
            folder=str(folder.relative_to(out_dir)),
            reused=reused,
        ))
    shared = set.intersection(*minimal)
    return Robustness(
        labels=[t.label for t in texts],
        top=top,
        runs=runs,
        jaccard_minimal=pairwise(minimal),
        jaccard_critical=pairwise(critical),
        jaccard_top=pairwise(tops),
        shared_minimal=sorted(by_key[k] for k in shared),
        config={
            "model": dataclasses.asdict(lm.spec),
            "texts": {t.label: t.text for t in texts},
            "rank": dataclasses.asdict(rank_config),
            "identify": dataclasses.asdict(identify_config),
        },
        env=environment(lm.model),
    )

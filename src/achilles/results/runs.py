"""A run owns its folder: result files another run left there are removed, through one function.

:func:`clear_other_runs` is the one place achilles deletes results of another run from a
run folder. It deletes only what it can prove achilles made: a file of a known result name
at the top of the folder that parses as an achilles result (``schema_version`` and
``kind``) with another run id (or none: made before run ids), and that result's figure
beside it (``comparison.png``). Anything else in the folder is left alone.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from achilles.results.envelope import run_id_of

logger = logging.getLogger(__name__)

RUN_RESULTS = (
    "ranking.json", "identification.json", "analysis.json", "mechanism.json",
    "comparison.json", "heldout.json", "downstream.json", "compression.json",
)
"""The result files a run folder may hold, one per kind of result."""

FIGURE_OF = {"comparison.json": "comparison.png", "downstream.json": "downstream.png",
             "compression.json": "compression.png"}
"""The figure a command writes beside its result file."""


def result_run(path: Path) -> tuple[bool, str | None]:
    """Whether ``path`` is an achilles result file, and the run id it records."""
    try:
        if path.is_symlink() or not path.is_file():
            return False, None
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return False, None
    if not isinstance(data, dict) or "kind" not in data or "schema_version" not in data:
        return False, None
    return True, run_id_of(data)


def clear_other_runs(folder: str | Path, run_id: str) -> list[Path]:
    """Remove from ``folder`` the result files (and their figures) of runs other than
    ``run_id``; returns what was removed. Call it after the folder is claimed."""
    folder = Path(folder)
    removed: list[Path] = []
    for name in RUN_RESULTS:
        path = folder / name
        made, rid = result_run(path)
        if not made or rid == run_id:
            continue
        for p in (path, *([folder / FIGURE_OF[name]] if name in FIGURE_OF else [])):
            if p.is_file() and not p.is_symlink():
                p.unlink()
                removed.append(p)
    if removed:
        logger.warning("%s held results of another run; removed %s", folder,
                       ", ".join(p.name for p in removed))
    return removed

"""One census task: ``find`` (and the report) for one model in its own run folder.

A run folder is made through the deletion guard (:func:`achilles.results.guard.make_dir`): its
``.achilles-made`` marker records the model it is made for (:func:`model_key`). It is
*done* only when its completion marker ``census_run.json`` exists and it was made for the
same model; the completion marker is written atomically after every other file, and
carries the model's summary row. A task that finds its run done does nothing; a folder
without one (an interrupted or failed earlier attempt) is removed through the guard (only
if the census made it) and the model is run from scratch. A task never raises for a
model that fails: it writes ``census_error.json`` with the error and returns a failed row,
so one bad model does not stop the others.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from achilles.config import IdentifyConfig, RankConfig
from achilles.results.envelope import envelope, new_run_id
from achilles.results.files import _jsonable, write_json
from achilles.results.provenance import environment
from achilles.results.schema import read_json
from achilles.scale.census.models import ModelEntry

logger = logging.getLogger(__name__)

DONE_FILE = "census_run.json"
ERROR_FILE = "census_error.json"
RUNS_DIR = "runs"


@dataclass(frozen=True)
class CensusSettings:
    """What every model of a census runs: the text and both stages' settings."""

    text: str
    rank: RankConfig
    identify: IdentifyConfig
    report: bool = True
    explain: bool = True  # as `achilles find`: mechanism.json for a found set


@dataclass(frozen=True)
class Task:
    """One model and the folder its run goes to."""

    entry: ModelEntry
    run_dir: str


def run_dir_of(out_dir: str | Path, entry: ModelEntry) -> Path:
    return Path(out_dir) / RUNS_DIR / entry.name


def model_key(entry: ModelEntry) -> str:
    """What a run is made from: a local model's resolved path, or ``hub:ID@REVISION``."""
    local = Path(entry.spec.model).expanduser()
    if local.exists():
        return f"path:{os.path.realpath(local)}"
    return f"hub:{entry.spec.model}@{entry.spec.revision or 'default'}"


def made_for(run_dir: str | Path) -> str | None:
    """The model key a census run folder was made for (``None``: not a census run folder)."""
    from achilles.results.guard import read_mark

    record = read_mark(run_dir)
    if record is None or record.get("command") != "census":
        return None
    return record.get("model")


def _legacy_done_for(run_dir: str | Path, entry: ModelEntry) -> bool:
    """A finished run made before run folders were marked, of ``entry``'s model (read, never deleted)."""
    from achilles.errors import AchillesError

    try:
        done = read_json(Path(run_dir) / DONE_FILE, kind="census_run")
    except AchillesError:
        return False
    model = (done.get("config") or {}).get("model")
    return isinstance(model, dict) and model.get("model") == entry.spec.model


def is_done(run_dir: str | Path, entry: ModelEntry | None = None) -> bool:
    """Whether ``run_dir`` holds a finished run (of ``entry``'s model, when given)."""
    if not (Path(run_dir) / DONE_FILE).is_file() or Path(run_dir).is_symlink():
        return False
    if entry is None:
        return True
    made = made_for(run_dir)
    return made == model_key(entry) if made is not None else _legacy_done_for(run_dir, entry)


def run_dir_problem(run_dir: str | Path, entry: ModelEntry) -> str | None:
    """Why the census cannot use ``run_dir`` for ``entry`` (``None``: it can)."""
    p = Path(run_dir)
    if p.is_symlink():
        return f"{p} is a symbolic link: the census writes only into folders it made; remove the link"
    if not p.exists():
        return None
    if not p.is_dir():
        return f"{p} is a file, not a run folder: move it away"
    made = made_for(p)
    if made is None and _legacy_done_for(p, entry):
        return None  # finished before run folders were marked: reused, never deleted
    if made is None:
        return (f"{p} was not made by this census (no .achilles-made marker): move it away or "
                "choose another --out-dir")
    if made != model_key(entry):
        return (f"{p} holds a run of another model ({made.split(':', 1)[1]}), not "
                f"{entry.spec.model}: give this model another --name, or use another --out-dir")
    return None


def _relative_depth(layer: int, n_layers: int) -> float:
    return layer / (n_layers - 1) if n_layers > 1 else 0.0


def summary_row(entry: ModelEntry, lm: Any, ranking: Any, ident: Any, wall_s: float) -> dict[str, Any]:
    """The census row of one finished run (stored in its completion marker)."""
    cfg = lm.model.config
    n_layers = int(cfg.num_hidden_layers if hasattr(cfg, "num_hidden_layers") else cfg.n_layer)
    units = ident.minimal_set or ident.critical_set
    components: dict[str, int] = {}
    for u in units:
        components[u.component] = components.get(u.component, 0) + 1
    pool_units = int(ranking.pool["n_units"])
    total = pool_units * ranking.tokens  # the study's |N|: channels per token × tokens
    return {
        "name": entry.name,
        "model": entry.spec.model,
        "status": "ok",
        "error": None,
        "model_type": cfg.model_type,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "params": sum(p.numel() for p in lm.model.parameters()),
        "layers": n_layers,
        "pool_units": pool_units,
        "tokens": ranking.tokens,
        "n_units_total": total,
        "epsilon": ident.epsilon,
        "n_star": ident.n_star,
        "delta_critical": ident.delta_critical,
        "n_minimal": len(ident.minimal_set) if ident.found else None,
        "delta_minimal": ident.delta_minimal,
        "minimal_set": [str(u) for u in ident.minimal_set],
        "critical_layers": sorted({u.layer for u in units}),
        "relative_depths": [_relative_depth(u.layer, n_layers) for u in units],
        "unit_components": [u.component for u in units],
        "components": components,
        "ratio": ident.n_star / total if ident.n_star else None,
        "wall_s": wall_s,
    }


def run_config(entry: ModelEntry, settings: CensusSettings) -> dict[str, Any]:
    """What a finished run was made with (stored in its marker, compared on resume)."""
    return {"model": asdict(entry.spec), "rank": asdict(settings.rank),
            "identify": asdict(settings.identify), "report": settings.report,
            "explain": settings.explain, "text": settings.text}


def check_resumable(run_dir: str | Path, entry: ModelEntry, settings: CensusSettings) -> None:
    """Refuse to reuse a finished run made with other settings (a silent mix otherwise)."""
    from achilles.errors import AchillesError

    old = read_json(Path(run_dir) / DONE_FILE, kind="census_run").get("config", {})
    new = json.loads(json.dumps(_jsonable(run_config(entry, settings))))
    for key in new:
        if old.get(key) != new[key]:
            what = key
            if isinstance(new[key], dict):
                diff = [k for k in new[key] if (old.get(key) or {}).get(k) != new[key][k]]
                what = ", ".join(f"{key}.{k}" for k in diff) or key
            raise AchillesError(
                f"{run_dir} was made with other settings ({what} differ): rerun with the same "
                "options, or use another --out-dir"
            )


def failed_row(entry: ModelEntry, status: str, error: str | None) -> dict[str, Any]:
    return {"name": entry.name, "model": entry.spec.model, "status": status, "error": error}


def run_task(task: Task, settings: CensusSettings, progress: bool = False) -> dict[str, Any]:
    """Run (or skip, if done) one model of a census; never raises for a failing model."""
    from achilles.errors import AchillesError
    from achilles.method.pipeline import find, preflight, prepare
    from achilles.model.loading import load_model
    from achilles.results.guard import make_dir, remove_made

    run_dir = Path(task.run_dir)
    entry = task.entry
    problem = run_dir_problem(run_dir, entry)
    if problem is not None:  # checked before the census started; changed since
        return failed_row(entry, "failed", problem)
    if is_done(run_dir, entry):
        return read_json(run_dir / DONE_FILE, kind="census_run")["row"]
    try:
        if run_dir.exists():
            logger.info("%s: removing an unfinished earlier attempt", entry.name)
            remove_made(run_dir, "census")
        make_dir(run_dir, "census", model=model_key(entry), name=entry.name)
    except (AchillesError, OSError) as e:
        return failed_row(entry, "failed", str(e))
    if not progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()  # workers run side by side
    start = time.perf_counter()
    lm = None
    run = None  # the prepared run, once there is one: its id names a failure after it
    try:
        checked = preflight(entry.spec, text=settings.text, rank_config=settings.rank,
                            truncate=False)
        lm = load_model(entry.spec, tokenizer=checked.skeleton.tokenizer)
        run = prepare(lm, checked)
        ranking, ident = find(lm, run, settings.rank, settings.identify, progress=progress)
        ranking.save(run_dir / "ranking.json")
        ident.save(str(run_dir / "identification.json"))
        if settings.explain and ident.found:
            from achilles.explain import ExplainConfig, explain_run

            explain_run(run_dir, lm, ExplainConfig(), progress=progress, prepared=run, ident=ident)
        if settings.report:
            from achilles.analysis.run import analyze_for_report
            from achilles.report import write_report

            # identify already re-checked in float32; the report renders the analysis
            write_report(run_dir, analyze_for_report(run_dir, lm, prepared=run,
                                                     results=(ranking, ident), fp32=False))
        row = summary_row(entry, lm, ranking, ident, time.perf_counter() - start)
        row["report"] = "report.html" if settings.report else None
        write_json(run_dir / DONE_FILE, {
            **envelope("census_run", config=run_config(entry, settings), env=environment(lm.model),
                       run_id=run.run_id),
            "row": row,
        })
        return row
    except Exception as e:  # noqa: BLE001 - one model's failure must not stop the census
        message = f"{type(e).__name__}: {e}".strip().splitlines()[0]
        logger.error("%s failed: %s", entry.name, message)
        write_json(run_dir / ERROR_FILE, {
            **envelope("census_error", config=run_config(entry, settings),
                       run_id=run.run_id if run is not None else new_run_id()),
            "model": entry.spec.model,
            "error": message,
            "traceback": traceback.format_exc(),
            "wall_s": time.perf_counter() - start,
        })
        return failed_row(entry, "failed", message)
    finally:
        del lm
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is a dependency
            pass


def collect(out_dir: str | Path, entries: list[ModelEntry]) -> list[dict[str, Any]]:
    """The census rows, read from the run folders: done, failed, interrupted or missing."""
    rows = []
    for entry in entries:
        run_dir = run_dir_of(out_dir, entry)
        problem = run_dir_problem(run_dir, entry)
        if problem is not None:
            rows.append(failed_row(entry, "failed", problem))
        elif is_done(run_dir, entry):
            rows.append(read_json(run_dir / DONE_FILE, kind="census_run")["row"])
        elif (run_dir / ERROR_FILE).is_file():
            rows.append(failed_row(entry, "failed", read_json(run_dir / ERROR_FILE)["error"]))
        elif run_dir.exists():
            rows.append(failed_row(entry, "interrupted", "the run stopped before finishing; rerun the census"))
        else:
            rows.append(failed_row(entry, "missing", "not run yet"))
    return rows

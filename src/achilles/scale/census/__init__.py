"""Multi-model studies: ``find`` + report for every model of a list, resumably, and a summary.

Layout of a census folder::

    DIR/runs/<name>/          one run folder per model (ranking, identification, report)
    DIR/runs/<name>/census_run.json   completion marker (written last, atomically)
    DIR/summary.{csv,json,md} one row per model
    DIR/figures/depth.png     critical units' relative depth per model (the study's Figure 2)
    DIR/figures/scale.png     n* and Δ against model size
    DIR/slurm/                submitit's logs (slurm launcher)

:func:`run_census` checks every input first (no output inside a model of the list, run
names that are folder names, run folders the census made for the same model, the out
folder, then each model's config, tokenizer, text length and unit pool, on the meta
device), holds the census folder (:func:`achilles.results.lock.claim_dir`: a second census into it is
refused), runs what is not done yet through a launcher (:mod:`achilles.scale.census.launch`), and
writes the summary from the run folders. Run folders carry the deletion guard's marker
(:mod:`achilles.results.guard`); the census deletes no other folder.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from achilles.errors import AchillesError
from achilles.results.files import check_destination
from achilles.results.lock import claim_dir
from achilles.results.paths import check_apart
from achilles.scale.census.models import ModelEntry, check_name, read_model_list
from achilles.scale.census.run import (
    RUNS_DIR,
    CensusSettings,
    Task,
    check_resumable,
    collect,
    is_done,
    run_dir_of,
    run_dir_problem,
)
from achilles.scale.census.summary import SummaryFiles, write_summary

logger = logging.getLogger(__name__)

__all__ = ["CensusResult", "CensusSettings", "ModelEntry", "read_model_list", "run_census"]


@dataclass
class CensusResult:
    """What a census call did: the summary rows, the files, and how many models it ran."""

    rows: list[dict[str, Any]]
    files: SummaryFiles | None
    ran: int
    skipped: int
    job_ids: list[str] = dataclasses.field(default_factory=list)

    @property
    def complete(self) -> bool:
        return all(r["status"] == "ok" for r in self.rows)


def preflight_entries(entries: list[ModelEntry], settings: CensusSettings) -> None:
    """Validate each model (config, tokenizer, text length, unit pool) before any long work."""
    from achilles.method.pipeline import preflight

    for e in entries:
        try:
            preflight(e.spec, text=settings.text, rank_config=settings.rank)
        except AchillesError as err:
            raise AchillesError(f"model {e.name!r} of the list: {err}") from None


DEFAULT_GPU_MEMORY = "80GiB"


def _local_gpu_memory() -> str:
    import torch

    return f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.3f}GiB"


def gpus_needed(entries: list[ModelEntry], gpu_memory: str = DEFAULT_GPU_MEMORY) -> list[int]:
    """GPUs each model needs (``achilles plan`` at its dtype, bfloat16 for ``auto``)."""
    from achilles.scale.plan import PlanConfig, plan_entry

    out = []
    for e in entries:
        p = plan_entry(e, PlanConfig(gpu_memory=gpu_memory))
        if p.gpus is None:
            raise AchillesError(f"model {e.name!r} does not fit on 64 GPUs of {gpu_memory}")
        out.append(p.gpus)
    return out


def run_census(
    entries: list[ModelEntry],
    settings: CensusSettings,
    out_dir: str | Path,
    *,
    launcher: str = "local",
    jobs: int = 1,
    gpus_per_job: int | None = None,
    gpu_memory: str | None = None,
    slurm: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    progress: bool = False,
) -> CensusResult:
    """Run every model of ``entries`` not yet done, then write the summary.

    Args:
        launcher: ``local`` (a process pool of ``jobs`` workers) or ``slurm`` (submitit).
        gpus_per_job: GPUs per model; default: from ``achilles plan`` where GPUs are used.
        gpu_memory: memory of one GPU for that plan (default: the first visible GPU's for
            ``local``, ``DEFAULT_GPU_MEMORY`` for ``slurm``).
        slurm: options of :func:`~achilles.scale.census.launch.run_slurm` (``partition``,
            ``timeout_min``, ``cluster``, ``wait``).
        config: recorded in ``summary.json`` (the command line's resolved options).
    """
    from achilles.scale.census import launch

    if not entries:
        raise AchillesError("the model list is empty")
    if launcher not in launch.LAUNCHERS:
        raise AchillesError(f"unknown launcher {launcher!r}: choose {' or '.join(launch.LAUNCHERS)}")
    if jobs < 1:
        raise AchillesError("--jobs must be >= 1")
    if gpus_per_job is not None and gpus_per_job < 1:
        raise AchillesError("--gpus-per-job must be >= 1 (or left out: sized by `achilles plan`)")
    if (slurm or {}).get("timeout_min", 1) < 1:
        raise AchillesError("--slurm-timeout must be >= 1 minute")
    if launcher == "slurm":
        launch._import_submitit()
    check_apart([(f"model {e.name!r} of the list", e.spec.model) for e in entries],
                [("--out-dir", out_dir)])
    for e in entries:
        check_name(e.name, f"model {e.spec.model}")
    if (Path(out_dir).expanduser() / RUNS_DIR).is_symlink():
        raise AchillesError(f"{Path(out_dir) / RUNS_DIR} is a symbolic link: the census writes only "
                            "into folders it made; remove the link")
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise AchillesError("two models of the list share a run name: give each its own --name")
    for e in entries:
        problem = run_dir_problem(run_dir_of(out_dir, e), e)
        if problem is not None:
            raise AchillesError(problem)
    check_destination(out_dir, "dir", flag="--out-dir")  # before any long work; creates nothing
    todo = [e for e in entries if not is_done(run_dir_of(out_dir, e), e)]
    for e in entries:
        if e not in todo:
            check_resumable(run_dir_of(out_dir, e), e, settings)
    preflight_entries(todo, settings)  # before the out folder exists: bad input leaves nothing
    with claim_dir(out_dir, flag="--out-dir") as out:  # one census at a time in a folder
        return _run_claimed(entries, todo, settings, out, launcher=launcher, jobs=jobs,
                            gpus_per_job=gpus_per_job, gpu_memory=gpu_memory, slurm=slurm,
                            config=config, progress=progress)


def _run_claimed(
    entries: list[ModelEntry],
    todo: list[ModelEntry],
    settings: CensusSettings,
    out: Path,
    *,
    launcher: str,
    jobs: int,
    gpus_per_job: int | None,
    gpu_memory: str | None,
    slurm: dict[str, Any] | None,
    config: dict[str, Any] | None,
    progress: bool,
) -> CensusResult:
    """The part of :func:`run_census` that runs with the census folder claimed."""
    from achilles.scale.census import launch

    for e in todo:  # a census that held the folder before us may have finished some
        problem = run_dir_problem(run_dir_of(out, e), e)
        if problem is not None:
            raise AchillesError(problem)
    tasks = [Task(e, str(run_dir_of(out, e))) for e in todo]
    logger.info("census: %d model(s) to run, %d already done", len(todo), len(entries) - len(todo))
    job_ids: list[str] = []
    if tasks and launcher == "local":
        per_job = gpus_per_job
        if per_job is None and launch.visible_gpus():
            per_job = max(gpus_needed(todo, gpu_memory or _local_gpu_memory()))
        per_job = per_job or 1
        launch.run_local(tasks, settings, jobs=jobs, gpus_per_job=per_job, progress=progress)
    elif tasks:
        opts = dict(slurm or {})
        needs = (
            [gpus_per_job] * len(todo) if gpus_per_job is not None
            else gpus_needed(todo, gpu_memory or DEFAULT_GPU_MEMORY)
        )
        result = launch.run_slurm(
            tasks, settings, folder=out / "slurm", gpus=needs, parallelism=jobs,
            progress=progress, **opts,
        )
        if not opts.get("wait", True):
            job_ids = [str(j.job_id) for j in result]
    rows = collect(out, entries)
    files = None
    if not job_ids:
        record = {**(config or {}), "models": [dataclasses.asdict(e.spec) | {"name": e.name} for e in entries]}
        files = write_summary(out, rows, record)
    return CensusResult(rows, files, ran=len(tasks), skipped=len(entries) - len(tasks), job_ids=job_ids)

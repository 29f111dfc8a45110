"""Launchers: where census tasks run. Both hand the scheduling to an existing engine.

* ``local``: a :class:`concurrent.futures.ProcessPoolExecutor` of ``jobs`` worker
  processes. With GPUs visible, each worker owns a disjoint group of them (its
  ``CUDA_VISIBLE_DEVICES`` is set before it touches CUDA), so ``jobs`` is capped by the
  number of groups.
* ``slurm``: submitit job arrays, one model per array task, one array per GPU count (from
  ``achilles plan``). ``submitit`` is the optional extra ``achilles[cluster]``.

A worker killed mid-run leaves a run folder without its completion marker; the census reports
it as interrupted and the next run of the same command redoes only that model.

Local workers never outlive the census: each asks the kernel to kill it when its parent
dies (Linux ``prctl(PR_SET_PDEATHSIG)``), and a watchdog thread exits it when its parent
process changes (elsewhere). When the census itself is stopped (SIGTERM, Ctrl-C), queued
models are cancelled and running workers are terminated (:func:`_stop_pool`): every run
is then either finished or cleanly unfinished (no completion marker: redone next time).
Under the ``slurm`` launcher a stopped census cancels every job it submitted that has not
finished (:func:`_cancel_jobs`), so nothing keeps running on the cluster without it.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from achilles.errors import AchillesError
from achilles.scale.census.run import CensusSettings, Task, failed_row, run_task

logger = logging.getLogger(__name__)

LAUNCHERS: tuple[str, ...] = ("local", "slurm")


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names."""
    import torch

    if not torch.cuda.is_available():
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    return [str(i) for i in range(torch.cuda.device_count())]


def gpu_groups(gpus: Sequence[str], per_job: int) -> list[list[str]]:
    """Disjoint groups of ``per_job`` GPUs (the leftover GPUs stay idle)."""
    if per_job < 1:
        raise AchillesError("--gpus-per-job must be >= 1")
    if gpus and per_job > len(gpus):
        raise AchillesError(
            f"a model needs {per_job} GPUs but only {len(gpus)} are visible: run it on a "
            "larger machine or with --launcher slurm"
        )
    return [list(gpus[i : i + per_job]) for i in range(0, len(gpus) - per_job + 1, per_job)]


_GROUPS: Any = None


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """Exit this process as soon as ``parent_pid`` is gone (it is no longer our parent)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no prctl: the watchdog remains
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="achilles-parent-watchdog", daemon=True).start()


def _init_worker(groups: Any, parent_pid: int | None = None) -> None:
    """Tie this worker to its parent, and give it one GPU group before anything initialises CUDA."""
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    if groups is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = groups.get()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _stop_pool(pool: ProcessPoolExecutor, grace_s: float = 10.0) -> None:
    """Cancel what is queued, terminate what runs (SIGTERM, then SIGKILL after ``grace_s``)."""
    procs = list(getattr(pool, "_processes", {}).values())  # no public handle before 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1.0)


def run_local(
    tasks: Sequence[Task],
    settings: CensusSettings,
    *,
    jobs: int = 1,
    gpus_per_job: int = 1,
    progress: bool = False,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run ``tasks`` in a pool of worker processes; return their rows in task order."""
    if jobs < 1:
        raise AchillesError("--jobs must be >= 1")
    gpus = visible_gpus()
    groups = gpu_groups(gpus, gpus_per_job) if gpus else []
    if groups:
        jobs = min(jobs, len(groups))
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot survive a fork
    queue = None
    if groups:
        queue = ctx.Queue()  # not a Manager: its server process would outlive a killed census
        for g in groups[:jobs]:
            queue.put(",".join(g))
    rows: list[dict[str, Any] | None] = [None] * len(tasks)
    bar = tqdm(total=len(tasks), desc="census: models", disable=not progress)
    pool = ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker,
                               initargs=(queue, os.getpid()))
    try:
        futures = {
            pool.submit(run_task, t, settings, progress and jobs == 1): i
            for i, t in enumerate(tasks)
        }
        for fut in as_completed(futures):
            i = futures[fut]
            try:
                rows[i] = fut.result()
            except BrokenProcessPool:
                rows[i] = failed_row(tasks[i].entry, "interrupted", "a worker process died")
            bar.update(1)
            if on_row is not None:
                on_row(rows[i])  # type: ignore[arg-type]
    except BaseException:  # SIGTERM (the CLI raises it here), Ctrl-C, a bug: stop everything now
        _stop_pool(pool)
        raise
    else:
        pool.shutdown(wait=True)
    finally:
        bar.close()
    return [r for r in rows if r is not None]


def _import_submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise AchillesError(
            "the slurm launcher needs submitit: pip install 'achilles[cluster]'"
        ) from None
    return submitit


def run_slurm(
    tasks: Sequence[Task],
    settings: CensusSettings,
    *,
    folder: str | Path,
    gpus: Sequence[int],
    partition: str | None = None,
    timeout_min: int = 240,
    parallelism: int | None = None,
    cluster: str | None = None,
    wait: bool = True,
    progress: bool = False,
) -> list[Any]:
    """Submit ``tasks`` as submitit job arrays (one per GPU count ``gpus[i]`` of task ``i``).

    ``cluster=None`` lets submitit detect Slurm; ``"local"`` runs the same arrays as local
    processes (tests). With ``wait`` the rows come back in task order; without, the
    submitit jobs (``job.job_id``, ``job.cancel()``, ``job.result()``).
    """
    submitit = _import_submitit()
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    jobs: list[Any] = [None] * len(tasks)
    try:
        return _submit_and_wait(executor, tasks, settings, gpus, jobs, timeout_min=timeout_min,
                                partition=partition, parallelism=parallelism, wait=wait,
                                progress=progress)
    except BaseException:  # SIGTERM (Terminated), Ctrl-C, a failed submission: no orphan jobs
        _cancel_jobs(jobs)
        raise


def _cancel_jobs(jobs: Sequence[Any]) -> None:
    """Cancel every submitted job that has not finished (the census was stopped)."""
    live = []
    for job in (j for j in jobs if j is not None):
        try:  # done() asks the scheduler, which can fail too: never hide the stop
            if not job.done():
                job.cancel(check=False)
                live.append(job)
        except Exception as e:  # noqa: BLE001 - cancel the others whatever one says
            logger.warning("could not cancel job %s: %s", job.job_id, e)
    if live:
        logger.warning("census stopped: cancelled %d unfinished job(s) (%s)", len(live),
                       ", ".join(str(j.job_id) for j in live[:8]) + (" ..." if len(live) > 8 else ""))


def _submit_and_wait(executor: Any, tasks: Sequence[Task], settings: CensusSettings,
                     gpus: Sequence[int], jobs: list[Any], *, timeout_min: int,
                     partition: str | None, parallelism: int | None, wait: bool,
                     progress: bool) -> list[Any]:
    for need in sorted(set(gpus)):
        idx = [i for i, g in enumerate(gpus) if g == need]
        params: dict[str, Any] = {"name": "achilles-census", "timeout_min": timeout_min}
        if need > 0:
            params["gpus_per_node"] = need
        if parallelism:
            params["slurm_array_parallelism"] = parallelism
        if partition:
            params["slurm_partition"] = partition
        executor.update_parameters(**params)
        submitted = executor.map_array(
            run_task, [tasks[i] for i in idx], [settings] * len(idx)
        )
        for i, job in zip(idx, submitted, strict=True):
            jobs[i] = job
        logger.info("submitted %d task(s) needing %d GPU(s) each", len(idx), need)
    if not wait:
        return jobs
    rows = []
    for task, job in tqdm(list(zip(tasks, jobs, strict=True)), desc="census: jobs", disable=not progress):
        try:
            rows.append(job.result())
        except Exception as e:  # noqa: BLE001 - a killed or failed job is a row, not a crash
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            rows.append(failed_row(task.entry, "interrupted", f"job {job.job_id}: {first}"))
    return rows

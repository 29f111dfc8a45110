"""Downstream benchmarks under masks, through lm-evaluation-harness.

The in-memory model is wrapped in lm-eval's ``HFLM`` and evaluated with
``lm_eval.simple_evaluate`` once per level, with the first ``level`` units of the mask
installed by :func:`achilles.model.masking.masked` around the whole evaluation (level 0 = the
unmasked model). Request caching is off, so no level can reuse another level's answers.
lm-eval is imported lazily: it is the optional extra ``achilles[eval]``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from achilles.errors import AchillesError
from achilles.evaluation.perplexity import leading_bos
from achilles.model.masking import masked
from achilles.model.units import Unit, UnitPool
from achilles.results.envelope import Enveloped

logger = logging.getLogger(__name__)

ALL = "n*"
"""The level that means "the whole chosen set"."""


@dataclass
class DownstreamResult(Enveloped):
    """lm-eval results per masking level (``downstream.json``)."""

    KIND = "downstream"

    tasks: list[str]
    levels: list[dict[str, Any]]

    def fields(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "levels": self.levels}


def parse_levels(s: str, set_size: int | None = None) -> list[int]:
    """``"0,3,n*"`` -> ints; ``n*`` is ``set_size`` (checked when ``set_size`` is given)."""
    out: list[int] = []
    for tok in (t.strip() for t in s.split(",")):
        if not tok:
            continue
        if tok == ALL:
            out.append(-1 if set_size is None else set_size)
            continue
        try:
            n = int(tok)
        except ValueError:
            raise AchillesError(f"--levels {s!r}: give integers or n*, e.g. 0,n*") from None
        if n < 0:
            raise AchillesError(f"--levels {s!r}: levels must be >= 0")
        if set_size is not None and n > set_size:
            raise AchillesError(f"--levels: {n} exceeds the {set_size} units of the mask set")
        out.append(n)
    if not out:
        raise AchillesError("--levels is empty: e.g. 0,n*")
    return list(dict.fromkeys(out))


def import_lm_eval() -> Any:
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401
    except ImportError:
        raise AchillesError(
            "lm-evaluation-harness is not installed: pip install achilles[eval]"
        ) from None
    return lm_eval


def task_manager_for(tasks: Sequence[str], include_path: str | None = None) -> Any:
    """lm-eval's ``TaskManager`` (with ``include_path``), after checking every task exists."""
    import_lm_eval()
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise AchillesError(
            f"unknown lm-eval task(s) {', '.join(unknown)}: check the names with "
            "`lm-eval ls tasks`, or pass --include-path for local task configs"
        )
    return tm


def _clean_results(res: dict[str, Any]) -> dict[str, Any]:
    """The parts of lm-eval's output worth keeping (no per-sample logs, no configs' code)."""
    keep = ("results", "groups", "versions", "n-shot", "higher_is_better", "n-samples")
    return {k: res[k] for k in keep if k in res}


def run_downstream(
    model: torch.nn.Module,
    tokenizer: Any,
    pool: UnitPool | None,
    units: Sequence[Unit],
    levels: Sequence[int],
    tasks: Sequence[str],
    *,
    limit: int | float | None = None,
    batch_size: int | str = 1,
    include_path: str | None = None,
    num_fewshot: int | None = None,
    confirm_run_unsafe_code: bool = False,
    bootstrap_iters: int = 100000,
    seed: int = 0,
    task_manager: Any | None = None,
    add_bos: bool = True,
) -> DownstreamResult:
    """lm-eval ``tasks`` with the first ``level`` units masked, for each level."""
    lm_eval = import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    tm = task_manager or task_manager_for(tasks, include_path)
    # lm-eval adds no BOS for most models; a model trained with BOS first (Llama, and the
    # bundled models, whose massive activation fires on BOS) must see it, as in achilles' own
    # perplexity windows. ``add_bos=False`` restores lm-eval's default.
    bos = add_bos and leading_bos(tokenizer) is not None
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=bos)
    out: list[dict[str, Any]] = []
    for n in levels:
        if n > len(units):
            raise AchillesError(f"level {n} exceeds the {len(units)} units of the mask set")
        chosen = list(units[:n])
        ctx = masked(model, pool, chosen) if chosen else nullcontext()  # type: ignore[arg-type]
        logger.info("lm-eval %s with %d unit(s) masked", ",".join(tasks), n)
        with ctx:
            try:
                res = lm_eval.simple_evaluate(
                    model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                    use_cache=None, cache_requests=False, log_samples=False,
                    bootstrap_iters=bootstrap_iters, task_manager=tm,
                    confirm_run_unsafe_code=confirm_run_unsafe_code,
                    random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                    fewshot_random_seed=seed,
                )
            except OSError as e:  # datasets' not-found / connection errors are OSErrors
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise AchillesError(
                    f"lm-eval could not load the data of {', '.join(tasks)}: {first} (offline? "
                    "download the task's dataset while online, or use a local --include-path task)"
                ) from None
            except OverflowError:
                # lm-eval aggregates perplexity as math.exp(-mean(loglik)), which overflows
                # for a collapsed model (mean log-likelihood below -709.8)
                raise AchillesError(
                    f"lm-eval overflowed aggregating a perplexity metric at level {n} (the "
                    "masked model's log-likelihoods are below -709): use accuracy metrics or "
                    "`achilles ppl` for perplexity"
                ) from None
        if res is None:  # pragma: no cover - non-zero ranks of a distributed run
            raise AchillesError("lm-eval returned no results (distributed run?): run on one process")
        out.append({"level": n, "units": [u.to_dict() for u in chosen], **_clean_results(res)})
    return DownstreamResult(tasks=list(tasks), levels=out)

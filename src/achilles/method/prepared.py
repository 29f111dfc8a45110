"""Check once, then compute: the checked inputs of a command and its prepared run.

:func:`check_inputs` validates what a command's inputs need against the weightless model
(before any weight loads) and keeps what it computed on the way: the text (fitted to the
context), its token ids and the unit pool. :func:`prepare` then does, once, what every
stage needs from the loaded model: the clean forward pass (finite check and clean NLL) and
the environment record, and returns a :class:`PreparedRun` that ranking, identification,
explain, the float32 re-check, the controls and the report receive instead of recomputing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from achilles.config import RankConfig
from achilles.errors import AchillesError
from achilles.method.metrics import sequence_nll
from achilles.model.hooks import observed_io
from achilles.model.loading import LoadedModel, check_token_ids, context_length, fit_text, tokenize
from achilles.model.units import UnitPool, build_pool
from achilles.results.envelope import new_run_id
from achilles.results.provenance import environment


@dataclass(frozen=True)
class CheckedInputs:
    """What :func:`check_inputs` verified before the weights load, kept for :func:`prepare`."""

    skeleton: LoadedModel
    """The weightless (meta-device) model with its tokenizer; pass ``.tokenizer`` to ``load_model``."""
    text: str
    """The text, fitted to the model's context (cut with ``truncate``, else refused)."""
    input_ids: torch.Tensor
    """``[1, T]`` token ids of :attr:`text`."""
    pool: UnitPool | None
    """The unit pool (shapes only: it serves the loaded model too), when one was asked for."""


def check_text(skeleton: LoadedModel, text: str, *, truncate: bool = False) -> tuple[str, torch.Tensor]:
    """``text`` fitted to the context (refused, or cut with ``truncate``) and its token ids,
    tokenized once (again only when the text is cut)."""
    ids = tokenize(skeleton.tokenizer, text)
    limit = context_length(skeleton.model)
    if limit is not None and int(ids.shape[1]) > limit:
        text = fit_text(skeleton.tokenizer, skeleton.model, text, truncate=truncate)  # raises or cuts
        ids = tokenize(skeleton.tokenizer, text)
    check_token_ids(ids, skeleton.model)
    return text, ids


def check_inputs(
    skeleton: LoadedModel, text: str, *, rank_config: RankConfig | None = None,
    pool: UnitPool | None = None, truncate: bool = False,
) -> CheckedInputs:
    """Check ``text`` (and the pool of ``rank_config``) against the weightless model."""
    text, ids = check_text(skeleton, text, truncate=truncate)
    if pool is None and rank_config is not None:
        pool = build_pool(skeleton.model, rank_config.pool, rank_config.components)
    return CheckedInputs(skeleton, text, ids, pool)


@dataclass(frozen=True)
class PreparedRun:
    """One text on one loaded model, prepared once: what every stage of a run receives."""

    text: str
    input_ids: torch.Tensor
    """``[1, T]`` token ids of :attr:`text`."""
    pool: UnitPool
    clean_nll: float
    """Summed NLL of the text, clean (unmasked) model, in the run's dtype."""
    clean_seconds: float
    """Wall time of the clean forward pass (sizes the long-run warning)."""
    env: dict[str, Any]
    """:func:`~achilles.results.provenance.environment` of the loaded model, taken once."""
    run_id: str
    """The id every result file of this run carries."""

    @property
    def tokens(self) -> int:
        """Tokens of the text (incl. BOS where the tokenizer adds one)."""
        return int(self.input_ids.shape[1])


@torch.no_grad()
def clean_forward(lm: LoadedModel, input_ids: torch.Tensor, pool: UnitPool) -> tuple[float, float]:
    """The clean forward pass on the text: its summed NLL and its seconds, refused when not
    finite.

    Watches every site of ``pool`` and the NLL: a NaN or inf here means the weights are
    broken or overflow in this dtype, before any unit is masked, so no ranking or critical
    set measured on it would mean anything. A text longer than the model's context is
    refused too.
    """
    model = lm.model
    check_token_ids(input_ids, model)
    limit = context_length(model)
    if limit is not None and input_ids.shape[1] > limit:
        raise AchillesError(
            f"the text is {input_ids.shape[1]} tokens, longer than the model's context of {limit}: "
            "shorten it (or cut it with achilles.model.loading.fit_text / --truncate)"
        )
    bad: list[str] = []

    def watch(site: str):  # noqa: ANN202
        def fn(_x: torch.Tensor, out: torch.Tensor) -> None:
            if not bad and not bool(torch.isfinite(out).all()):
                bad.append(site)
        return fn

    sites = {s.module: s for s in pool.sites}
    start = time.perf_counter()
    with observed_io(model, {name: watch(name) for name in sites}):
        nll = float(sequence_nll(model, input_ids)[0])
    seconds = time.perf_counter() - start
    dtype = str(lm.dtype).removeprefix("torch.")
    if lm.dtype == torch.float32:
        why = "the model is broken (a NaN or inf in its weights?); check the checkpoint"
    else:
        alt = "--dtype float32 or --dtype bfloat16" if lm.dtype == torch.float16 else "--dtype float32"
        why = f"the model overflows in {dtype} or is broken; try {alt}"
    if bad:
        s = sites[bad[0]]
        raise AchillesError(
            f"the clean forward pass is not finite from layer {s.layer} ({s.component}) on "
            f"({dtype}), before any masking: {why}"
        )
    if not math.isfinite(nll):
        raise AchillesError(f"the clean NLL of the text is {nll} ({dtype}), before any masking: {why}")
    return nll, seconds


def check_clean_forward(lm: LoadedModel, input_ids: torch.Tensor, pool: UnitPool) -> float:
    """:func:`clean_forward`'s refusal only; returns the seconds the pass took."""
    return clean_forward(lm, input_ids, pool)[1]


def prepare(
    lm: LoadedModel,
    checked: CheckedInputs | str,
    *,
    pool: UnitPool | None = None,
    rank_config: RankConfig | None = None,
    run_id: str | None = None,
) -> PreparedRun:
    """Tokenize, build the pool, run the clean forward pass and take the environment, once.

    ``checked`` is what :func:`check_inputs` returned before the weights loaded (its text,
    token ids and pool are used as they are), or a plain text (checked here). The pool is
    ``pool``, else the checked one, else the one ``rank_config`` names (default: the paper's).
    """
    if isinstance(checked, str):
        checked = check_inputs(lm, checked, pool=pool, rank_config=rank_config)
    pool = pool or checked.pool
    if pool is None:
        rc = rank_config or RankConfig()
        pool = build_pool(lm.model, rc.pool, rc.components)
    nll, seconds = clean_forward(lm, checked.input_ids, pool)
    return PreparedRun(
        text=checked.text, input_ids=checked.input_ids, pool=pool, clean_nll=nll,
        clean_seconds=seconds, env=environment(lm.model), run_id=run_id or new_run_id(),
    )

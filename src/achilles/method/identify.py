"""Stage 2 of the paper: causal identification of the critical set by masking.

:class:`MaskEvaluator` measures Δ for many masks in one batched forward pass (one mask per
batch row, same text in every row) and keeps every measurement. :func:`identify` runs the
chosen search over prefixes of a ranking, minimises the set it finds, and returns an
:class:`Identification`, the typed result saved as ``identification.json``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from achilles.config import IdentifyConfig
from achilles.errors import AchillesError
from achilles.method.metrics import delta as delta_from_nll
from achilles.method.metrics import sequence_nll
from achilles.method.search import bisect_search, first_crossing, linear_search, minimize_set
from achilles.model.batching import choose_batch_size, input_device, run_batched
from achilles.model.masking import ChannelMasker, PrefixIndex
from achilles.model.units import Unit, UnitPool
from achilles.results.envelope import Envelope, run_id_of
from achilles.results.files import decode_float
from achilles.results.schema import require_fields

logger = logging.getLogger(__name__)

EPSILON_GRID: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0, 4.0)


@dataclass(frozen=True)
class Measurement:
    """Δ and summed NLL of the text under one mask."""

    delta: float
    nll: float

    @property
    def finite(self) -> bool:
        return math.isfinite(self.nll)


class MaskEvaluator:
    """Δ of masks on one text, batched: each batch row carries its own mask.

    Args:
        model: the model (eval mode).
        pool: the unit pool masks are drawn from.
        input_ids: the text, ``[1, T]``.
        modules: the sites masks may touch (default: every pool site).
        batch_size: rows per forward pass (default: from free memory).
        rows_hint: the most masks one call is expected to measure (caps the batch size).
        reference_row: add an unmasked row to every batched pass and take each row's Δ
            against it, so that Δ does not depend on the batch's shape (bf16 kernels on a GPU
            pick different reduction orders for different batch sizes). Default: on CUDA.
            A pass of one row is measured against the clean NLL of the first pass.
        clean_nll: the text's clean summed NLL when the caller has it (a prepared run's);
            default: measured here, one pass.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        pool: UnitPool,
        input_ids: torch.Tensor,
        *,
        modules: Sequence[str] | None = None,
        batch_size: int | None = None,
        rows_hint: int = 64,
        reference_row: bool | None = None,
        clean_nll: float | None = None,
    ) -> None:
        self.model = model
        self.pool = pool
        self.input_ids = input_ids
        self.tokens = int(input_ids.shape[1]) - 1  # predicted tokens
        widest = max(s.width for s in pool.sites)
        self.batch_size = choose_batch_size(
            model, int(input_ids.shape[1]), rows_hint, widest, batch_size
        )
        if reference_row is None:
            reference_row = input_device(model).type == "cuda"
        self.reference_row = bool(reference_row) and self.batch_size > 1
        self.masker = ChannelMasker(model, pool, rows=self.batch_size)
        self.modules = modules
        self.forward_passes = 0
        self.rows_evaluated = 0
        # the clean pass is counted whether it runs here or ran once in ``prepare``
        self.baseline_nll = (
            float(sequence_nll(model, input_ids)[0]) if clean_nll is None else float(clean_nll)
        )
        self.forward_passes += 1
        if not math.isfinite(self.baseline_nll):
            raise AchillesError(
                f"the clean NLL of the text is {self.baseline_nll} before any masking: the model "
                "is broken or overflows in its dtype (try --dtype float32)"
            )

    @property
    def masks_per_pass(self) -> int:
        """Masks measured per forward pass (the batch less its reference row, if any)."""
        return max(1, self.batch_size - self.reference_row)

    def _nll(
        self,
        items: Sequence[Any],
        install: Callable[[Sequence[Any]], None],
        empty: Any,
        *,
        sequential: bool = False,
    ) -> tuple[list[float], list[float]]:
        """NLL under each item, and the clean NLL each one is compared with."""
        out: list[float] = []
        refs: list[float] = []
        with_ref = self.reference_row and not sequential

        def run(chunk: Sequence[Any]) -> None:
            rows = [*chunk, empty] if with_ref and len(chunk) > 0 else list(chunk)
            install(rows)
            ids = self.input_ids.expand(len(rows), -1)
            with self.masker.installed(self.modules):
                nll = sequence_nll(self.model, ids).tolist()
            self.forward_passes += 1
            ref = nll.pop() if len(rows) > len(chunk) else self.baseline_nll
            out.extend(nll)
            refs.extend([ref] * len(nll))

        if sequential:
            run_batched(list(items), run, 1)
        else:
            # after an OOM run_batched shrinks the batch; the masker's spare rows stay unused
            per_pass = run_batched(list(items), run, self.masks_per_pass)
            self.batch_size = per_pass + with_ref
        self.rows_evaluated += len(items)
        return out, refs

    def nll(self, masks: Sequence[Sequence[Unit]]) -> list[float]:
        """Summed NLL of the text under each mask."""
        return self._nll(masks, self.masker.set_rows, [])[0]

    def _measurements(self, nlls: tuple[list[float], list[float]]) -> list[Measurement]:
        return [
            Measurement(delta_from_nll(n, ref, self.tokens), n)
            for n, ref in zip(*nlls, strict=True)
        ]

    def measure(
        self, masks: Sequence[Sequence[Unit]], *, sequential: bool = False
    ) -> list[Measurement]:
        """Δ and NLL under each mask (a list of units).

        ``sequential=True`` measures one mask per pass against the clean NLL of a one-row
        pass: the answer of the plain loop, whatever the batch size.
        """
        return self._measurements(
            self._nll(masks, self.masker.set_rows, [], sequential=sequential)
        )

    def measure_prefixes(self, index: PrefixIndex, sizes: Sequence[int]) -> list[Measurement]:
        """Δ and NLL with the first ``sizes[i]`` units of an indexed ranking masked."""
        return self._measurements(
            self._nll(sizes, lambda chunk: self.masker.set_prefixes(index, chunk), 0)
        )

    def pass_seconds(self, rows: int) -> float:
        """Wall time of one forward pass of ``rows`` unmasked rows (synchronised)."""
        ids = self.input_ids.expand(rows, -1)
        sync = torch.cuda.synchronize if input_device(self.model).type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        sequence_nll(self.model, ids)  # returns on the host: the pass has finished
        return time.perf_counter() - t0


@dataclass
class Identification(Envelope):
    """Result of stage 2 (saved as ``identification.json``)."""

    KIND = "identification"

    epsilon: float
    n_star: int | None
    critical_set: list[Unit]
    minimal_set: list[Unit]
    delta_critical: float | None
    delta_minimal: float | None
    necessity: Sequence[float | None]
    """Δ without each minimal-set member; ``None`` where a file read back lacks it."""
    curve: list[dict[str, Any]]
    n_star_by_epsilon: dict[str, int | None]
    baseline_nll: float
    tokens: int
    n_units: int
    forward_passes: int
    config: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    curve_complete: bool = True
    fp32_check: dict[str, Any] | None = None
    """Δ of the final set re-measured in float32 when the run was not (see ``pipeline``)."""
    run_id: str | None = None
    ranking_run_id: str | None = None
    """The run id of the ranking the prefixes came from (its own run's, or another's)."""

    @property
    def found(self) -> bool:
        return self.n_star is not None

    def fields(self) -> dict[str, Any]:
        n = self.n_star
        return {
            "epsilon": self.epsilon,
            "found": self.found,
            "n_star": n,
            "n_minimal": len(self.minimal_set) if self.found else None,
            "n_units": self.n_units,
            "ratio": (n / self.n_units) if n else None,
            "tokens": self.tokens,
            "baseline_nll": self.baseline_nll / self.tokens,
            "baseline_nll_sum": self.baseline_nll,
            "delta_critical": self.delta_critical,
            "delta_minimal": self.delta_minimal,
            "critical_set": [u.to_dict() for u in self.critical_set],
            "minimal_set": [
                {**u.to_dict(), "delta_without": d}
                for u, d in zip(self.minimal_set, self.necessity, strict=True)
            ],
            "n_star_by_epsilon": self.n_star_by_epsilon,
            "curve_complete": self.curve_complete,
            "curve": self.curve,
            "forward_passes": self.forward_passes,
            "fp32_check": self.fp32_check,
            "ranking_run_id": self.ranking_run_id,
        }

    @classmethod
    def load(cls, path: str) -> Identification:
        d = cls.read(path, {
            "epsilon": float, "n_star": (int, type(None)), "critical_set": list,
            "tokens": int, "baseline_nll_sum": float, "n_units": int, "curve": list,
        })
        for key, kind in (("minimal_set", list), ("n_star_by_epsilon", dict),
                          ("fp32_check", dict), ("forward_passes", int)):
            if d.get(key) is not None:
                require_fields(d, path, {key: kind})
        eps = float(d["epsilon"])  # required non-null above; decode_float would only pass None through
        if not (math.isfinite(eps) and eps > 0):
            raise AchillesError(
                f"{path}: its epsilon is {d['epsilon']!r}, not a number > 0: the file is damaged; "
                "rerun `achilles identify` (or `find`) to rewrite it"
            )
        try:
            ident = cls._from_dict(d)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise AchillesError(f"{path} is not a valid identification file (bad entry: {e})") from None
        critical = {u.key for u in ident.critical_set}
        stray = [u for u in ident.minimal_set if u.key not in critical]
        if stray:
            raise AchillesError(
                f"{path}: its minimal set holds {stray[0]}, which is not in its critical set "
                "(the minimal set is a subset of the critical set): the file is damaged or "
                "mixed from two runs; identify again"
            )
        return ident

    @classmethod
    def _from_dict(cls, d: dict[str, Any]) -> Identification:
        tokens = int(d["tokens"])
        minimal = d.get("minimal_set") or []
        return cls(
            epsilon=float(d["epsilon"]),
            n_star=d["n_star"],
            critical_set=[Unit.from_dict(u) for u in d["critical_set"]],
            minimal_set=[Unit.from_dict(u) for u in minimal],
            delta_critical=decode_float(d.get("delta_critical")),
            delta_minimal=decode_float(d.get("delta_minimal")),
            necessity=[decode_float(u.get("delta_without")) for u in minimal],
            curve=[
                {**p, "delta": decode_float(p["delta"]), "nll": decode_float(p["nll"])}
                for p in d["curve"]
            ],
            n_star_by_epsilon=d.get("n_star_by_epsilon", {}),
            baseline_nll=float(d["baseline_nll_sum"]),
            tokens=tokens,
            n_units=int(d["n_units"]),
            forward_passes=int(d.get("forward_passes", 0)),
            config=d.get("config", {}),
            env=d.get("env", {}),
            curve_complete=bool(d.get("curve_complete", True)),
            fp32_check=_decode_check(d.get("fp32_check")),
            run_id=run_id_of(d),
            ranking_run_id=d.get("ranking_run_id") if isinstance(d.get("ranking_run_id"), str) else None,
        )


def _decode_check(check: dict[str, Any] | None) -> dict[str, Any] | None:
    if check is None:
        return None
    return {
        k: decode_float(v) if k.startswith("delta") and v is not None else v
        for k, v in check.items()
    }


def minimize_batch(one_row_s: float, b_rows_s: float, b: int) -> int:
    """Candidates per minimisation pass: ``b`` when a ``b``-row pass costs under half of ``b``
    one-row passes (speculation wastes up to about half of its rows), else 1."""
    return b if b > 1 and b_rows_s < 0.5 * b * one_row_s else 1


def identify(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    pool: UnitPool,
    ranking: Sequence[Unit],
    config: IdentifyConfig,
    *,
    progress: bool = False,
    clean_nll: float | None = None,
) -> Identification:
    """Find the smallest prefix of ``ranking`` whose masking gives Δ ≥ ε, then minimise it.

    ``clean_nll``: the text's clean summed NLL, when a prepared run measured it.
    """
    n_max = min(config.max_neurons, len(ranking))
    if n_max < 1:
        raise AchillesError("the ranking holds no units: nothing to mask (rank again)")
    if config.step > n_max:  # a step past n_max would evaluate no prefix at all
        logger.warning("--step %d > %d units to try: using step %d", config.step, n_max, n_max)
        config = replace(config, step=n_max)
    candidates = list(ranking[:n_max])
    modules = list(dict.fromkeys(u.module for u in candidates))
    ev = MaskEvaluator(
        model, pool, input_ids, modules=modules, batch_size=config.batch_size,
        rows_hint=max(1, n_max // config.step), clean_nll=clean_nll,
    )
    seen: dict[int, Measurement] = {}
    bar = tqdm(total=n_max, desc="stage 2: masking prefixes", disable=not progress)

    index = PrefixIndex.build(pool, candidates)

    def prefix_objective(ns: Sequence[int]) -> list[float]:
        ms = ev.measure_prefixes(index, ns)
        for n, m in zip(ns, ms, strict=True):
            seen[n] = m
        bar.update(max(0, max(ns) - bar.n))
        return [m.delta for m in ms]

    if config.search == "linear":
        trace = linear_search(
            prefix_objective,
            epsilon=config.epsilon,
            n_max=n_max,
            step=config.step,
            batch=ev.masks_per_pass,
            continue_until=config.curve_until,
        )
    else:
        trace = bisect_search(prefix_objective, epsilon=config.epsilon, n_max=n_max, step=config.step)
    if bar.n < n_max:  # the scan stopped early: close the bar at what it reached, and say why
        goal = max(config.epsilon, config.curve_until) if config.search == "linear" else config.epsilon
        bar.total = bar.n
        bar.set_postfix_str(
            f"done: Δ ≥ {goal:g} by n = {bar.n}" if trace.n_star else "done", refresh=False
        )
        bar.refresh()
    bar.close()
    if not seen:
        raise AchillesError("stage 2 evaluated no prefix: nothing was measured (check --step and --max-neurons)")

    curve: list[dict[str, Any]] = [
        {"n": n, "delta": seen[n].delta if seen[n].finite else math.inf, "nll": seen[n].nll,
         "finite": seen[n].finite}
        for n in sorted(seen)
    ]
    points = [(p["n"], p["delta"]) for p in curve]
    by_eps = {f"{e:g}": first_crossing(points, e) for e in sorted({*EPSILON_GRID, config.epsilon})}

    n_star = trace.n_star
    critical = candidates[:n_star] if n_star else []
    minimal: list[Unit] = []
    necessity: list[float] = []
    d_crit = seen[n_star].delta if n_star else None
    d_min = None
    if n_star and config.minimize:
        def set_objective(sets: Sequence[Sequence[Unit]]) -> list[float]:
            return [m.delta for m in ev.measure(sets)]

        # Speculative batches cut passes (420 -> 102 for 133 -> 46 units on the sink model) but
        # waste rows after each accepted removal: a win where a pass of a few dozen rows costs
        # about one row (a GPU), a 4x loss on CPU (docs/benchmarks.md). On a GPU the batch is
        # chosen by timing one 1-row and one B-row pass.
        batch = 1
        if input_device(model).type == "cuda" and ev.masks_per_pass > 1:
            b = min(ev.masks_per_pass, 16)
            ev.pass_seconds(1)  # warm-up
            batch = minimize_batch(ev.pass_seconds(1), ev.pass_seconds(b + ev.reference_row), b)
        mbar = tqdm(total=len(critical), desc="stage 2: minimising", disable=not progress)

        def on_pass(label: str, total: int) -> None:
            mbar.set_description(f"stage 2: minimising {len(critical)} units ({label})",
                                 refresh=False)
            mbar.reset(total=total)

        mt = minimize_set(
            set_objective, critical, epsilon=config.epsilon, delta=d_crit, batch=batch,
            on_pass=on_pass, on_step=mbar.update,
        )
        mbar.close()
        minimal, necessity, d_min = mt.members, mt.necessity, mt.delta
        if batch > 1:
            # re-verify the final set one mask per pass, as the sequential loop measures it
            d_min = ev.measure([minimal], sequential=True)[0].delta
            without = [[x for x in minimal if x != u] for u in minimal]
            necessity = [m.delta for m in ev.measure(without, sequential=True)]
            if d_min < config.epsilon or any(d >= config.epsilon for d in necessity):
                logger.warning(
                    "stage 2: the minimal set from batched passes is not minimal one mask per "
                    "pass (Δ=%.4g, largest Δ without one unit %.4g; ε=%g)",
                    d_min, max(necessity, default=math.nan), config.epsilon,
                )
    elif n_star:
        minimal, d_min = list(critical), d_crit
        necessity = [m.delta for m in ev.measure([[x for x in critical if x != u] for u in critical])]
    logger.info(
        "stage 2: n*=%s (ε=%g), minimal %d, %d forward passes",
        n_star, config.epsilon, len(minimal), ev.forward_passes,
    )
    return Identification(
        epsilon=config.epsilon,
        n_star=n_star,
        critical_set=critical,
        minimal_set=minimal,
        delta_critical=d_crit,
        delta_minimal=d_min,
        necessity=necessity,
        curve=curve,
        n_star_by_epsilon=by_eps,
        baseline_nll=ev.baseline_nll,
        tokens=ev.tokens,
        n_units=pool.n_units,
        forward_passes=ev.forward_passes,
        curve_complete=config.search == "linear",
    )

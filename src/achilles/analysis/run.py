"""``analyze_run``: every analysis of one run folder, saved as ``analysis.json``.

Model-free parts (locations, phase transition, numerical health) are always computed from
``ranking.json`` + ``identification.json``; the parts that need the model (weights behind
the units, controls, fp32 recheck) run only when a :class:`~achilles.model.loading.LoadedModel`
is given.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from achilles.analysis.controls import channel_traces, mean_ablation, random_sets, recheck_fp32
from achilles.analysis.locations import locations, n_layers_of
from achilles.analysis.phase import DEFAULT_TOLERANCE, phase_transition
from achilles.analysis.weights import MASSIVE_RATIO, WEIGHT_KINDS, unit_weights
from achilles.errors import AchillesError
from achilles.method.compat import pool_for_ranking
from achilles.method.identify import Identification
from achilles.method.prepared import PreparedRun
from achilles.method.ranking import Ranking
from achilles.model.loading import LoadedModel, context_length, tokenize
from achilles.model.names import token_text
from achilles.model.units import Unit, UnitPool
from achilles.results.envelope import envelope, run_id_of
from achilles.results.files import write_json
from achilles.results.provenance import environment

logger = logging.getLogger(__name__)

ANALYSIS_FILE = "analysis.json"
LOW_PRECISION = ("bfloat16", "float16")
TRACED_UNITS = 3
"""Units of the final set whose activation at every token is saved (``activations``)."""


def load_run(run_dir: str | Path) -> tuple[Ranking, Identification]:
    """The ranking and identification of a run folder."""
    run_dir = Path(run_dir)
    return Ranking.load(str(run_dir / "ranking.json")), Identification.load(
        str(run_dir / "identification.json")
    )


def check_same_run(ranking: Ranking, ident: Identification, where: str | Path) -> None:
    """Refuse a ranking and an identification of different runs, without the model.

    The identification records the fingerprint of the pool it was made over and the run id
    of its ranking: a ranking.json of another model or run beside it is refused.
    """
    made = (ident.config.get("pool") or {}).get("fingerprint")
    have = ranking.pool.get("fingerprint")
    if made is not None and have is not None and made != have:
        raise AchillesError(
            f"{where}: ranking.json and identification.json were made over different unit "
            f"pools (another model or pool: {ranking.pool.get('model_type')} with "
            f"{ranking.pool.get('n_units')} units, and {ident.n_units} units): rerun "
            "`achilles find` into an empty folder"
        )
    want = ident.ranking_run_id
    if want is not None and ranking.run_id is not None and ranking.run_id != want:
        raise AchillesError(
            f"{where}: ranking.json is not the ranking identification.json was made from "
            f"(run {ranking.run_id}, not {want}): rerun `achilles find` into an empty folder"
        )


def check_context(lm: LoadedModel, ids: Any) -> None:
    """Refuse to measure past the model's context (as explain and find do)."""
    limit = context_length(lm.model)
    if limit is not None and int(ids.shape[1]) > limit:
        raise AchillesError(
            f"the run's text is {int(ids.shape[1])} tokens, longer than this model's context "
            f"of {limit}: the controls would be measured past it (give the run's own --model)"
        )


def final_set(ident: Identification) -> tuple[str, list[Unit]]:
    """The set the controls are run on: the minimal set, else the critical set."""
    if ident.minimal_set:
        return "minimal", list(ident.minimal_set)
    return "critical", list(ident.critical_set)


def dense_modules(units: list[Unit], pool: UnitPool, share: float = 0.5) -> list[dict[str, Any]]:
    """Modules of which ``units`` cover more than ``share`` of the channels."""
    counts: dict[str, int] = {}
    for u in units:
        counts[u.module] = counts.get(u.module, 0) + 1
    widths = {s.module: s.width for s in pool.sites}
    return [
        {"module": m, "count": k, "width": widths[m], "share": k / widths[m]}
        for m, k in counts.items()
        if k > share * widths[m]
    ]


def health(ident: Identification) -> dict[str, Any]:
    """Numerical health of the run: dtype and non-finite curve points."""
    bad = [p["n"] for p in ident.curve if not p.get("finite", True)]
    return {
        "dtype": ident.env.get("dtype"),
        "curve_points": len(ident.curve),
        "nonfinite_points": len(bad),
        "nonfinite_n": bad,
    }


def analyze_run(
    run_dir: str | Path,
    lm: LoadedModel | None = None,
    *,
    top_n: int = 100,
    tolerance: float = DEFAULT_TOLERANCE,
    seeds: int = 10,
    top_k: int = 5,
    massive_ratio: float = MASSIVE_RATIO,
    max_weight_units: int = 50,
    progress: bool = False,
    fp32: bool | None = None,
    write: bool = True,
    pool: UnitPool | None = None,
    prepared: PreparedRun | None = None,
    results: tuple[Ranking, Identification] | None = None,
) -> dict[str, Any]:
    """Analyse a run folder and (by default) write ``RUN_DIR/analysis.json``.

    Args:
        run_dir: folder holding ``ranking.json`` and ``identification.json``.
        lm: the run's model; without it the weights and controls sections are ``None``.
        top_n: size of the ranking prefix whose layer distribution is reported.
        tolerance: drop size (orders of magnitude) above which the curve is non-monotone.
        seeds: number of random same-module sets in the random control.
        top_k: weight entries listed per unit.
        massive_ratio: threshold of the massive-activation flag.
        max_weight_units: at most this many critical units get a weight profile.
        progress: show a progress bar for the weight ablations (two passes per unit).
        fp32: recheck the final set in float32 (default: when the run's dtype is bf16/fp16).
        write: write ``analysis.json``.
        pool: the run's unit pool, when the caller has it (default: rebuilt from the ranking).
        prepared: the run prepared on the identification's text (token ids, pool, clean NLL
            and environment used as they are; default: recomputed).
        results: the run's ranking and identification in hand (default: read from the folder).
    """
    run_dir = Path(run_dir)
    ranking, ident = results if results is not None else load_run(run_dir)
    check_same_run(ranking, ident, run_dir)
    n_layers = n_layers_of(ranking.pool, ranking.units)
    which, final = final_set(ident)
    env = prepared.env if prepared is not None else environment(lm.model if lm is not None else None)
    out: dict[str, Any] = {
        **envelope("analysis", env=env, run_id=ident.run_id),
        "run": {
            "model": ident.config.get("model", {}).get("model"),
            "epsilon": ident.epsilon,
            "n_star": ident.n_star,
            "final_set": which,
            "final_size": len(final),
        },
        "locations": locations(ident.critical_set, ranking.units, n_layers, top_n),
        "phase": phase_transition(ident.curve, tolerance=tolerance).to_dict(),
        "health": health(ident),
        "weights": None,
        "controls": None,
    }
    if lm is not None:
        t0 = time.perf_counter()
        text = ident.config.get("text")
        if not isinstance(text, str):
            raise ValueError(f"{run_dir}/identification.json has no config.text to analyse on")
        if prepared is not None and prepared.text != text:
            prepared = None  # prepared on another text: of no use here
        pool = pool or (prepared.pool if prepared is not None else pool_for_ranking(lm, ranking))
        ids = prepared.input_ids if prepared is not None else tokenize(lm.tokenizer, text)
        check_context(lm, ids)
        clean = prepared.clean_nll if prepared is not None else None
        out["tokens"] = [token_text(lm.tokenizer, int(i)) for i in ids[0].tolist()]
        crit = pool.validate(ident.critical_set, source="the critical set")[:max_weight_units]
        final = pool.validate(final, source="the final set")
        out["weights"] = {
            "kinds": list(WEIGHT_KINDS),
            "top_k": top_k,
            "massive_threshold": massive_ratio,
            "units": [
                w.to_dict()
                for w in unit_weights(
                    lm.model, ids, crit, top_k=top_k, massive_ratio=massive_ratio, ablate=True,
                    progress=progress, clean_nll=clean,
                )
            ],
        }
        dtype = str(lm.dtype).removeprefix("torch.")
        do_fp32 = dtype in LOW_PRECISION if fp32 is None else fp32
        controls: dict[str, Any] = {"set": which, "n_units": len(final)}
        controls["dense_modules"] = dense_modules(final, pool)
        for d in controls["dense_modules"]:
            logger.warning(
                "the %s set covers %d of the %d channels of %s: it is most of the module, not a "
                "few units in it", which, d["count"], d["width"], d["module"],
            )
        shown = final[:TRACED_UNITS]
        out["activations"] = {
            "set": which,
            "units": [u.to_dict() for u in shown],
            "values": channel_traces(lm.model, ids, shown) if shown else [],
        }
        controls["mean_ablation"] = mean_ablation(lm.model, pool, ids, final, clean_nll=clean).to_dict()
        controls["random_sets"] = (
            random_sets(lm.model, pool, ids, final, seeds=seeds, clean_nll=clean).to_dict()
            if final else None
        )
        controls["fp32"] = (
            recheck_fp32(lm, text, final, pool=pool, input_ids=ids).to_dict()
            if do_fp32 and final else None
        )
        out["controls"] = controls
        out["model_seconds"] = time.perf_counter() - t0
    if write:
        write_json(run_dir / ANALYSIS_FILE, out)
    return out


def analyze_for_report(
    run_dir: str | Path,
    lm: LoadedModel | None = None,
    *,
    prepared: PreparedRun | None = None,
    results: tuple[Ranking, Identification] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """The analysis a report renders, written to ``RUN_DIR/analysis.json``.

    Runs in the command, before :func:`~achilles.report.write_report`. The model-free parts
    are always recomputed; with ``lm`` the model parts too, else those of an existing
    ``analysis.json`` of this same run (same run id) are kept. ``options`` go to
    :func:`analyze_run`.
    """
    import json

    run_dir = Path(run_dir)
    previous: dict[str, Any] | None = None
    try:
        data = json.loads((run_dir / ANALYSIS_FILE).read_text(encoding="utf-8"))
        previous = data if isinstance(data, dict) else None
    except (OSError, ValueError, RecursionError):
        previous = None
    analysis = analyze_run(run_dir, lm, write=False, prepared=prepared, results=results, **options)
    if lm is None and previous and run_id_of(previous) == analysis.get("run_id"):
        analysis = {**analysis, **{k: previous.get(k) for k in MODEL_PARTS}}
    write_json(run_dir / ANALYSIS_FILE, analysis)
    return analysis


MODEL_PARTS = ("weights", "controls", "tokens", "activations")
"""The sections of ``analysis.json`` only a loaded model can compute."""

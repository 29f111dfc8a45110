"""``explain``: trace a critical set's collapse through the residual stream, sinks and heads.

Cost, at T tokens with L layers of H heads: one two-row traced pass (eager attention), |S|
rows for the writers (only when a massive activation is flagged), ``2·L·(H+1)`` rows of
single-component patches (denoising and noising, plus one baseline row each) and
``top_components + 2`` rows of joint restores: about ``2 + 2·L·(H+1)`` forward rows.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from achilles.analysis.weights import WEIGHT_KINDS
from achilles.errors import AchillesError
from achilles.explain.config import ExplainConfig
from achilles.explain.mediation import (
    MAX_DRIVERS,
    channel_traces,
    greedy_continuations,
    layer_bands,
    mediation_profile,
    mediation_rows,
    scoped_components,
    token_str,
    unit_drivers,
)
from achilles.explain.patching import (
    Component,
    ComponentPatcher,
    all_components,
    head_contributions,
    patched_nll,
)
from achilles.explain.result import MECHANISM_FILE, Mechanism, finite_first_key
from achilles.explain.summary import summarize
from achilles.explain.trace import (
    Layout,
    Trace,
    massive_activations,
    massive_groups,
    residual_profile,
    trace,
)
from achilles.method.identify import Identification
from achilles.method.metrics import LN10, sequence_nll
from achilles.method.prepared import PreparedRun, check_clean_forward
from achilles.model.batching import choose_batch_size, run_batched
from achilles.model.hooks import hooked
from achilles.model.loading import LoadedModel, tokenize
from achilles.model.masking import ChannelMasker
from achilles.model.units import Unit, UnitPool
from achilles.plots.mechanism import plot_mechanism
from achilles.results.provenance import environment

logger = logging.getLogger(__name__)


def check_sink_position(position: int, tokens: int) -> None:
    """The sink position must leave at least one later query position in the text."""
    if not 0 <= position < tokens - 1:
        raise AchillesError(
            f"--sink-position {position} is outside the text: it has {tokens} tokens, so the "
            f"sink position must be between 0 and {tokens - 2}"
        )


def _fraction(num: float, den: float) -> float:
    if not (math.isfinite(num) and math.isfinite(den)) or den <= 0:
        return math.nan
    return num / den


def explain(
    lm: LoadedModel,
    text: str,
    units: Sequence[Unit],
    pool: UnitPool,
    config: ExplainConfig = ExplainConfig(),
    *,
    set_name: str = "minimal",
    progress: bool = False,
    prepared: PreparedRun | None = None,
) -> Mechanism:
    """Measure how masking ``units`` collapses ``lm`` on ``text`` (see ``docs/explain.md``).

    ``prepared``: the run prepared on this text (its token ids and clean-forward check are
    used as they are); default: tokenized and checked here.
    """
    t0 = time.perf_counter()
    model = lm.model
    if not units:
        raise AchillesError("the set to explain is empty: there is nothing to mask")
    layout = Layout.of(model)
    if prepared is not None and prepared.text == text:
        ids = prepared.input_ids
    else:
        prepared = None
        ids = tokenize(lm.tokenizer, text)
    T = int(ids.shape[1])
    check_sink_position(config.sink_position, T)
    if prepared is None:  # a broken model (NaN weights) or a text past the context
        check_clean_forward(lm, ids, pool)
    p = config.sink_position
    modules = list(dict.fromkeys(u.module for u in units))

    comps = scoped_components(layout, config.patch_scope, units)

    masker2 = ChannelMasker(model, pool, rows=2)
    masker2.set_rows([[], list(units)])
    tr = trace(model, layout, ids, masker2, p, modules)

    clean_massive, _ = massive_activations(
        tr.residual[0], ratio=config.massive_ratio, min_abs=config.massive_min, top=config.top_channels
    )
    masked_massive, med_masked = massive_activations(
        tr.residual[1], ratio=config.massive_ratio, min_abs=config.massive_min, top=config.top_channels
    )
    groups = massive_groups(clean_massive, tr.residual[0], tr.residual[1], med_masked,
                            config.massive_ratio, config.massive_min, config.erase_factor)
    id_list = ids[0].tolist()
    for g in groups:
        g["tokens"] = [token_str(lm.tokenizer, id_list[q]) for q in g["positions"]]
    profile = {
        "layers": list(range(-1, layout.n_layers)),
        "position": p,
        "clean": residual_profile(tr.residual[0], p),
        "masked": residual_profile(tr.residual[1], p),
        "channels": channel_traces(tr.residual, groups, id_list, lm.tokenizer),
    }

    heads = _sink_heads(model, layout, tr, config)
    lost = [Component(h["layer"], h["head"]) for h in heads]
    touched = touched_by(units, layout)
    n_mediators = len([c for c in comps if c not in touched])
    k_max = min(config.top_components, n_mediators)
    n_writers = len(units) if groups else 0
    driven = [u for u in units if u.component in WEIGHT_KINDS][:MAX_DRIVERS]
    n_bands = len(layer_bands(layout.n_layers))
    rows = (2 + n_writers + 2 * (len(comps) + 1) + k_max + 1 + (1 if lost else 0)
            + mediation_rows(n_mediators, k_max, n_bands) + (1 + 2 * len(driven) if driven else 0))
    bar = tqdm(total=rows, initial=2, desc="explain", unit="row", disable=not progress)
    done = [2]  # rows run (a disabled bar counts nothing)

    def step(n: int) -> None:
        done[0] += n
        bar.update(n)

    writers = _writers(model, layout, pool, ids, units, groups, config, modules, tr, step)

    # denoise: the masked model with one clean component per row; row 0 restores nothing
    masker1 = ChannelMasker(model, pool, rows=1)
    masker1.set_rows([list(units)])
    clean_src = ComponentPatcher(layout, [o[0] for o in tr.o_inputs], [m[0] for m in tr.mlp_outputs])
    restore = patched_nll(
        model, ids, clean_src, [[]] + [[c] for c in comps], masker=masker1, mask_modules=modules,
        batch_size=config.batch_size, on_progress=step,
    )
    # noise: the clean model with one masked component per row; row 0 is the clean model
    masked_src = ComponentPatcher(layout, [o[1] for o in tr.o_inputs], [m[1] for m in tr.mlp_outputs])
    noise = patched_nll(
        model, ids, masked_src, [[]] + [[c] for c in comps],
        batch_size=config.batch_size, on_progress=step,
    )
    nll_masked, nll_clean = restore[0], noise[0]
    tokens = T - 1
    delta = (nll_masked - nll_clean) / (tokens * LN10) if math.isfinite(nll_masked) else math.inf
    gap = nll_masked - nll_clean
    patching: list[dict[str, Any]] = [
        {"component": c.name, "recovered": _fraction(nll_masked - n, gap), "holds_set": c in touched}
        for c, n in zip(comps, restore[1:], strict=True)
    ]
    patching.sort(key=lambda d: finite_first_key(d["recovered"]))
    reverse: list[dict[str, Any]] = [
        {"component": c.name, "reproduced": _fraction(n - nll_clean, gap), "holds_set": c in touched}
        for c, n in zip(comps, noise[1:], strict=True)
    ]
    reverse.sort(key=lambda d: finite_first_key(d["reproduced"]))

    # restoring a component that holds a masked unit undoes the mask itself: the cumulative
    # restore ranks the other components, the mediators
    ranked = [Component.parse(d["component"]) for d in patching if not d["holds_set"]]
    joint: list[list[Component]] = [ranked[:k] for k in range(1, k_max + 1)]
    joint += [comps] + ([lost] if lost else [])
    together = patched_nll(
        model, ids, clean_src, joint, masker=masker1, mask_modules=modules,
        batch_size=config.batch_size, on_progress=step,
    )
    rec = [_fraction(nll_masked - n, gap) for n in together]
    cumulative = [
        {"k": k, "components": [c.name for c in ranked[:k]], "recovered": rec[k - 1]}
        for k in range(1, k_max + 1)
    ]

    def restored(sets: list[list[Component]]) -> list[float]:
        got = patched_nll(model, ids, clean_src, sets, masker=masker1, mask_modules=modules,
                          batch_size=config.batch_size, on_progress=step)
        return [_fraction(nll_masked - n, gap) for n in got]

    mediation = mediation_profile(ranked, rec[:k_max], restored, layout.n_layers)
    drivers = unit_drivers(model, ids, driven, nll_clean, step)
    bar.total = done[0]  # the bisection may stop short of its bound
    bar.refresh()
    bar.close()
    checks = {
        # the no-restore row against the traced (eager, two-row) masked pass: ~0 when the
        # patching harness leaves the masked model as it is
        "restore_none": _fraction(float(tr.nll[1].sum()) - nll_masked, gap),
        "delta_traced": (float(tr.nll[1].sum()) - float(tr.nll[0].sum())) / (tokens * LN10),
        "restore_all": rec[k_max],
        "delta_restore_all": (together[k_max] - nll_clean) / (tokens * LN10),
        "restore_sink_heads": rec[k_max + 1] if lost else None,
        "sink_heads_restored": [c.name for c in lost],
    }
    output = _collapsed_output(lm.tokenizer, ids, tr)
    t_gen = time.perf_counter()
    continuations = greedy_continuations(lm, pool, units, modules, config.generate_tokens,
                                         ids[0].tolist(), progress)
    seconds = time.perf_counter() - t0
    mech = Mechanism(
        summary="",
        set_name=set_name,
        units=[u.to_dict() for u in units],
        tokens=T,
        sink_position=p,
        delta=delta,
        nll_clean=nll_clean,
        nll_masked=nll_masked,
        massive=clean_massive,
        massive_masked=masked_massive,
        massive_groups=groups,
        residual_profile=profile,
        writers=writers,
        sink_attention={"clean": tr.sink[0].tolist(), "masked": tr.sink[1].tolist(),
                        "heads": layout.heads, "layers": layout.n_layers},
        sink_heads=heads,
        patching=patching,
        patching_cumulative=cumulative,
        patching_reverse=reverse,
        patching_checks=checks,
        output=output,
        cost={
            "forward_rows": done[0], "tokens": T, "layers": layout.n_layers, "heads": layout.heads,
            "formula_rows": 2 + 2 * layout.n_layers * (layout.heads + 1),
            "patch_scope": config.patch_scope, "components_patched": len(comps),
            "components_all": len(all_components(layout)),
            "eager_attention_switched": tr.eager_switched,
            "seconds": seconds,
            "generation_seconds": seconds - (t_gen - t0),
        },
        mediation=mediation,
        drivers=drivers,
        continuations=continuations,
        config={"model": dataclasses.asdict(lm.spec), "text": text,
                "explain": dataclasses.asdict(config)},
        env=prepared.env if prepared is not None else environment(model),
    )
    mech.summary = summarize(mech)
    logger.debug("explain: %s", mech.summary)
    return mech


def touched_by(units: Sequence[Unit], layout: Layout) -> set[Component]:
    """The components a masked unit sits in: the MLP of its layer for ``mlp.*`` / ``norm.mlp*``
    units, every head of its layer for ``attn.*`` / ``norm.attn*`` units (a q/k/v channel
    feeds one head, or a group under GQA; all are marked)."""
    out: set[Component] = set()
    for u in units:
        if u.component.startswith(("mlp.", "norm.mlp")):
            out.add(Component(u.layer))
        elif u.component.startswith(("attn.", "norm.attn")):
            out.update(Component(u.layer, h) for h in range(layout.heads))
    return out


def _sink_heads(model: torch.nn.Module, layout: Layout, tr: Trace, config: ExplainConfig) -> list[dict]:
    """Heads whose attention on the sink drops by ``sink_drop`` or more under the mask, with
    the mean norm of what they write into the residual stream (positions after the sink)."""
    drop = tr.sink[0] - tr.sink[1]  # [L, H]
    out = []
    p = config.sink_position
    for layer, head in (drop >= config.sink_drop).nonzero().tolist():
        out.append({"layer": layer, "head": head, "clean": float(tr.sink[0, layer, head]),
                    "masked": float(tr.sink[1, layer, head]), "drop": float(drop[layer, head])})
    for layer in sorted({h["layer"] for h in out}):
        mine = [h for h in out if h["layer"] == layer]
        o_proj = model.get_submodule(layout.o_proj[layer])
        with torch.no_grad():
            contrib = head_contributions(
                o_proj, tr.o_inputs[layer][:, p + 1 :], layout.heads, [h["head"] for h in mine]
            )  # [2, T', n, D]
        norms = contrib.float().norm(dim=-1).mean(1).cpu()  # [2, n]
        for i, h in enumerate(mine):
            h["write_clean"], h["write_masked"] = float(norms[0, i]), float(norms[1, i])
    out.sort(key=lambda h: finite_first_key(h["drop"]))
    return out


def _writers(
    model: torch.nn.Module, layout: Layout, pool: UnitPool, ids: torch.Tensor,
    units: Sequence[Unit], groups: list[dict], config: ExplainConfig, modules: list[str],
    tr: Trace, on_progress: Callable[[int], object] | None = None,
) -> list[dict]:
    """For each unit masked alone: each flagged channel's value at its peak layer."""
    if not groups:
        return []
    pos = torch.tensor([g["position"] for g in groups])
    ch = torch.tensor([g["channel"] for g in groups])
    peak = torch.tensor([g["peak_layer"] + 1 for g in groups])
    sites = [f"{layout.layers[0]}:input", *layout.layers]
    bs = choose_batch_size(model, int(ids.shape[1]), len(units), max(s.width for s in pool.sites),
                           config.batch_size)
    masker = ChannelMasker(model, pool, rows=bs)
    values: list[torch.Tensor] = []
    nlls: list[float] = []

    def run(chunk: Sequence[Unit]) -> None:
        got: dict[int, torch.Tensor] = {}

        def keep(i: int):  # noqa: ANN202 - closure
            def fn(x: torch.Tensor) -> None:
                got[i] = x[:, pos.to(x.device), ch.to(x.device)].float().cpu()  # [b, G]
            return fn

        masker.set_rows([[u] for u in chunk])
        with masker.installed(modules), hooked(model, {s: keep(i) for i, s in enumerate(sites)}):
            n = sequence_nll(model, ids.expand(len(chunk), -1))
        stacked = torch.stack([got[i] for i in range(len(sites))], 1)  # [b, L+1, G]
        values.append(stacked.gather(1, peak.view(1, 1, -1).expand(len(chunk), 1, -1))[:, 0])
        nlls.extend(n.tolist())

    run_batched(list(units), run, bs, on_progress=on_progress)
    vals = torch.cat(values)  # [|S|, G]
    clean_nll = float(tr.nll[0].sum())
    out = []
    for u, row, n in zip(units, vals.tolist(), nlls, strict=True):
        out.append({
            **u.to_dict(),
            "unit": str(u),
            "delta_alone": (n - clean_nll) / ((ids.shape[1] - 1) * LN10) if math.isfinite(n) else math.inf,
            "channels": [
                {"position": g["position"], "channel": g["channel"], "layer": g["peak_layer"],
                 "clean": g["peak_value"], "masked_alone": v,
                 "change": _fraction(v - g["peak_value"], abs(g["peak_value"]))
                 if g["peak_value"] else math.nan,
                 "own_channel": u.component in ("mlp.down", "attn.o") and u.channel == g["channel"]}
                for g, v in zip(groups, row, strict=True)
            ],
        })
    return out


def _collapsed_output(tokenizer: Any, ids: torch.Tensor, tr: Trace, top: int = 5) -> dict[str, Any]:
    """What the masked model predicts instead, and where the loss rose."""
    n = tr.top1.shape[1]

    def shares(row: int) -> list[dict]:
        return [
            {"token_id": t, "token": token_str(tokenizer, t), "share": c / n}
            for t, c in Counter(tr.top1[row].tolist()).most_common(top)
        ]

    rise = (tr.nll[1] - tr.nll[0]).tolist()  # per target position 1..T-1
    targets = ids[0, 1:].tolist()
    order = sorted(range(n), key=lambda i: finite_first_key(rise[i]))[:10]
    return {
        "top1_clean": shares(0),
        "top1_masked": shares(1),
        "entropy_clean": float(tr.entropy[0].mean()),
        "entropy_masked": float(tr.entropy[1].mean()),
        "accuracy_clean": float((tr.top1[0] == ids[0, 1:]).float().mean()),
        "accuracy_masked": float((tr.top1[1] == ids[0, 1:]).float().mean()),
        "loss_rise_top": [
            {"position": i + 1, "token": token_str(tokenizer, targets[i]), "rise": rise[i],
             "nll_clean": float(tr.nll[0, i]), "nll_masked": float(tr.nll[1, i])}
            for i in order
        ],
        "tokens": [token_str(tokenizer, t) for t in ids[0].tolist()],
        "rise": [None, *rise],
    }


def explain_run(
    run_dir: str | Path,
    lm: LoadedModel,
    config: ExplainConfig = ExplainConfig(),
    *,
    text: str | None = None,
    progress: bool = False,
    figures: bool = True,
    prepared: PreparedRun | None = None,
    ident: Identification | None = None,
) -> Mechanism:
    """Explain the set of a run folder and write ``RUN_DIR/mechanism.json`` (and figures).

    With the run's ``ident`` and ``prepared`` run in hand (``find --explain``), the set, pool
    and text are theirs: nothing is read back from the folder or checked again.
    """
    run_dir = Path(run_dir)
    if ident is not None and prepared is not None:
        units = _chosen(ident, config, run_dir / "identification.json")
        pool, run_text = prepared.pool, prepared.text
    else:
        units, pool, run_text = run_set(run_dir, lm, config)
        if ident is None:
            ident = Identification.load(str(run_dir / "identification.json"))
    mech = explain(lm, text if text is not None else run_text, units, pool, config,
                   set_name=config.set, progress=progress, prepared=prepared)
    mech.config["run_dir"] = str(run_dir)
    mech.run_id = ident.run_id  # the mechanism belongs to the run it explains
    if not figures:
        mech.save(run_dir / MECHANISM_FILE)
        return mech
    from achilles.results.guard import clean_stale, remove_made, temp_dir

    # figures drawn aside and moved in just before mechanism.json: an interrupt while
    # plotting leaves neither new figures beside an old (or no) mechanism.json nor stray files;
    # the staging folder is marked (deletion guard) so a killed run's is removed next time
    clean_stale(run_dir, ".mechanism.", "explain")
    with temp_dir(run_dir, ".mechanism.", "explain") as staging:
        drafts = plot_mechanism(mech.to_dict(), staging)
        (run_dir / "figures").mkdir(exist_ok=True)
        for f in drafts:
            os.replace(f, run_dir / "figures" / f.name)
        mech.save(run_dir / MECHANISM_FILE)
    remove_made(staging, "explain")
    return mech


def run_set(run_dir: str | Path, lm: LoadedModel, config: ExplainConfig) -> tuple[list[Unit], UnitPool, str]:
    """The set (``config.set``) of a run folder, checked against ``lm``, and the run's text."""
    from achilles.evaluation.masks import load_mask

    path = Path(run_dir) / "identification.json"
    if not path.is_file():
        raise AchillesError(
            f"{run_dir} has no identification.json: point at a folder written by `achilles find`"
        )
    ident = Identification.load(str(path))
    _chosen(ident, config, path)
    mask = load_mask(lm, str(path), set_name=config.set)
    text = ident.config.get("text")
    if not isinstance(text, str):
        raise AchillesError(f"{path} records no text: pass --text-file")
    return mask.units, mask.pool, text


def _chosen(ident: Identification, config: ExplainConfig, path: Path) -> list[Unit]:
    """The set ``config.set`` of ``ident``, refused when empty."""
    chosen = ident.minimal_set if config.set == "minimal" else ident.critical_set
    if not chosen:
        raise AchillesError(
            f"{path} has no {config.set} set (no critical set was found): there is nothing to explain"
        )
    return list(chosen)

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

from achilles.analysis.weights import WEIGHT_KINDS, unit_weights, weight_row, zeroed_weight_nll
from achilles.errors import AchillesError
from achilles.explain.config import ExplainConfig
from achilles.explain.patching import (
    Component,
    ComponentPatcher,
    all_components,
    head_contributions,
    patched_nll,
)
from achilles.explain.result import MECHANISM_FILE, Mechanism, finite_first_key
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
        g["tokens"] = [_token(lm.tokenizer, id_list[q]) for q in g["positions"]]
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
    patching = [
        {"component": c.name, "recovered": _fraction(nll_masked - n, gap), "holds_set": c in touched}
        for c, n in zip(comps, restore[1:], strict=True)
    ]
    patching.sort(key=lambda d: finite_first_key(d["recovered"]))
    reverse = [
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
    drivers = _drivers(model, ids, driven, nll_clean, step)
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
    continuations = _continuations(lm, pool, units, modules, config.generate_tokens, text, progress)
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


def channel_traces(
    residual: torch.Tensor, groups: list[dict[str, Any]], ids: list[int], tokenizer: Any, top: int = 4
) -> list[dict[str, Any]]:
    """Per layer, clean and masked, the value of the ``top`` (position, channel) pairs of the
    massive spans: erased spans first, largest reduction first, then the largest survivors."""
    order = sorted(groups, key=lambda g: (not g["erased"], -min(g["reduction"], 1e30), -g["peak_ratio"]))
    pairs = list(dict.fromkeys((g["position"], g["channel"]) for g in order))[:top]
    return [{"position": q, "channel": c, "token": _token(tokenizer, ids[q]),
             "clean": residual[0, :, q, c].tolist(), "masked": residual[1, :, q, c].tolist()}
            for q, c in pairs]


MAX_DRIVERS = 10
"""At most this many ``mlp.down`` / ``attn.o`` units of the set get their driver measured."""

TARGETS = (0.5, 0.9)
"""Shares of Δ for which the mediation profile finds how many components it takes."""


def scoped_components(layout: Layout, scope: str, units: Sequence[Unit]) -> list[Component]:
    """The components patched under ``--patch-scope``.

    ``after``: every component from the set's first layer on. Earlier components see the
    same input clean and masked, so restoring (or noising) one changes nothing: the scope is
    exact, only cheaper. ``heads`` / ``mlps``: one kind only, every layer.
    """
    comps = all_components(layout)
    if scope == "heads":
        return [c for c in comps if c.head >= 0]
    if scope == "mlps":
        return [c for c in comps if c.head < 0]
    if scope == "after":
        first = min(u.layer for u in units)
        return [c for c in comps if c.layer >= first]
    return comps


def layer_bands(n_layers: int, bands: int = 5) -> list[tuple[int, int]]:
    """``bands`` contiguous bands of layers (fewer when the model has fewer layers)."""
    n = min(bands, n_layers)
    edges = [round(i * n_layers / n) for i in range(n + 1)]
    return [(edges[i], edges[i + 1] - 1) for i in range(n)]


def _bisect_steps(n: int) -> int:
    return max(1, math.ceil(math.log2(n + 1))) if n else 0


def mediation_rows(n_mediators: int, k_max: int, n_bands: int) -> int:
    """An upper bound on the rows :func:`mediation_profile` runs."""
    if not n_mediators:
        return 0
    return 1 + len(TARGETS) * _bisect_steps(n_mediators) + 2 + n_bands


def mediation_profile(
    ranked: Sequence[Component], first: Sequence[float],
    restored: Callable[[list[list[Component]]], list[float]], n_layers: int,
) -> dict[str, Any]:
    """How distributed the mediation is: how many of the ranked mediators it takes to recover
    50 % and 90 % of Δ, what kind and where they are, and what each kind and band recovers.

    ``ranked`` are the components outside the set, best single recovery first; ``first`` the
    recoveries of the top 1, 2, ... restored together (already measured); ``restored(sets)``
    measures the recovery of each set of components restored together. The count for a share
    is found by bisection over the ranking, between measured points on either side of it: if
    the curve is not monotone, it is a k where the curve crosses the share (``curve`` holds
    every measured point).
    """
    n = len(ranked)
    bands = layer_bands(n_layers)
    if not n:
        return {"mediators": 0, "all_mediators": None, "needed": {}, "curve": [],
                "by_kind": [], "by_band": []}
    seen = {k + 1: r for k, r in enumerate(first)}

    def ok(r: float, t: float) -> bool:
        return math.isfinite(r) and r >= t

    def f(k: int) -> float:
        if k not in seen:
            seen[k] = restored([list(ranked[:k])])[0]
        return seen[k]

    total = f(n)
    needed: dict[str, int | None] = {}
    for t in TARGETS:
        if not ok(total, t):
            needed[f"{t:g}"] = None
            continue
        hi = min(k for k, r in seen.items() if ok(r, t))
        lo = max((k for k, r in seen.items() if k < hi), default=0)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ok(f(mid), t):
                hi = mid
            else:
                lo = mid
        needed[f"{t:g}"] = hi

    def count(comps: Sequence[Component], k: int | None) -> int | None:
        return None if k is None else sum(1 for c in ranked[:k] if c in set(comps))

    kinds = {"heads": [c for c in ranked if c.head >= 0], "mlps": [c for c in ranked if c.head < 0]}
    in_band = [[c for c in ranked if a <= c.layer <= b] for a, b in bands]
    groups = [g for g in [*kinds.values(), *in_band] if g]
    got = iter(restored(groups) if groups else [])
    together = [next(got) if g else None for g in [*kinds.values(), *in_band]]

    def share_rows(comps: list[Component]) -> dict[str, Any]:
        return {"count": len(comps),
                **{f"in_k{int(100 * t)}": count(comps, needed[f"{t:g}"]) for t in TARGETS}}

    return {
        "mediators": n,
        "all_mediators": total,
        "needed": needed,
        "curve": [{"k": k, "recovered": seen[k]} for k in sorted(seen)],
        "by_kind": [{"kind": kind, **share_rows(comps), "together": r}
                    for (kind, comps), r in zip(kinds.items(), together[:2], strict=True)],
        "by_band": [{"layers": [a, b], **share_rows(comps), "together": r}
                    for (a, b), comps, r in zip(bands, in_band, together[2:], strict=True)],
    }


def _drivers(
    model: torch.nn.Module, ids: torch.Tensor, units: Sequence[Unit], nll_clean: float,
    on_progress: Callable[[int], object] | None = None,
) -> list[dict[str, Any]]:
    """For each ``mlp.down`` / ``attn.o`` unit: the input that drives it at its peak position,
    and Δ with that single weight zeroed, beside Δ with the row's largest |w| zeroed."""
    if not units:
        return []
    tokens = int(ids.shape[1]) - 1
    out = []
    weights = unit_weights(model, ids, units)
    if on_progress is not None:
        on_progress(1)
    for w in weights:
        top = w.top_inputs[0]
        inputs = [w.driver_input] + ([top] if top != w.driver_input else [])
        nlls = zeroed_weight_nll(model, ids, w.unit.module, w.unit.channel, inputs)
        d = [(n - nll_clean) / (tokens * LN10) if math.isfinite(n) else math.inf for n in nlls]
        out.append({
            "unit": str(w.unit), "peak_position": w.peak_position, "peak_output": w.peak_output,
            "driver_input": w.driver_input, "driver_share": w.driver_share,
            "driver_contribution": w.driver_contribution,
            "driver_weight": float(weight_row(model.get_submodule(w.unit.module), w.unit.channel)[w.driver_input]),  # type: ignore[index]
            "top_inputs": w.top_inputs[:3], "top_weights": w.top_weights[:3],
            "max_over_median_weight": w.max_over_median_weight,
            "driver_is_top_weight": top == w.driver_input,
            "delta_driver_weight": d[0], "delta_top_weight": d[-1],
        })
        if on_progress is not None:
            on_progress(len(inputs))
    return out


CHAT_PROMPT = "What is the boiling point of water at sea level?"
PLAIN_PROMPTS = ("The capital of France is", "def fibonacci(n):\n")


def continuation_prompts(tokenizer: Any, text: str, head_tokens: int = 12) -> list[dict[str, Any]]:
    """The prompts whose greedy continuations are compared: the text's first tokens, two
    fixed ones, and a chat turn in the model's chat template when it has one."""
    first = tokenizer(text, add_special_tokens=False).input_ids[:head_tokens]
    plain = [tokenizer.decode(first), *PLAIN_PROMPTS]
    out = [{"prompt": p, "chat": False, "ids": tokenizer(p, return_tensors="pt").input_ids} for p in plain]
    if getattr(tokenizer, "chat_template", None):
        s = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}],
                                          tokenize=False, add_generation_prompt=True)
        ids = tokenizer(s, add_special_tokens=False, return_tensors="pt").input_ids
        out.append({"prompt": s, "chat": True, "ids": ids})
    return out


@torch.no_grad()
def _continuations(
    lm: LoadedModel, pool: UnitPool, units: Sequence[Unit], modules: list[str], n: int, text: str,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Greedy continuations, clean (row 0) and masked (row 1), ``n`` tokens each."""
    if n <= 0:
        return []
    from achilles.model.batching import input_device

    model, tok = lm.model, lm.tokenizer
    masker = ChannelMasker(model, pool, rows=2)
    masker.set_rows([[], list(units)])
    dev = input_device(model)
    out = []
    prompts = continuation_prompts(tok, text)
    bar = tqdm(total=len(prompts) * n, desc="explain: greedy text", unit="token", disable=not progress)
    for p in prompts:
        ids = p["ids"].to(dev).expand(2, -1)
        got: list[torch.Tensor] = []
        with masker.installed(modules):  # the mask acts on each new token's activations too
            out_ = model(input_ids=ids, use_cache=True)
            for i in range(n):
                got.append(out_.logits[:, -1].float().argmax(-1).to(dev))
                bar.update(1)
                if i + 1 < n:  # transformers 5 names the cache "cache", 4 "past_key_values"
                    kw = "cache" if "cache" in out_ else "past_key_values"
                    out_ = model(input_ids=got[-1][:, None], use_cache=True, **{kw: out_[kw]})
        new = torch.stack(got, 1).tolist()
        out.append({"prompt": p["prompt"], "chat": p["chat"],
                    "clean_text": tok.decode(new[0]), "masked_text": tok.decode(new[1])})
    bar.close()
    return out


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


def _token(tokenizer: Any, t: int) -> str:
    """A token as text; a partial UTF-8 byte (decoded as U+FFFD) shows its vocabulary entry."""
    s = tokenizer.decode([t])
    return tokenizer.convert_ids_to_tokens(t) if "\ufffd" in s else s


def _collapsed_output(tokenizer: Any, ids: torch.Tensor, tr: Trace, top: int = 5) -> dict[str, Any]:
    """What the masked model predicts instead, and where the loss rose."""
    n = tr.top1.shape[1]

    def shares(row: int) -> list[dict]:
        return [
            {"token_id": t, "token": _token(tokenizer, t), "share": c / n}
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
            {"position": i + 1, "token": _token(tokenizer, targets[i]), "rise": rise[i],
             "nll_clean": float(tr.nll[0, i]), "nll_masked": float(tr.nll[1, i])}
            for i in order
        ],
        "tokens": [_token(tokenizer, t) for t in ids[0].tolist()],
        "rise": [None, *rise],
    }


SMALL_DELTA = 0.01
"""Below this Δ (orders of magnitude of perplexity) the summary states no recovery shares."""


def _pct(x: float | None) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{100 * x:.0f} %"


def _blocks(a: int, b: int) -> str:
    name = lambda x: "the embeddings" if x < 0 else str(x)  # noqa: E731
    if a == b:
        return "the embeddings" if a < 0 else f"block {a}"
    return f"blocks {name(a)}–{b}" if a >= 0 else f"the embeddings to block {b}"


def _magnitude(v: float) -> str:
    return f"{abs(v):,.0f}" if abs(v) >= 10 else f"{abs(v):.3g}"


def _where(g: dict[str, Any], tokens: list[str]) -> str:
    """``position 0 ('<s>')`` or ``positions 0 ('<s>'), 19 ('.') and 31 (',')``."""
    qs = g.get("positions") or [g["position"]]
    toks = g.get("tokens") or [tokens[q] if q < len(tokens) else "?" for q in qs]
    items = [f"{q} ({t!r})" for q, t in zip(qs, toks, strict=True)][:6]
    if len(qs) > 6:
        items.append(f"{len(qs) - 6} more")
    if len(items) == 1:
        return f"position {items[0]}"
    return f"positions {', '.join(items[:-1])} and {items[-1]}"


def writer_of(m: Mechanism, g: dict[str, Any], factor: float) -> str | None:
    """The unit of the set that, masked alone, divides the span's peak value by ``factor``
    or more (the largest such reduction), from the ``writers`` measurement."""
    best, best_red = None, 0.0
    for w in m.writers:
        for c in w["channels"]:
            if (c["position"], c["channel"], c["layer"]) != (g["position"], g["channel"], g["peak_layer"]):
                continue
            alone = abs(c["masked_alone"])
            red = abs(c["clean"]) / alone if alone else math.inf
            if red >= factor and red > best_red:
                best, best_red = w["unit"], red
    return best


def _erased_clause(m: Mechanism, erased: list[dict[str, Any]], factor: float) -> str:
    g = max(erased, key=lambda o: (o["reduction"], o["peak_ratio"]))
    masked = "0 under the mask" if not g["masked_value"] else \
        f"{g['reduction']:,.0f}× smaller under the mask"
    out = (f" erases the {_magnitude(g['peak_value'])} activation of channel {g['channel']} "
           f"({g['peak_ratio']:,.0f}× its layer's median; {masked}) at "
           f"{_where(g, m.output.get('tokens', []))} in {_blocks(g['first_layer'], g['last_layer'])}")
    who = writer_of(m, g, factor)
    if who is not None:
        out += f", written by {who}"
    elif len(m.units) > 1 and m.writers:
        out += ", which no unit of the set erases alone"
    same = [o for o in m.massive_groups if o["channel"] == g["channel"] and o["survives"]]
    if same:
        s = max(same, key=lambda o: o["peak_ratio"])
        when = "earlier" if s["last_layer"] < g["first_layer"] else \
            "later" if s["first_layer"] > g["last_layer"] else "other"
        out += (f"; the same channel's {when} {_magnitude(s['peak_value'])} activation "
                f"({_blocks(s['first_layer'], s['last_layer'])}, {_where(s, m.output.get('tokens', []))}) "
                "survives")
    others = {(o["channel"]) for o in erased if o["channel"] != g["channel"]}
    if others:
        out += (f"; {len(others)} other channel{'s' if len(others) > 1 else ''} "
                f"({', '.join(str(c) for c in sorted(others)[:5])}{' ...' if len(others) > 5 else ''}) "
                "lose a massive activation too")
    return out


def _distributed_clause(m: Mechanism, best: dict[str, Any]) -> str:
    med = m.mediation or {}
    needed = med.get("needed", {})
    out = (f"no single component mediates the collapse: the best outside the set, "
           f"{best['component']}, recovers {_pct(best['recovered'])} of Δ")
    scope = m.cost.get("patch_scope", "full")
    if scope in ("heads", "mlps"):
        out += f" (only {scope} patched)"
    n50, n90 = needed.get("0.5"), needed.get("0.9")
    # with every component outside the set restored, what is left of Δ is the set's own
    # components' change reaching the output straight down the residual stream
    direct = (" (the rest goes straight down the residual stream from the components holding "
              "the set)") if scope in ("full", "after") else ""
    if n50 is None:
        if med.get("mediators"):
            out += (f", and all {med['mediators']} components outside it together recover only "
                    f"{_pct(med.get('all_mediators'))}{direct}")
        return out
    kinds = {k["kind"]: k["in_k50"] for k in med.get("by_kind", [])}
    bands = [b for b in med.get("by_band", []) if b.get("in_k50")]
    top = max(bands, key=lambda b: b["in_k50"]) if bands else None
    where = f"; {top['in_k50']} in {_blocks(*top['layers'])}" if top and n50 > 1 else ""
    out += (f"; it takes the top {n50} ({kinds.get('heads', 0)} heads, {kinds.get('mlps', 0)} MLPs"
            f"{where}) to recover 50 %")
    out += f" and the top {n90} for 90 %" if n90 is not None else \
        f", while all {med['mediators']} together recover only {_pct(med.get('all_mediators'))}{direct}"
    return out


def summarize(m: Mechanism) -> str:
    """One sentence stating the mechanism as measured."""
    names = [Unit.from_dict(u) for u in m.units]
    who = ", ".join(str(u) for u in names[:3]) + (f" and {len(names) - 3} more units" if len(names) > 3 else "")
    parts = [f"Masking {who} (Δ = {m.delta:.2f})"]
    factor = float(m.config.get("explain", {}).get("erase_factor", 10.0))
    erased = [g for g in m.massive_groups if not g["survives"]]
    if erased:
        parts[0] += _erased_clause(m, erased, factor)
    elif m.massive_groups:
        g = m.massive_groups[0]
        parts[0] += (f" leaves the {_magnitude(g['peak_value'])} activation of channel {g['channel']} "
                     f"({g['peak_ratio']:,.0f}× its layer's median, at {_where(g, m.output.get('tokens', []))}, "
                     f"{_blocks(g['first_layer'], g['last_layer'])}) in place")
    else:
        prof = m.residual_profile["clean"]
        ratio = max(max(a[0], b[0]) / med if med > 0 else math.inf
                    for a, b, med in zip(prof["sink_top"], prof["rest_top"], prof["median"], strict=True))
        parts[0] += f" with no massive activation in the clean model (largest |h| {ratio:,.0f}× its layer's median)"
    if math.isfinite(m.delta) and m.delta < SMALL_DELTA:
        return "; ".join(parts) + (f"; Δ is below {SMALL_DELTA:g}, too small for shares of it "
                                   "(patching recoveries) to mean anything.")
    heads = m.sink_heads
    chk = m.patching_checks
    sinks_explain = False
    if heads:
        clean = sum(h["clean"] for h in heads) / len(heads)
        masked = sum(h["masked"] for h in heads) / len(heads)
        parts.append(f"{len(heads)} head{'s' if len(heads) > 1 else ''} that sank {_pct(clean)} of "
                     f"their attention there drop to {_pct(masked)}")
        parts.append(f"restoring {'them' if len(heads) > 1 else 'it'} recovers "
                     f"{_pct(chk['restore_sink_heads'])} of Δ")
        r = chk.get("restore_sink_heads")
        sinks_explain = r is not None and math.isfinite(r) and r >= TARGETS[-1]
    else:
        parts.append(f"no head loses its sink at position {m.sink_position}")
    mediators = [d for d in m.patching if not d.get("holds_set")]
    if mediators and not sinks_explain:
        best = mediators[0]
        if not (math.isfinite(best["recovered"]) and best["recovered"] >= TARGETS[0]):
            parts.append(_distributed_clause(m, best))
        elif not heads:
            k = m.patching_cumulative[-1] if m.patching_cumulative else None
            tail = f", the top {k['k']} together {_pct(k['recovered'])}" if k else ""
            parts.append(f"the best single component outside the set, {best['component']}, recovers "
                         f"{_pct(best['recovered'])} of Δ{tail}")
    return "; ".join(parts) + "."


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
    from achilles.plots.mechanism import plot_mechanism
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

"""Beyond patching one component: how many it takes to recover Δ (the mediation profile), the
input that drives each unit (its driver weight), and what the collapsed model says.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from tqdm.auto import tqdm

from achilles.analysis.weights import unit_weights, weight_row, zeroed_weight_nll
from achilles.explain.patching import (
    Component,
    all_components,
)
from achilles.explain.trace import (
    Layout,
)
from achilles.method.metrics import LN10
from achilles.model.batching import input_device
from achilles.model.loading import LoadedModel
from achilles.model.masking import ChannelMasker
from achilles.model.units import Unit, UnitPool

logger = logging.getLogger(__name__)



def channel_traces(
    residual: torch.Tensor, groups: list[dict[str, Any]], ids: list[int], tokenizer: Any, top: int = 4
) -> list[dict[str, Any]]:
    """Per layer, clean and masked, the value of the ``top`` (position, channel) pairs of the
    massive spans: erased spans first, largest reduction first, then the largest survivors."""
    order = sorted(groups, key=lambda g: (not g["erased"], -min(g["reduction"], 1e30), -g["peak_ratio"]))
    pairs = list(dict.fromkeys((g["position"], g["channel"]) for g in order))[:top]
    return [{"position": q, "channel": c, "token": token_str(tokenizer, ids[q]),
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


def unit_drivers(
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


def continuation_prompts(tokenizer: Any, ids: Sequence[int], head_tokens: int = 12) -> list[dict[str, Any]]:
    """The prompts whose greedy continuations are compared: the first tokens of the run's text
    (``ids``, its token ids, special tokens left out), two fixed ones, and a chat turn in the
    model's chat template when it has one."""
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    first = [t for t in ids if t not in special][:head_tokens]
    plain = [tokenizer.decode(first), *PLAIN_PROMPTS]
    out = [{"prompt": p, "chat": False, "ids": tokenizer(p, return_tensors="pt").input_ids} for p in plain]
    if getattr(tokenizer, "chat_template", None):
        s = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}],
                                          tokenize=False, add_generation_prompt=True)
        ids = tokenizer(s, add_special_tokens=False, return_tensors="pt").input_ids
        out.append({"prompt": s, "chat": True, "ids": ids})
    return out


@torch.no_grad()
def greedy_continuations(
    lm: LoadedModel, pool: UnitPool, units: Sequence[Unit], modules: list[str], n: int,
    ids: Sequence[int], progress: bool = False,
) -> list[dict[str, Any]]:
    """Greedy continuations, clean (row 0) and masked (row 1), ``n`` tokens each; ``ids``: the
    run's token ids, whose first tokens are one of the prompts."""
    if n <= 0:
        return []
    model, tok = lm.model, cast(Any, lm.tokenizer)  # a transformers tokenizer (untyped: object)
    masker = ChannelMasker(model, pool, rows=2)
    masker.set_rows([[], list(units)])
    dev = input_device(model)
    out = []
    prompts = continuation_prompts(tok, ids)
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


def token_str(tokenizer: Any, t: int) -> str:
    """A token as text; a partial UTF-8 byte (decoded as U+FFFD) shows its vocabulary entry."""
    s = tokenizer.decode([t])
    return tokenizer.convert_ids_to_tokens(t) if "\ufffd" in s else s

"""The one-sentence summary of a mechanism: what the set erases, who writes it, and how
distributed the mediation of the collapse is."""

from __future__ import annotations

import logging
import math
from typing import Any

from achilles.explain.mediation import TARGETS
from achilles.explain.result import Mechanism
from achilles.model.units import Unit

logger = logging.getLogger(__name__)



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

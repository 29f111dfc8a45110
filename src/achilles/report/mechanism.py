"""The report's Mechanism section, from ``RUN_DIR/mechanism.json`` (written by ``achilles explain``).

:func:`mechanism_blocks` returns the section as document blocks (or ``None`` when the run
has no ``mechanism.json``); :func:`mechanism_section` renders them to Markdown and HTML
fragments. Every number comes from the JSON.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from achilles.errors import AchillesError
from achilles.explain.result import MECHANISM_FILE
from achilles.plots.mechanism import FIGURES
from achilles.report.document import (
    Block,
    Figure,
    Heading,
    Para,
    Raw,
    Table,
    fmt,
    to_html,
    to_markdown,
)
from achilles.results.schema import read_json, require_fields


@dataclass(frozen=True)
class MechanismSection:
    blocks: list[Block]
    markdown: str
    html: str


def _span(a: int, b: int) -> str:
    return str(a) if a == b else f"{a}–{b}"


def _floor(cfg: dict[str, Any]) -> str:
    """The absolute floor of the massive-activation test, when there is one."""
    floor = cfg.get("massive_min")
    return f" and ≥ {fmt(floor)}" if isinstance(floor, (int, float)) and floor > 0 else ""


def _share(x: Any) -> str:
    """A fraction of Δ as a percentage (``nan``/``-`` as they are)."""
    return f"{100 * x:.1f} %" if isinstance(x, (int, float)) and math.isfinite(x) else fmt(x)


def _positions(g: dict[str, Any]) -> str:
    qs, toks = g.get("positions") or [g["position"]], g.get("tokens") or []
    return ", ".join(f"{q} {t!r}" if i < len(toks) else str(q)
                     for i, (q, t) in enumerate(zip(qs, toks + [""] * len(qs), strict=False)))


def _tok(t: dict[str, Any]) -> str:
    return f"{t['token_id']}: {t['token']!r}"


def _highlight(tokens: list[str], rise: list[Any]) -> Raw:
    """The text with each token's background shaded by how much its loss rose under the mask."""
    vals = [r for r in rise if isinstance(r, (int, float)) and math.isfinite(r) and r > 0]
    top = max(vals) if vals else 1.0
    spans = []
    for tok, r in zip(tokens, rise, strict=True):
        if isinstance(r, (int, float)) and math.isfinite(r):
            a = max(0.0, min(1.0, r / top))
            style = f"background:rgba(214,39,40,{a:.2f})"
            title = f"loss rise {r:.3g} nats"
        elif r is None:
            style, title = "color:#888", "first token (not predicted)"
        else:
            style, title = "background:#000;color:#fff", f"loss rise {r}"
        spans.append(f"<span style='{style}' title='{html.escape(title)}'>{html.escape(tok)}</span>")
    body = ("<p>Each token shaded by how much its loss (NLL, nats) rose under the mask "
            f"(darkest = {top:.3g} nats):</p><pre style='white-space:pre-wrap'>" + "".join(spans) + "</pre>")
    return Raw(markdown="", html=body)


def read_mechanism(run_dir: str | Path) -> dict[str, Any] | None:
    """``RUN_DIR/mechanism.json`` checked (one error line naming the fix), or ``None`` without it."""
    path = Path(run_dir) / MECHANISM_FILE
    if not path.is_file():
        return None
    try:
        m = read_json(path, kind="mechanism")
        require_fields(m, path, {
            "summary": str, "units": list, "set_name": str, "tokens": int, "delta": float,
            "massive_groups": list, "writers": list, "sink_heads": list, "sink_position": int,
            "patching_checks": dict, "patching_reverse": list,
        })
    except AchillesError as e:
        raise AchillesError(f"{e}: run `achilles explain {run_dir}` again, or remove it") from None
    return m


def mechanism_blocks(run_dir: str | Path) -> list[Block] | None:
    """The Mechanism section of ``run_dir``'s report, or ``None`` without ``mechanism.json``."""
    run_dir = Path(run_dir)
    m = read_mechanism(run_dir)
    if m is None:
        return None
    figs = run_dir / "figures"
    cfg = m.get("config", {}).get("explain", {})
    out: list[Block] = [Heading("Mechanism"), Para(m["summary"])]
    units = ", ".join(f"{u['module']}[{u['channel']}]" for u in m["units"][:10])
    ident = run_dir / "identification.json"
    run_text = read_json(ident).get("config", {}).get("text") if ident.is_file() else None
    which = "the run's text" if run_text == m.get("config", {}).get("text") else \
        "another text than the run's (given to achilles explain; recorded in mechanism.json)"
    out.append(Para(
        f"The {m['set_name']} set ({len(m['units'])} unit(s): {units}{' ...' if len(m['units']) > 10 else ''}) "
        f"masked on {which} ({m['tokens']} tokens), Δ = {fmt(m['delta'])}. Clean vs masked, "
        "in one traced pass, then activation patching (see docs/explain.md in the achilles repository)."
    ))
    out.append(Heading("Massive activations", 3))
    if m["massive_groups"]:
        out.append(Para(
            f"Flagged: |h| ≥ {fmt(cfg.get('massive_ratio'))}× the layer's median |h|{_floor(cfg)} "
            "(layer -1 = embeddings, then each block's output)."
        ))
        out.append(Para(
            "Each row is one span of blocks: the flagged layers of a (position, channel) are split "
            "at a gap or where the writer changes (a jump between consecutive layers that the masked "
            f"run does not have). A span is erased when the mask divides its value at the peak by "
            f"≥ {fmt(cfg.get('erase_factor', 10.0))}× (reduction = |clean| / |masked| at the peak layer); "
            "positions: where the same channel has an overlapping span with the same fate."
        ))
        out.append(Table(
            ["position", "channel", "layers", "erased at", "peak layer", "peak value", "peak ratio",
             "masked value", "reduction", "masked max ratio", "survives masking", "positions (tokens)"],
            [[g["position"], g["channel"], _span(g["first_layer"], g["last_layer"]), g["erased_at"],
              g["peak_layer"], g["peak_value"], g["peak_ratio"], g["masked_value"], g.get("reduction"),
              g["masked_peak_ratio"], g["survives"], _positions(g)] for g in m["massive_groups"][:30]],
        ))
    else:
        out.append(Para(f"No massive activation flagged (|h| ≥ {fmt(cfg.get('massive_ratio'))}× the "
                        f"layer median{_floor(cfg)})."))
    if (figs / FIGURES[0]).is_file():
        out.append(Figure(figs / FIGURES[0], "Top |h| per layer at the sink position and elsewhere, "
                          "and the median: clean (solid) vs masked (dashed), log scale"))
    if (figs / FIGURES[3]).is_file():
        out.append(Figure(figs / FIGURES[3], "|h| per layer of the massive (position, channel) "
                          "pairs: clean (solid) vs masked (dashed), log scale"))
    if m["writers"]:
        out.append(Heading("Who writes it", 4))
        out.append(Para("Each unit of the set masked alone: the flagged channel's value at its peak "
                        "layer. For mlp.down / attn.o units the residual channel is the unit's own "
                        "channel (own channel: yes)."))
        out.append(Table(
            ["unit", "Δ alone", "position", "channel", "layer", "clean", "masked alone", "change",
             "own channel"],
            [[w["unit"], w["delta_alone"], c["position"], c["channel"], c["layer"], c["clean"],
              c["masked_alone"], c["change"], c["own_channel"]]
             for w in m["writers"][:30] for c in w["channels"]],
        ))
    if m.get("drivers"):
        out.append(Heading("What drives the unit", 4))
        out.append(Para(
            "For each mlp.down / attn.o unit of the set: the input (neuron) whose weight times "
            "activation contributes most to the unit's output at its peak position, its share of "
            "Σ|w·x| there, and Δ with only that single weight zeroed, beside Δ with only the row's "
            "largest |w| zeroed (the super-weight question)."
        ))
        out.append(Table(
            ["unit", "peak position", "peak output", "driver input", "driver share", "driver weight",
             "Δ driver weight zeroed", "largest |w| (input: w)", "Δ largest weight zeroed"],
            [[d["unit"], d["peak_position"], d["peak_output"], d["driver_input"], d["driver_share"],
              d["driver_weight"], d["delta_driver_weight"],
              f"{d['top_inputs'][0]}: {fmt(d['top_weights'][0], 3)}", d["delta_top_weight"]]
             for d in m["drivers"]],
        ))
    out.append(Heading("Attention sinks", 3))
    heads = m["sink_heads"]
    out.append(Para(
        f"Attention mass on position {m['sink_position']}, averaged over the later query positions. "
        f"A head loses its sink when that mass drops by ≥ {fmt(cfg.get('sink_drop'))}; "
        "write: mean norm of what the head adds to the residual stream."
        + ("" if heads else " No head lost its sink.")
    ))
    if heads:
        out.append(Table(
            ["layer", "head", "clean", "masked", "drop", "write clean", "write masked"],
            [[h["layer"], h["head"], h["clean"], h["masked"], h["drop"], h["write_clean"],
              h["write_masked"]] for h in heads[:30]],
        ))
    if (figs / FIGURES[1]).is_file():
        out.append(Figure(figs / FIGURES[1], "Attention on the sink position per layer and head: "
                          "clean, masked, and the difference"))
    chk = m["patching_checks"]
    out.append(Heading("Activation patching", 3))
    out.append(Para(
        "Recovered: share of Δ removed by restoring one component (a head's slice of the o_proj "
        "input, or an MLP's output) to its clean value in the masked model. Reproduced: share of Δ "
        "caused by patching that component's masked value into the clean model. Restoring every "
        f"component recovers {_share(chk['restore_all'])} of Δ"
        + (f"; restoring the heads that lost their sink recovers {_share(chk['restore_sink_heads'])}"
           if chk.get("restore_sink_heads") is not None else "") + "."
    ))
    rev = m["patching_reverse"]
    out.append(Para("Components marked * hold a masked unit: restoring them undoes the mask "
                    "itself. The cumulative restore ranks the other components (the mediators)."))
    star = lambda d: d["component"] + (" *" if d.get("holds_set") else "")  # noqa: E731
    out.append(Table(
        ["rank", "restored alone", "recovered", "patched into clean", "reproduced"],
        [[i + 1, star(a), a["recovered"], star(b), b["reproduced"]]
         for i, (a, b) in enumerate(zip(m["patching"][:10], rev[:10], strict=False))],
    ))
    if m["patching_cumulative"]:
        out.append(Table(
            ["top k mediators restored together", "recovered", "last added"],
            [[c["k"], c["recovered"], c["components"][-1]] for c in m["patching_cumulative"]],
        ))
    med = m.get("mediation") or {}
    if med.get("mediators"):
        needed = med.get("needed", {})
        n50, n90 = needed.get("0.5"), needed.get("0.9")
        say = lambda n: "not reached" if n is None else f"the top {n}"  # noqa: E731
        out.append(Para(
            f"How distributed the mediation is: of the {med['mediators']} components outside the "
            f"set, all restored together recover {_share(med['all_mediators'])} of Δ; 50 % takes "
            f"{say(n50)} and 90 % {say(n90)} of the ranking (found by bisection over the ranking; "
            "every measured point is in mechanism.json). By kind and by band of layers: how many "
            "of those top components they hold, and what all of them restored together recover."
        ))
        rows = [[k["kind"], k["count"], k["in_k50"], k["in_k90"], k["together"]] for k in med["by_kind"]]
        rows += [[f"blocks {_span(*b['layers'])}", b["count"], b["in_k50"], b["in_k90"], b["together"]]
                 for b in med["by_band"]]
        out.append(Table(["components", "count", "in the top for 50 %", "in the top for 90 %",
                          "recovered together"], rows))
    if (figs / FIGURES[2]).is_file():
        out.append(Figure(figs / FIGURES[2], "Share of Δ recovered by each top component alone, "
                          "reproduced by it alone, and recovered by the top k together"))
    o = m["output"]
    out.append(Heading("The collapsed output", 3))
    out.append(Para(
        f"Mean next-token entropy {fmt(o['entropy_clean'])} nats clean, {fmt(o['entropy_masked'])} "
        f"masked; top-1 accuracy {fmt(o['accuracy_clean'])} clean, {fmt(o['accuracy_masked'])} masked."
    ))
    out.append(Table(
        ["rank", "top-1 token (masked): id, text", "share", "top-1 token (clean)", "share"],
        [[i + 1, _tok(a), a["share"], _tok(b), b["share"]]
         for i, (a, b) in enumerate(zip(o["top1_masked"], o["top1_clean"], strict=False))],
    ))
    out.append(Table(
        ["position", "token", "loss rise (nats)", "NLL clean", "NLL masked"],
        [[r["position"], repr(r["token"]), r["rise"], r["nll_clean"], r["nll_masked"]]
         for r in o["loss_rise_top"]],
    ))
    out.append(_highlight(o["tokens"], o["rise"]))
    if m.get("continuations"):
        out.append(Heading("What the collapsed model says", 4))
        out.append(Para("Greedy continuations of a few prompts, clean vs with the set masked "
                        "(the chat prompt is in the model's chat template)."))
        out.append(Table(
            ["prompt", "clean", "masked"],
            [[repr(c["prompt"][-80:]), repr(c["clean_text"]), repr(c["masked_text"])]
             for c in m["continuations"]],
        ))
    return out


def mechanism_section(run_dir: str | Path) -> MechanismSection | None:
    """The Mechanism section rendered as Markdown and an HTML fragment, or ``None``."""
    blocks = mechanism_blocks(run_dir)
    if blocks is None:
        return None
    page = to_html(blocks, "mechanism")
    fragment = page[page.index("<body>") + len("<body>") : page.rindex("</body>")]
    return MechanismSection(blocks, to_markdown(blocks, Path(run_dir)), fragment)

"""The report's section builders: each a function of a :class:`ReportContext` that returns
its blocks (or ``None`` to leave the section out). :mod:`achilles.report.build` orders them.

A section renders only result files of the run it reports on: a file whose ``run_id`` is
not the identification's (a stale file of another run in a reused folder, or a result of
another run's set) is left out, with a warning. A comparison starts a run of its own
(``compare`` ranks anew), and a file made before run ids records none: those are used when
they name the same model.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from achilles.method.compat import same_model_record
from achilles.model.gguf_source import describe_gguf
from achilles.model.names import model_name as display_name
from achilles.plots.activations import plot_activations
from achilles.plots.controls import plot_controls
from achilles.plots.layers import plot_layers
from achilles.plots.phase import plot_phase
from achilles.report.compression import compression_section
from achilles.report.document import Block, Figure, Heading, Para, Table, capped, fmt
from achilles.report.external import comparison_blocks, downstream_blocks
from achilles.results.envelope import run_id_of

logger = logging.getLogger(__name__)

FIGURES_DIR = "figures"


def _read_optional(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or not UTF-8
        logger.warning("ignoring %s: %s", path, e)
        return None
    return data if isinstance(data, dict) else None


def _unit_row(rank: int | None, u: Mapping[str, Any], score: Any, extra: Any) -> list[Any]:
    return [rank, u["module"], u["layer"], u["component"], u["channel"], score, extra]


def _provenance(ident: Mapping[str, Any], ranking: Mapping[str, Any]) -> list[Block]:
    cfg, env = ident.get("config", {}), ident.get("env", {})
    model = cfg.get("model", {})
    rank_cfg = cfg.get("ranking", {})
    rows = [
        ["model", model.get("model")],
        ["revision", env.get("model_revision") or model.get("revision")],
        *([["weights", describe_gguf(env["gguf"])]] if env.get("gguf") else []),
        ["dtype", env.get("dtype")],
        ["device", env.get("device")],
        ["ranking method", ranking.get("method")],
        ["seed", rank_cfg.get("seed")],
        ["α (alpha)", rank_cfg.get("alpha")],
        ["K (samples)", rank_cfg.get("samples")],
        ["pool components", ", ".join(ranking.get("pool", {}).get("components", []))],
        ["units in pool", ranking.get("pool", {}).get("n_units")],
        ["tokens (incl. BOS)", ranking.get("tokens")],
        ["ε (epsilon)", ident.get("epsilon")],
        ["search", cfg.get("identify", {}).get("search")],
    ]
    rows += [[k, env.get(k)] for k in ("achilles", "achilles_git", "python", "torch", "transformers", "accelerate", "cuda")]
    return [
        Heading("Provenance"),
        Table(["field", "value"], rows),
        Para("Text:"),
        Para(str(cfg.get("text", "")), code=True),
    ]


def _position(pos: Any, tokens: Sequence[str] | None) -> Any:
    """A token position with its token string: ``12 'Paris'``."""
    if isinstance(pos, int) and tokens and 0 <= pos < len(tokens):
        return f"{pos} {tokens[pos]!r}"
    return pos


def _sets(ident: Mapping[str, Any], scores: Mapping[tuple[Any, ...], Any],
          tokens: Sequence[str] | None = None) -> list[Block]:
    out: list[Block] = [Heading("Critical and minimal sets")]
    if not ident.get("found"):
        out.append(Para(f"No critical set: Δ never reached ε = {fmt(ident.get('epsilon'))}."))
        return out
    out.append(Para(
        f"n* = {fmt(ident['n_star'])} at ε = {fmt(ident['epsilon'])} "
        f"(Δ = {fmt(ident.get('delta_critical'))}); minimal set: {fmt(ident.get('n_minimal'))} "
        f"unit(s), Δ = {fmt(ident.get('delta_minimal'))}. "
        f"n*(ε): " + ", ".join(f"ε={k}: {fmt(v)}" for k, v in ident.get("n_star_by_epsilon", {}).items())
    ))
    out.append(Heading("Minimal set", 3))
    out.append(Para("rank: position in the ranking; Δ without: Δ of the minimal set with that "
                    "unit left unmasked."))
    out.append(capped(
        ["rank", "module", "layer", "component", "channel", "score", "Δ without"],
        [_unit_row(scores.get(("rank", u["module"], u["channel"])), u,
                   scores.get((u["module"], u["channel"])), u.get("delta_without"))
         for u in ident.get("minimal_set", [])],
        more="in identification.json",
    ))
    out.append(Heading("Critical set (prefix of the ranking)", 3))
    rows = []
    for i, u in enumerate(ident.get("critical_set", [])):
        score, pos = scores.get(("pos", u["module"], u["channel"]), (None, None))
        rows.append(_unit_row(i + 1, u, score, _position(pos, tokens)))
    out.append(capped(
        ["rank", "module", "layer", "component", "channel", "score", "position"], rows,
        more="in identification.json",
    ))
    out.append(Para(
        "position: the token (0 = first, the BOS where the tokenizer adds one) at which the "
        "unit's score peaks, with the token; inf: a perplexity that overflowed (non-finite)."
    ))
    return out


def _weights(weights: Mapping[str, Any] | None, tokens: Sequence[str] | None = None) -> list[Block]:
    out: list[Block] = [Heading("Weights behind the critical units")]
    if weights is None:
        return out + [Para("Not computed: rerun `achilles report RUN_DIR --model MODEL`.")]
    out.append(Para(
        f"For each critical {' / '.join(weights['kinds'])} unit: the largest |w| of the weight "
        f"row writing it (super-weight check: max|w| / median|w|), the input channel driving it "
        f"at its peak position on the text, and its peak |output| over the module's median "
        f"|output| (massive if ≥ {fmt(weights['massive_threshold'])}×)."
    ))
    rows = [
        [w["module"], w["layer"], w["channel"],
         ", ".join(f"{i}:{fmt(v, 3)}" for i, v in zip(w["top_inputs"], w["top_weights"])),
         w["max_over_median_weight"], w["driver_input"], w["driver_share"],
         _position(w["peak_position"], tokens),
         w["peak_output"], w["massive_ratio"], w["massive"], w.get("delta_row"),
         w.get("delta_top_weight"), w.get("delta_driver_weight")]
        for w in weights["units"]
    ]
    if not rows:
        return out + [Para("No critical unit of these kinds.")]
    out.append(capped(
        ["module", "layer", "channel", "top |w| (input:w)", "max/median |w|", "driver input",
         "driver share", "peak pos", "peak output", "massive ratio", "massive", "Δ row zeroed",
         "Δ top weight zeroed", "Δ driver weight zeroed"],
        rows, more="in analysis.json",
    ))
    out.append(Para(
        "input:w: input channel and its weight in the unit's row; driver input: the input "
        "channel contributing most to the unit's output at its peak position (peak pos), with "
        "its share of that output; Δ row zeroed / Δ top weight zeroed: Δ on the text with the "
        "unit's whole weight row zeroed, and with only its largest weight zeroed (a super "
        "weight carries the row when the two agree); inf in max/median |w|: the row's median "
        "|w| is 0; Δ driver weight zeroed: with only the driver input's weight zeroed."
    ))
    return out


def _controls(controls: Mapping[str, Any] | None, fig: Path | None) -> list[Block]:
    out: list[Block] = [Heading("Controls")]
    if controls is None:
        return out + [Para("Not computed: rerun `achilles report RUN_DIR --model MODEL`.")]
    ma, rs, fp = controls.get("mean_ablation") or {}, controls.get("random_sets"), controls.get("fp32")
    rows = [
        ["zero-ablation (the set)", ma.get("delta_zero"), "-"],
        ["mean-ablation (the set)", ma.get("delta_mean"), "channel set to its mean over positions"],
    ]
    if rs:
        drawn = rs.get("drawn", "same-module")
        rows.append(["random sets: mean", rs.get("mean"), f"{len(rs['deltas'])} seeds, {drawn}"])
        rows.append(["random sets: sd", rs.get("sd"), ""])
        rows.append(["random sets: max |Δ|", rs.get("max_abs"), ""])
    rows.append(["zero-ablation in fp32", fp.get("delta_fp32") if fp else None,
                 f"run dtype {fp['dtype_run']}, {fp['method']}" if fp else "not needed (run in fp32) or not run"])
    out.append(Para(f"On the {controls.get('set')} set ({fmt(controls.get('n_units'))} unit(s))."))
    for d in controls.get("dense_modules") or []:
        out.append(Para(
            f"Note: the set covers {d['count']} of the {d['width']} channels of {d['module']}: "
            "most of the module rather than a few units in it; random sets of that size are "
            "completed from other modules (see the note column)."
        ))
    out.append(Table(["control", "Δ", "note"], rows))
    if fig:
        what = "in fp32, " if fp else ""
        out.append(Figure(fig, f"Controls: Δ of the set zeroed, mean-ablated, {what}and of random "
                               f"sets ({(rs or {}).get('drawn', 'same-module')})"))
    return out


OWN_RUN = frozenset({"comparison"})
"""Result kinds made by a command that starts its own run (matched to the report by model)."""

@dataclass
class ReportContext:
    """What a section builder sees: the run's result files, loaded once."""

    run_dir: Path
    analysis: Mapping[str, Any]
    ranking: Mapping[str, Any]
    identification: Mapping[str, Any]
    model_name: str
    tokens: list[str] | None = None
    """The text's tokens as display strings, when known (``analysis.json`` ``tokens``)."""
    figures: list[Path] = field(default_factory=list)
    """Figures drawn so far (builders append theirs)."""
    run_id: str | None = None
    """The run id of the identification: only result files of this run are rendered."""

    @property
    def figures_dir(self) -> Path:
        return self.run_dir / FIGURES_DIR

    def read(self, name: str) -> dict[str, Any] | None:
        """``RUN_DIR/name`` as a dict, or ``None`` when missing, unreadable or of another run."""
        data = _read_optional(self.run_dir / name)
        return data if data is not None and self.belongs(data, name) else None

    def has(self, name: str) -> bool:
        """Whether ``RUN_DIR/name`` exists and is a result of this run."""
        return self.read(name) is not None

    def belongs(self, data: Mapping[str, Any], name: str) -> bool:
        """Whether result ``data`` (file ``name``) is of this run: the same run id, or, for a
        file recording none, made on the same model."""
        rid = None if data.get("kind") in OWN_RUN else run_id_of(dict(data))
        if rid is not None:
            ok = rid == self.run_id
        else:
            made = (data.get("config") or {}).get("model")
            made = made.get("model") if isinstance(made, Mapping) else made
            ok = made is None or same_model_record(
                made, data.get("env") or {}, self.identification.get("config", {}).get("model", {}).get("model"),
                self.identification.get("env") or {},
            ) is not False
        if not ok:
            logger.warning("leaving %s out of the report: it is a result of another run "
                           "(rerun the command that made it on this run)", name)
        return ok

    def scores(self) -> dict[Any, Any]:
        scores: dict[Any, Any] = {}
        for i, n in enumerate(self.ranking["neurons"]):
            scores.setdefault(("rank", n["module"], n["channel"]), i + 1)
            scores.setdefault((n["module"], n["channel"]), n["score"])
            scores.setdefault(("pos", n["module"], n["channel"]), (n["score"], n.get("position")))
        return scores


SectionBuilder = Callable[[ReportContext], Sequence[Block] | None]


def _units_phrase(units: Sequence[Mapping[str, Any]], limit: int = 5) -> str:
    names = [f"L{u['layer']}.{u['component']}[{u['channel']}]" for u in units[:limit]]
    more = f" and {len(units) - limit} more" if len(units) > limit else ""
    return ", ".join(names) + more


def summary_section(ctx: ReportContext) -> list[Block]:
    """The finding in one paragraph: how many units, which, perplexity clean -> masked."""
    ident = ctx.identification
    blocks: list[Block] = [Heading(f"achilles report: {ctx.model_name}", 1)]
    clean = math.exp(ident["baseline_nll"]) if isinstance(ident.get("baseline_nll"), (int, float)) else None
    if not ident.get("found"):
        curve = ident.get("curve") or []
        top = max((p["delta"] for p in curve), default=None)
        last = curve[-1]["n"] if curve else None
        text = (f"No critical set in {ctx.model_name}: masking up to the top {fmt(last)} units "
                f"of the ranking raised the perplexity of the text by Δ = {fmt(top)} orders of "
                f"magnitude at most, short of ε = {fmt(ident.get('epsilon'))}.")
        return blocks + [Para(text)]
    minimal = ident.get("minimal_set") or ident.get("critical_set") or []
    which = "minimal" if ident.get("minimal_set") else "critical"
    d = ident.get("delta_minimal") if which == "minimal" else ident.get("delta_critical")
    masked = clean * 10 ** d if clean is not None and isinstance(d, (int, float)) else None
    text = (f"Masking {len(minimal)} unit(s) of {ctx.model_name} ({_units_phrase(minimal)}: the "
            f"{which} set, out of {fmt(ctx.ranking.get('pool', {}).get('n_units'))} in the pool) "
            f"raises the perplexity of the text from {fmt(clean)} to {fmt(masked)} "
            f"(Δ = {fmt(d)} orders of magnitude; ε = {fmt(ident.get('epsilon'))}, "
            f"first reached with the top n* = {fmt(ident.get('n_star'))} units of the ranking).")
    held = ctx.read("heldout.json")
    if held and isinstance(held.get("clean"), Mapping) and isinstance(held.get("masked"), Mapping):
        text += (f" On held-out data ({display_name(held.get('config', {}).get('data'))}, "
                 f"{fmt(held['clean'].get('tokens'))} tokens) the same units take the perplexity "
                 f"from {fmt(held['clean'].get('ppl'))} to {fmt(held['masked'].get('ppl'))}.")
    else:
        text += (" Held-out perplexity with the set masked is not part of this run; "
                 "`achilles ppl --data FILE --mask RUN_DIR/identification.json` measures it.")
    from achilles.report.mechanism import read_mechanism

    mech = read_mechanism(ctx.run_dir) if ctx.has("mechanism.json") else None
    if mech and isinstance(mech.get("summary"), str) and mech["summary"].strip():
        text += f" Mechanism: {mech['summary'].strip()}"
    dense = (ctx.analysis.get("controls") or {}).get("dense_modules") or []
    for dm in dense:
        text += (f" Note: the set covers {dm['count']} of the {dm['width']} channels of "
                 f"{dm['module']}, most of that module.")
    return blocks + [Para(text)]


def sets_section(ctx: ReportContext) -> list[Block]:
    return _sets(ctx.identification, ctx.scores(), ctx.tokens)


def locations_section(ctx: ReportContext) -> list[Block]:
    loc = ctx.analysis["locations"]
    f_layers = plot_layers(loc, ctx.figures_dir / "layers.png", title=ctx.model_name)
    ctx.figures.append(f_layers)
    return [Heading("Where the critical units live"), Table(
        ["set", "units", "mlp.down share", "outer-layer share"],
        [[d["label"], d["n_units"], d["down_share"], d["outer_share"]] for d in (loc["critical"], loc["ranking"])],
    ), Para(
        f"{fmt(loc['n_layers'])} layers; outer layers: first {len(loc['outer_layers']['first'])} "
        f"and last {len(loc['outer_layers']['last'])} (a quarter each)."
    ), Figure(f_layers, "Units per layer, stacked by component kind: critical set (top), top of the ranking (bottom)")]


def phase_section(ctx: ReportContext) -> list[Block]:
    ph, ident = ctx.analysis["phase"], ctx.identification
    f_phase = plot_phase(ident["curve"], ctx.figures_dir / "phase.png", epsilon=ident["epsilon"],
                         n_star=ident.get("n_star"), phase=ph, title=ctx.model_name)
    ctx.figures.append(f_phase)
    return [Heading("Phase transition"), Table(
        ["quantity", "value"],
        [["largest jump", ph["jump"]], ["at n", ph["n_jump"]], ["from n", ph["n_before"]],
         ["sharpness (jump / range)", ph["sharpness"]], ["max Δ", ph["max_delta"]],
         ["at n (max Δ)", ph["n_max_delta"]], ["non-monotone", ph["non_monotone"]],
         ["largest drawdown", (ph["max_drawdown"] or {}).get("size")],
         ["drawdown from n", (ph["max_drawdown"] or {}).get("from_n")],
         ["drawdown to n", (ph["max_drawdown"] or {}).get("n")],
         ["tolerance", ph["tolerance"]], ["non-finite points", len(ph["nonfinite_n"])]],
    ), Figure(f_phase, "Δ vs number of masked units (log x): ε dashed, n* dotted, the largest "
                       "jump arrowed when it is a real transition, non-finite points as red crosses")]


def activations_section(ctx: ReportContext) -> list[Block] | None:
    """The traced critical channels' activation at every token (Massive Activations style)."""
    acts = ctx.analysis.get("activations")
    if not acts or not acts.get("units"):
        return None
    fig = plot_activations(acts, ctx.tokens, ctx.figures_dir / "activations.png",
                           title=f"{ctx.model_name}: the {acts.get('set', 'final')} set's "
                                 "channels, activation per token")
    ctx.figures.append(fig)
    return [Heading("Activation per token"), Para(
        f"The first {len(acts['units'])} unit(s) of the {acts.get('set', 'final')} set on the "
        "text, clean pass: a massive activation is one token (often the first) far above "
        "all others."
    ), Figure(fig, "Activation of each unit at every token position (x: the tokens)")]


def weights_section(ctx: ReportContext) -> list[Block]:
    return _weights(ctx.analysis.get("weights"), ctx.tokens)


def controls_section(ctx: ReportContext) -> list[Block]:
    controls = ctx.analysis.get("controls")
    fig = None
    if controls:
        fig = plot_controls(controls, ctx.figures_dir / "controls.png",
                            epsilon=ctx.identification["epsilon"])
        ctx.figures.append(fig)
    return _controls(controls, fig)


def comparison_section(ctx: ReportContext) -> list[Block]:
    return comparison_blocks(ctx)


def downstream_section(ctx: ReportContext) -> list[Block]:
    return downstream_blocks(ctx)


def mechanism_section(ctx: ReportContext) -> list[Block] | None:
    """The Mechanism section (``achilles explain``), when the run has a mechanism.json."""
    from achilles.report.mechanism import mechanism_blocks

    return (mechanism_blocks(ctx.run_dir) or None) if ctx.has("mechanism.json") else None


def compression_section_of(ctx: ReportContext) -> list[Block] | None:
    """The Compression section, when the run has a compression.json."""
    return (compression_section(ctx.run_dir) or None) if ctx.has("compression.json") else None


def provenance_section(ctx: ReportContext) -> list[Block]:
    hl = ctx.analysis["health"]
    return _provenance(ctx.identification, ctx.ranking) + [Para(
        f"Numerical health: dtype {fmt(hl['dtype'])}, {fmt(hl['nonfinite_points'])} non-finite "
        f"of {fmt(hl['curve_points'])} curve points"
        + (f" (n = {', '.join(map(str, hl['nonfinite_n']))})" if hl["nonfinite_n"] else "") + "."
    )]



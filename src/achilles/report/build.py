"""``write_report``: ``RUN_DIR/report.md`` and a self-contained ``RUN_DIR/report.html``.

The report reads the run's result files (``ranking.json``, ``identification.json``,
``analysis.json``, and ``comparison.json`` / ``downstream.json`` when another command wrote
them) and renders every number with :func:`~achilles.report.document.fmt` from those files,
so the report and the JSON agree at the printed precision.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from achilles.analysis.run import ANALYSIS_FILE, analyze_run, load_run
from achilles.io import read_json
from achilles.loading import LoadedModel
from achilles.plots.controls import plot_controls
from achilles.plots.layers import plot_layers
from achilles.plots.phase import plot_phase
from achilles.report.document import Block, Figure, Heading, Para, Table, fmt, to_html, to_markdown

logger = logging.getLogger(__name__)

FIGURES_DIR = "figures"


@dataclass(frozen=True)
class ReportFiles:
    """Paths written by :func:`write_report`."""

    markdown: Path
    html: Path
    analysis: Path
    figures: list[Path]


def _read_optional(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        logger.warning("ignoring %s: %s", path, e)
        return None
    return data if isinstance(data, dict) else None


def _unit_row(rank: int, u: Mapping[str, Any], score: Any, extra: Any) -> list[Any]:
    return [rank, u["module"], u["layer"], u["component"], u["channel"], score, extra]


def _provenance(ident: Mapping[str, Any], ranking: Mapping[str, Any]) -> list[Block]:
    cfg, env = ident.get("config", {}), ident.get("env", {})
    model = cfg.get("model", {})
    rank_cfg = cfg.get("ranking", {})
    rows = [
        ["model", model.get("model")],
        ["revision", env.get("model_revision") or model.get("revision")],
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
        Heading("Run"),
        Table(["field", "value"], rows),
        Para("Text:"),
        Para(str(cfg.get("text", "")), code=True),
    ]


def _sets(ident: Mapping[str, Any], scores: Mapping[tuple[str, int], Any]) -> list[Block]:
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
    out.append(Table(
        ["rank", "module", "layer", "component", "channel", "score", "Δ without"],
        [_unit_row(scores.get(("rank", u["module"], u["channel"])), u,
                   scores.get((u["module"], u["channel"])), u.get("delta_without"))
         for u in ident.get("minimal_set", [])],
    ))
    out.append(Heading("Critical set (prefix of the ranking)", 3))
    out.append(Table(
        ["rank", "module", "layer", "component", "channel", "score", "position"],
        [_unit_row(i + 1, u, *scores.get(("pos", u["module"], u["channel"]), (None, None)))
         for i, u in enumerate(ident.get("critical_set", []))],
    ))
    return out


def _weights(weights: Mapping[str, Any] | None) -> list[Block]:
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
         w["max_over_median_weight"], w["driver_input"], w["driver_share"], w["peak_position"],
         w["peak_output"], w["massive_ratio"], w["massive"]]
        for w in weights["units"]
    ]
    if not rows:
        return out + [Para("No critical unit of these kinds.")]
    out.append(Table(
        ["module", "layer", "channel", "top |w| (input:w)", "max/median |w|", "driver input",
         "driver share", "peak pos", "peak output", "massive ratio", "massive"],
        rows,
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
        rows.append(["random same-module sets: mean", rs.get("mean"), f"{len(rs['deltas'])} seeds"])
        rows.append(["random same-module sets: sd", rs.get("sd"), ""])
        rows.append(["random same-module sets: max |Δ|", rs.get("max_abs"), ""])
    rows.append(["zero-ablation in fp32", fp.get("delta_fp32") if fp else None,
                 f"run dtype {fp['dtype_run']}, {fp['method']}" if fp else "not needed (run in fp32) or not run"])
    out.append(Para(f"On the {controls.get('set')} set ({fmt(controls.get('n_units'))} units)."))
    out.append(Table(["control", "Δ", "note"], rows))
    if fig:
        out.append(Figure(fig, "Controls: Δ of the set zeroed, mean-ablated, in fp32, and of random same-module sets"))
    return out


def _flatten(d: Any, prefix: str = "", depth: int = 3) -> list[tuple[str, Any]]:
    if isinstance(d, Mapping) and depth > 0:
        out: list[tuple[str, Any]] = []
        for k, v in d.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k), depth - 1)
        return out
    if isinstance(d, list) and d and all(isinstance(x, (int, float, str)) for x in d):
        return [(prefix, ", ".join(fmt(x) for x in d))]
    return [(prefix, d if isinstance(d, (int, float, str, bool)) or d is None else json.dumps(d)[:200])]


def _comparison(run_dir: Path) -> list[Block]:
    """Perplexity per level (rows) and ranking method (columns) from ``comparison.json``."""
    data = _read_optional(run_dir / "comparison.json")
    png = run_dir / "comparison.png"
    if data is None or not isinstance(data.get("methods"), Mapping):
        return _external(run_dir, "comparison", "Baseline comparison", ("methods",))
    methods = {m: {p["n"]: p for p in pts} for m, pts in data["methods"].items()}
    rand = {p["n"]: p for p in (data.get("random") or {}).get("levels", [])}
    runs = (data.get("random") or {}).get("runs")
    levels = sorted({n for pts in methods.values() for n in pts} | set(rand))
    header = ["n masked", *methods]
    if rand:
        header.append(f"random (mean ± sd, {runs} runs)")
    rows = []
    for n in levels:
        row: list[Any] = [n, *(fmt(methods[m][n]["ppl"]) if n in methods[m] else "-" for m in methods)]
        if rand:
            r = rand.get(n)
            row.append(f"{fmt(r['ppl_mean'])} ± {fmt(r['ppl_sd'])}" if r else "-")
        rows.append(row)
    base = (data.get("baseline") or {}).get("ppl")
    out: list[Block] = [
        Heading("Baseline comparison"),
        Para(f"Perplexity on the evaluation data with the top-n units of each ranking masked "
             f"(from comparison.json; unmasked: {fmt(base)})."),
        Table(header, rows),
    ]
    for skip in data.get("skipped") or []:
        out.append(Para(f"skipped: {skip}"))
    if png.is_file():
        out.append(Figure(png, "Perplexity against the number of masked units (comparison.png)"))
    return out


def _downstream(run_dir: Path) -> list[Block]:
    """One row per (level, task) with the task's metrics from ``downstream.json``."""
    data = _read_optional(run_dir / "downstream.json")
    if data is None or not isinstance(data.get("levels"), list):
        return _external(run_dir, "downstream", "Downstream results", ("results", "tasks"))
    rows = []
    for lv in data["levels"]:
        for task, res in (lv.get("results") or {}).items():
            metrics = ", ".join(
                f"{k.split(',')[0]}={fmt(v)}" for k, v in res.items()
                if "," in k and "stderr" not in k and isinstance(v, (int, float))
            )
            rows.append([lv.get("level"), task, metrics])
    return [Heading("Downstream results"), Para("lm-evaluation-harness, from downstream.json."),
            Table(["units masked", "task", "metrics"], rows)]


def _external(run_dir: Path, name: str, title: str, keys: tuple[str, ...]) -> list[Block]:
    data = _read_optional(run_dir / f"{name}.json")
    png = run_dir / f"{name}.png"
    if data is None and not png.is_file():
        return []
    out: list[Block] = [Heading(title)]
    if data is not None:
        body = next((data[k] for k in keys if isinstance(data.get(k), Mapping)), None)
        if body is None:
            body = {k: v for k, v in data.items() if k not in ("config", "env", "schema_version", "kind")}
        rows = [[k, v] for k, v in _flatten(body)][:200]
        out.append(Para(f"From {name}.json."))
        out.append(Table(["key", "value"], rows))
    if png.is_file():
        out.append(Figure(png, f"{title} ({name}.png)"))
    return out


def _mechanism(run_dir: Path) -> list[Block]:
    """The Mechanism section (``achilles explain``), when the run has a mechanism.json."""
    from achilles.report.mechanism import mechanism_blocks

    return mechanism_blocks(run_dir) or []


def write_report(
    run_dir: str | Path,
    lm: LoadedModel | None = None,
    *,
    analysis: Mapping[str, Any] | None = None,
    **analysis_options: Any,
) -> ReportFiles:
    """Analyse ``run_dir`` (with ``lm`` for the model-needing parts) and write the report.

    Without ``lm``, the model-needing sections of an existing ``analysis.json`` are kept;
    the model-free sections are always recomputed. ``analysis_options`` go to
    :func:`~achilles.analysis.run.analyze_run`.
    """
    run_dir = Path(run_dir)
    previous = _read_optional(run_dir / ANALYSIS_FILE)
    if analysis is None:
        analysis = analyze_run(run_dir, lm, write=False, **analysis_options)
        if lm is None and previous:
            analysis = {**analysis, "weights": previous.get("weights"),
                        "controls": previous.get("controls")}
        from achilles.io import write_json

        write_json(run_dir / ANALYSIS_FILE, analysis)
    ranking_d = read_json(run_dir / "ranking.json", kind="ranking")
    ident_d = read_json(run_dir / "identification.json", kind="identification")
    ranking, ident = load_run(run_dir)
    figs = run_dir / FIGURES_DIR
    model_name = ident.config.get("model", {}).get("model", "model")
    f_layers = plot_layers(analysis["locations"], figs / "layers.png", title=str(model_name))
    f_phase = plot_phase(ident_d["curve"], figs / "phase.png", epsilon=ident.epsilon,
                         n_star=ident.n_star, phase=analysis["phase"], title=str(model_name))
    f_controls = (plot_controls(analysis["controls"], figs / "controls.png", epsilon=ident.epsilon)
                  if analysis.get("controls") else None)
    scores: dict[Any, Any] = {}
    for i, n in enumerate(ranking_d["neurons"]):
        scores.setdefault(("rank", n["module"], n["channel"]), i + 1)
        scores.setdefault((n["module"], n["channel"]), n["score"])
        scores.setdefault(("pos", n["module"], n["channel"]), (n["score"], n.get("position")))

    loc, ph, hl = analysis["locations"], analysis["phase"], analysis["health"]
    blocks: list[Block] = [Heading(f"achilles report: {model_name}", 1)]
    blocks += [Para(
        f"Numerical health: dtype {fmt(hl['dtype'])}, {fmt(hl['nonfinite_points'])} non-finite "
        f"of {fmt(hl['curve_points'])} curve points"
        + (f" (n = {', '.join(map(str, hl['nonfinite_n']))})" if hl["nonfinite_n"] else "") + "."
    )]
    blocks += _provenance(ident_d, ranking_d)
    blocks += _sets(ident_d, scores)
    blocks += _mechanism(run_dir)
    blocks += [Heading("Where the critical units live")]
    blocks += [Table(
        ["set", "units", "mlp.down share", "outer-layer share"],
        [[d["label"], d["n_units"], d["down_share"], d["outer_share"]] for d in (loc["critical"], loc["ranking"])],
    )]
    blocks += [Para(
        f"{fmt(loc['n_layers'])} layers; outer layers: first {len(loc['outer_layers']['first'])} "
        f"and last {len(loc['outer_layers']['last'])} (a quarter each)."
    ), Figure(f_layers, "Units per layer, stacked by component kind: critical set (top), top of the ranking (bottom)")]
    blocks += [Heading("Phase transition"), Table(
        ["quantity", "value"],
        [["largest jump", ph["jump"]], ["at n", ph["n_jump"]], ["from n", ph["n_before"]],
         ["sharpness (jump / range)", ph["sharpness"]], ["max Δ", ph["max_delta"]],
         ["at n (max Δ)", ph["n_max_delta"]], ["non-monotone", ph["non_monotone"]],
         ["largest drawdown", (ph["max_drawdown"] or {}).get("size")],
         ["drawdown from n", (ph["max_drawdown"] or {}).get("from_n")],
         ["drawdown to n", (ph["max_drawdown"] or {}).get("n")],
         ["tolerance", ph["tolerance"]], ["non-finite points", len(ph["nonfinite_n"])]],
    ), Figure(f_phase, "Δ vs number of masked units (log x): ε dashed, n* dotted, largest jump arrowed, non-finite points as red crosses")]
    blocks += _weights(analysis.get("weights"))
    blocks += _controls(analysis.get("controls"), f_controls)
    blocks += _comparison(run_dir)
    blocks += _downstream(run_dir)

    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    _atomic_text(md_path, to_markdown(blocks, run_dir))
    _atomic_text(html_path, to_html(blocks, f"achilles report: {model_name}"))
    figures = [p for p in (f_layers, f_phase, f_controls) if p is not None]
    logger.info("report written: %s, %s", md_path, html_path)
    return ReportFiles(md_path, html_path, run_dir / ANALYSIS_FILE, figures)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)

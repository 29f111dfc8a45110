"""``achilles explain``: why the run's critical set collapses the model (``mechanism.json``)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from achilles.commands.common import progress
from achilles.config import ModelSpec, add_arguments, from_args
from achilles.errors import AchillesError
from achilles.explain import MECHANISM_FILE, ExplainConfig, explain_run
from achilles.explain.run import check_sink_position, run_set
from achilles.method.compat import check_same_model
from achilles.method.identify import Identification
from achilles.method.prepared import PreparedRun
from achilles.model.loading import LoadedModel, context_length, inspect_model, load_model, tokenize
from achilles.results.inputs import read_text_input
from achilles.results.schema import read_json

logger = logging.getLogger(__name__)


def preflight_explain(
    run_dir: Path, spec: ModelSpec, config: ExplainConfig, text: str | None
) -> tuple[LoadedModel, str]:
    """Check the run folder, its set against the model, the text and the sink position, and
    that the folder is writable, all before any weight is loaded. Returns the weightless
    model and the text to explain on."""
    skeleton = inspect_model(spec)
    _units, _pool, run_text = run_set(run_dir, skeleton, config)
    text = run_text if text is None else text
    n = int(tokenize(skeleton.tokenizer, text).shape[1])
    check_sink_position(config.sink_position, n)
    limit = context_length(skeleton.model)
    if limit is not None and n > limit:
        raise AchillesError(f"the text is {n} tokens, longer than the model's context of {limit}: "
                            "give a shorter --text-file")
    if not os.access(run_dir, os.W_OK) or (
        (run_dir / "figures").exists() and not os.access(run_dir / "figures", os.W_OK)
    ):
        raise AchillesError(f"cannot write to {run_dir}: check its permissions")
    return skeleton, text


def run_explain(
    run_dir: Path, lm: LoadedModel, config: ExplainConfig, *, text: str | None = None,
    show_progress: bool, report: bool, prepared: PreparedRun | None = None,
    ident: Identification | None = None,
) -> list[str]:
    """Explain a run whose model is loaded; the lines to print (``prepared`` and ``ident``:
    the run in hand, as ``find --explain`` has it)."""
    mech = explain_run(run_dir, lm, config, text=text, progress=show_progress,
                       prepared=prepared, ident=ident)
    c = mech.cost
    lines = [
        f"mechanism: {mech.summary}",
        (f"explain: {c['forward_rows']} forward rows at {c['tokens']} tokens (patch scope "
         f"{c['patch_scope']}: {c['components_patched']} of {c['components_all']} components), "
         f"{c['seconds']:.0f} s"),
        f"written: {run_dir / MECHANISM_FILE}",
    ]
    if report and (run_dir / "ranking.json").is_file():
        from achilles.report import write_report

        files = write_report(run_dir)
        lines.append(f"report: {files.html}")
    return lines


def _run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise AchillesError(f"run folder not found: {run_dir} (give a folder written by `achilles find`)")
    ident_path = run_dir / "identification.json"
    if not ident_path.is_file():
        raise AchillesError(f"{run_dir} has no identification.json: point at a folder written by `achilles find`")
    config = from_args(ExplainConfig, args)
    text = None
    if args.text_file is not None:
        text = read_text_input(args.text_file, "--text-file")
    recorded = Identification.load(str(ident_path)).config.get("model", {}).get("model")
    model = args.model or recorded
    if not model:
        raise AchillesError(f"{ident_path} does not record its model: pass --model")
    spec = from_args(ModelSpec, args, model=model)
    ident = read_json(ident_path, kind="identification")
    check_same_model(ident.get("config") or {}, ident.get("env") or {}, spec, what="the run",
                     force=args.force, hint="give the run's own --model")
    skeleton, text = preflight_explain(run_dir, spec, config, text)
    if recorded and model != recorded:  # after the checks: a bad input gets one line only
        logger.warning("the run was made on %s; explaining it on %s", recorded, model)
    lm = load_model(spec, tokenizer=skeleton.tokenizer)
    for line in run_explain(
        run_dir, lm, config, text=text, show_progress=progress(args), report=args.report
    ):
        print(line)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain",
        help="why the critical set collapses the model: massive activations, sinks, patching",
        description="Mask the run's minimal (or critical) set and trace the collapse: massive "
        "activations in the residual stream, the heads that lose their attention sink, "
        "activation patching of every head and MLP (both directions), and the collapsed output. "
        "Writes RUN_DIR/mechanism.json, RUN_DIR/figures/mechanism_*.png and the report's "
        "Mechanism section.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="folder written by `achilles find`")
    p.add_argument("--model", default=None, help="the run's model (default: the one it records)")
    p.add_argument("--text-file", default=None,
                   help="explain on this text instead of the run's (recorded in mechanism.json)")
    add_arguments(p, ModelSpec, exclude=("model",))
    add_arguments(p, ExplainConfig)
    p.add_argument("--force", action="store_true",
                   help="explain on a --model other than the run's own (default: refused)")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="rewrite the run's report with the Mechanism section (default: on)")
    g = p.add_argument_group("output")
    g.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    g.add_argument("--verbose", action="store_true", help="debug logging")
    p.set_defaults(run=_run)

"""``achilles downstream``: lm-eval benchmarks with a critical set masked."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from achilles.commands.common import add_common, claim_out_dir, model_spec
from achilles.commands.ppl import add_mask_options, check_mask_args
from achilles.config import _parse_list, parse_int
from achilles.errors import AchillesError
from achilles.evaluation.downstream import parse_levels, run_downstream, task_manager_for
from achilles.evaluation.masks import load_mask
from achilles.model.loading import load_model
from achilles.results.provenance import environment

logger = logging.getLogger(__name__)


def _run_downstream(args: argparse.Namespace) -> int:
    tasks = list(dict.fromkeys(_parse_list(args.tasks)))
    if not tasks:
        raise AchillesError("--tasks is empty: e.g. --tasks mmlu_pro,gpqa_diamond_zeroshot")
    parse_levels(args.levels)  # syntax check before any work
    if args.limit is not None and args.limit <= 0:
        raise AchillesError("--limit must be > 0")
    if args.include_path is not None and not Path(args.include_path).exists():
        raise AchillesError(f"--include-path {args.include_path} does not exist")
    spec = model_spec(args)
    out_dir = claim_out_dir(args, args.out_dir)
    args.top = None
    check_mask_args(args)
    tm = task_manager_for(tasks, args.include_path)
    lm = load_model(spec)
    mask = load_mask(lm, args.mask, set_name=args.set_name)
    levels = parse_levels(args.levels, len(mask.units))
    batch: int | str = int(args.batch_size) if str(args.batch_size).isdigit() else args.batch_size
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    result = run_downstream(
        lm.model, lm.tokenizer, mask.pool, mask.units, levels, tasks, limit=limit,
        add_bos=args.add_bos,
        batch_size=batch, include_path=args.include_path,
        num_fewshot=args.num_fewshot, confirm_run_unsafe_code=args.confirm_run_unsafe_code,
        bootstrap_iters=args.bootstrap_iters, seed=args.seed, task_manager=tm,
    )
    result.config = {
        "model": dataclasses.asdict(spec),
        "mask": {**mask.source, "n_units": len(mask.units),
                 "units": [u.to_dict() for u in mask.units]},
        "tasks": tasks, "levels": levels, "limit": limit, "batch_size": args.batch_size,
        "num_fewshot": args.num_fewshot, "include_path": args.include_path, "seed": args.seed,
    }
    result.env = {**environment(lm.model), "lm_eval": _lm_eval_version()}
    result.run_id = mask.run_id
    out = out_dir / "downstream.json"
    result.save(str(out))
    for lv in result.levels:
        parts = []
        for task, metrics in lv.get("results", {}).items():
            shown = ", ".join(f"{k.split(',')[0]}={v:.4g}" for k, v in metrics.items()
                              if isinstance(v, float) and "stderr" not in k)
            parts.append(f"{task}: {shown}")
        print(f"level {lv['level']}: " + "; ".join(parts))
    print(f"written: {out}")
    return 0


def _lm_eval_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:  # pragma: no cover
        return None


def _float(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "downstream",
        help="lm-eval benchmarks with the first n units of a critical set masked",
        description="Run lm-evaluation-harness tasks on the in-memory model once per level, "
        "with the first LEVEL units of the identification's set masked (0 = unmasked, n* = "
        "the whole set). Writes DIR/downstream.json. Needs pip install achilles[eval].",
    )
    add_common(p, text=False)
    add_mask_options(p, levels=True)
    g = p.add_argument_group("lm-eval")
    g.add_argument("--levels", default="0,n*",
                   help="numbers of units of the set to mask; n* = the whole set (default: 0,n*)")
    g.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    g.add_argument("--limit", type=_float, default=None,
                   help="examples per task (an integer), or a fraction < 1")
    g.add_argument("--batch-size", default="1", help="lm-eval batch size, or 'auto' (default: 1)")
    g.add_argument("--num-fewshot", type=parse_int, default=None, help="few-shot examples (task default)")
    g.add_argument("--include-path", default=None, help="folder of extra lm-eval task YAMLs")
    g.add_argument("--confirm-run-unsafe-code", action="store_true",
                   help="allow tasks that execute model-written code (humaneval; also set "
                   "HF_ALLOW_CODE_EVAL=1)")
    g.add_argument("--bootstrap-iters", type=parse_int, default=100000,
                   help="bootstrap iterations for stderr (0: none; default: 100000)")
    g.add_argument("--seed", type=parse_int, default=0, help="lm-eval random seeds (default: 0)")
    g.add_argument("--add-bos", action=argparse.BooleanOptionalAction, default=True,
                   help="prepend BOS to every request when the tokenizer adds one, as in "
                   "training (default: on; lm-eval leaves it off)")
    p.add_argument("--out-dir", required=True, help="folder for downstream.json")
    p.set_defaults(run=_run_downstream)

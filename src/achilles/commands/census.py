"""``achilles census``: find + report over a list of models, resumably, with one summary."""

from __future__ import annotations

import argparse
import dataclasses

from achilles.commands.common import (
    add_identify_options,
    add_rank_options,
    identify_config,
    progress,
    rank_config,
    text_of,
)
from achilles.config import ModelSpec, TextSpec, add_arguments, from_args, parse_int
from achilles.scale.census import CensusSettings, read_model_list, run_census
from achilles.scale.census.launch import LAUNCHERS


def _run(args: argparse.Namespace) -> int:
    rcfg = rank_config(args)
    icfg = identify_config(args, batch_size=getattr(args, "batch_size", None))
    text = text_of(args)
    base = from_args(ModelSpec, args, model="-")
    entries = read_model_list(args.models, base)
    settings = CensusSettings(text=text, rank=rcfg, identify=icfg, report=args.report,
                              explain=args.explain)
    slurm = {"partition": args.slurm_partition, "timeout_min": args.slurm_timeout,
             "wait": args.wait}
    config = {
        "models_list": args.models, "text": text, "rank": dataclasses.asdict(rcfg),
        "identify": dataclasses.asdict(icfg), "report": args.report, "explain": args.explain,
        "launcher": args.launcher,
        "jobs": args.jobs, "gpus_per_job": args.gpus_per_job,
    }
    result = run_census(
        entries, settings, args.out_dir, launcher=args.launcher, jobs=args.jobs,
        gpus_per_job=args.gpus_per_job, gpu_memory=args.gpu_memory, slurm=slurm,
        config=config, progress=progress(args),
    )
    if result.job_ids:
        print(f"submitted {len(result.job_ids)} job(s): {', '.join(result.job_ids)}")
        print("rerun the same command once they have finished to write the summary")
        return 0
    done = sum(r["status"] == "ok" for r in result.rows)
    print(f"census: {done} of {len(result.rows)} models done ({result.ran} run now, "
          f"{result.skipped} already done)")
    for r in result.rows:
        if r["status"] != "ok":
            print(f"  {r['name']}: {r['status']}: {r['error']}")
    assert result.files is not None
    print(f"summary: {result.files.markdown} (also .csv, .json; figures in {result.files.depth_png.parent})")
    return 0 if result.complete else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "census",
        help="run find + report over a list of models, resumably, and summarise them",
        description="For every model of --models (a file with one id or path per line, with "
        "optional per-model options such as --dtype, or 'paper21'), run both stages and the "
        "report into DIR/runs/<name>/, then write DIR/summary.{csv,json,md} and cross-model "
        "figures. Finished models are skipped when the command is rerun; an interrupted one "
        "is redone from scratch; a failing one is recorded and does not stop the others "
        "(exit status 1 while any model is not done).",
    )
    g = p.add_argument_group("census")
    g.add_argument("--models", required=True, help="file of model ids/paths, or 'paper21'")
    g.add_argument("--out-dir", required=True, help="census folder (created if missing)")
    g.add_argument("--launcher", choices=LAUNCHERS, default="local",
                   help="local: a process pool on this machine; slurm: submitit job arrays "
                   "(needs achilles[cluster]) (default: %(default)s)")
    g.add_argument("--jobs", type=parse_int, default=1,
                   help="models run at once (local: worker processes, capped by GPU groups; "
                   "slurm: array parallelism) (default: %(default)s)")
    g.add_argument("--gpus-per-job", type=parse_int, default=None,
                   help="GPUs per model (default: from `achilles plan` at --gpu-memory)")
    g.add_argument("--gpu-memory", default=None,
                   help="memory of one GPU, for the GPUs-per-model plan (default: the first "
                   "visible GPU's locally, 80GiB for slurm)")
    g.add_argument("--slurm-partition", default=None, help="Slurm partition")
    g.add_argument("--slurm-timeout", type=parse_int, default=240,
                   help="minutes per Slurm task (default: %(default)s)")
    g.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                   help="slurm: wait for the jobs and write the summary (default: on)")
    g.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="write each model's analyses, figures and report (default: on)")
    g.add_argument("--explain", action=argparse.BooleanOptionalAction, default=True,
                   help="also run `achilles explain` on each found minimal set: mechanism.json "
                   "and the report's Mechanism section (default: on)")
    add_arguments(p, ModelSpec, exclude=("model",))
    add_arguments(p, TextSpec)
    add_rank_options(p)
    add_identify_options(p, prefix_batch=False)
    o = p.add_argument_group("output")
    o.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    o.add_argument("--verbose", action="store_true", help="debug logging")
    p.set_defaults(run=_run)

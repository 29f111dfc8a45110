"""``achilles probe``: next-token probabilities as critical units are masked (Figure 1)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from achilles.commands.common import add_common, check_destination, model_spec
from achilles.config import parse_int, parse_numbers
from achilles.errors import AchillesError
from achilles.experiments.probe import ProbeConfig, check_mask, mask_units, probe
from achilles.method.identify import Identification
from achilles.method.pipeline import preflight
from achilles.model.loading import context_length, load_model

logger = logging.getLogger(__name__)


def _run(args: argparse.Namespace) -> int:
    cfg = ProbeConfig(
        prompt=args.prompt,
        target=args.target,
        set=args.set,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        levels=parse_numbers(args.levels, "--levels", int) if args.levels else None,
    )
    ident = Identification.load(args.mask)
    cfg.resolve_levels(len(mask_units(ident, cfg.set)))  # refuse bad levels before loading
    out = check_destination(args.out, "file")
    png = plot_path(args.plot, out)
    spec = model_spec(args)
    skeleton = preflight(spec)  # bad input fails before loading
    cfg = cap_top_k(cap_generation(cfg, skeleton), skeleton)
    check_mask(skeleton.model, mask_units(ident, cfg.set), source=args.mask)
    lm = load_model(spec, tokenizer=skeleton.tokenizer)
    result = probe(lm, ident, cfg, source=args.mask)
    result.save(str(out))
    from achilles.plots.probe import plot_probe

    plot_probe(result, png)
    print(result.summary())
    print(f"\nwritten: {out}, {png}")
    return 0


def cap_generation(cfg: ProbeConfig, skeleton: object) -> ProbeConfig:
    """``--max-new-tokens`` capped so prompt + continuation fit the model's context (warned)."""
    limit = context_length(skeleton.model)  # type: ignore[attr-defined]
    if limit is None:
        return cfg
    prompt = len(skeleton.tokenizer(cfg.prompt).input_ids)  # type: ignore[attr-defined]
    if prompt >= limit:
        raise AchillesError(f"--prompt is {prompt} tokens, the model's context only {limit}: shorten it")
    room = limit - prompt
    if cfg.max_new_tokens > room:
        logger.warning(
            "--max-new-tokens %d exceeds the model's context (%d tokens, prompt %d): capped at %d",
            cfg.max_new_tokens, limit, prompt, room,
        )
        return dataclasses.replace(cfg, max_new_tokens=room)
    return cfg


def cap_top_k(cfg: ProbeConfig, skeleton: object) -> ProbeConfig:
    """``--top-k`` capped at the model's vocabulary (warned): there are no more tokens to show."""
    model = skeleton.model  # type: ignore[attr-defined]
    head = model.get_output_embeddings()
    vocab = int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)
    if cfg.top_k > vocab:
        logger.warning("--top-k %d exceeds the model's vocabulary of %d tokens: capped at %d",
                       cfg.top_k, vocab, vocab)
        return dataclasses.replace(cfg, top_k=vocab)
    return cfg


PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def plot_path(plot: str | None, out: Path) -> Path:
    """The chart file: ``--plot`` (``.png`` added when it has no suffix), else ``--out`` as .png."""
    if plot is None:
        png = out.with_suffix(".png")
    else:
        png = Path(plot).expanduser()
        if png.is_dir():
            raise AchillesError(f"--plot {plot} is a folder: name a file, e.g. {png / 'probe.png'}")
        if not png.suffix:
            png = png.with_name(png.name + ".png")
        elif png.suffix.lower() not in PLOT_SUFFIXES:
            raise AchillesError(f"--plot must end in {', '.join(PLOT_SUFFIXES)}, not {png.suffix!r}")
    return check_destination(png, "file", flag="--plot")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "probe",
        help="next-token probabilities as critical units are masked one by one (Figure 1)",
        description="For levels n = 0, 1, …, mask the first n units of an identification's "
        "minimal (or critical) set and show the top-k next tokens after --prompt, the "
        "probability and rank of --target (its first token), and a greedy continuation "
        "generated under the same mask. Writes --out (JSON) and bar charts next to it (.png).",
    )
    add_common(p, text=False)
    g = p.add_argument_group("probe")
    g.add_argument("--prompt", required=True, help="raw prompt (no chat template), e.g. "
                   "'What is the capital of France?'")
    g.add_argument("--target", required=True, help="expected continuation, e.g. ' Paris' "
                   "(scored by its first token)")
    g.add_argument("--mask", required=True, help="identification.json whose set is masked")
    g.add_argument("--set", choices=["minimal", "critical"], default="minimal",
                   help="which set to mask, in its stored order (default: %(default)s)")
    g.add_argument("--top-k", type=parse_int, default=10, help="tokens shown per level (default: %(default)s)")
    g.add_argument("--max-new-tokens", type=parse_int, default=20,
                   help="greedy continuation length per level, 0 for none (default: %(default)s)")
    g.add_argument("--levels", default=None,
                   help="comma-separated numbers of masked units (default: 0 up to the set size)")
    g.add_argument("--out", required=True, help="probe JSON to write")
    g.add_argument("--plot", default=None, help="bar-chart PNG (default: --out with .png)")
    p.set_defaults(run=_run)

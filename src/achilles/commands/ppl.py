"""``achilles ppl``: perplexity of a model, optionally with a mask installed."""

from __future__ import annotations

import argparse
import dataclasses
import logging

from achilles.commands.common import add_common, check_destination, model_spec, progress
from achilles.config import add_arguments, from_args, parse_int
from achilles.errors import AchillesError
from achilles.evaluation.data import load_corpus
from achilles.evaluation.masks import load_mask
from achilles.evaluation.perplexity import PerplexityConfig, evaluator_from_config
from achilles.model.loading import load_model
from achilles.results.provenance import environment
from achilles.results.schema import read_json

logger = logging.getLogger(__name__)


def add_mask_options(p: argparse.ArgumentParser, *, levels: bool = False) -> None:
    g = p.add_argument_group("mask", "units to zero while evaluating")
    g.add_argument("--mask", default=None, required=levels,
                   help="identification.json (its --set) or ranking.json (its --top N units)")
    if not levels:
        g.add_argument("--top", type=parse_int, default=None,
                       help="mask the first N units of the ranking (or of the set)")
    g.add_argument("--set", dest="set_name", choices=["minimal", "critical"], default="minimal",
                   help="which set of an identification.json to use (default: minimal)")


def check_mask_args(args: argparse.Namespace) -> None:
    """Refuse bad mask options before a model is loaded."""
    top = getattr(args, "top", None)
    if top is not None and top < 0:
        raise AchillesError("--top must be >= 0")
    if args.mask is None:
        if top is not None:
            raise AchillesError("--top needs --mask")
        return
    kind = read_json(args.mask).get("kind")
    if kind not in ("identification", "ranking"):
        raise AchillesError(
            f"{args.mask} is a {kind!r} file: --mask takes an identification.json or a ranking.json"
        )
    if kind == "ranking" and top is None:
        raise AchillesError(f"{args.mask} is a ranking: say how many top units to mask with --top N")


def _run_ppl(args: argparse.Namespace) -> int:
    cfg: PerplexityConfig = from_args(PerplexityConfig, args)
    spec = model_spec(args)
    out = check_destination(args.out, "file")
    check_mask_args(args)
    corpus = load_corpus(cfg.data, max_documents=cfg.max_samples)
    lm = load_model(spec)
    mask = None
    if args.mask is not None:
        mask = load_mask(lm, args.mask, top=args.top, set_name=args.set_name)
    ev = evaluator_from_config(
        lm.model, lm.tokenizer, corpus.documents, cfg, progress=progress(args)
    )
    result = ev.evaluate(mask.pool if mask else None, mask.units if mask else ())
    result.config = {
        "model": dataclasses.asdict(spec),
        "perplexity": {**dataclasses.asdict(cfg), **ev.settings()},
        "mask": None if mask is None else {
            **mask.source, "n_units": len(mask.units), "units": [u.to_dict() for u in mask.units],
        },
    }
    result.env = environment(lm.model)
    if mask is not None:
        result.run_id = mask.run_id  # the perplexity of a run's set belongs to that run
    result.save(str(out))
    what = f"{len(mask.units)} unit(s) masked" if mask else "no mask"
    extra = ""
    if result.nonfinite_windows:
        extra = f" ({result.nonfinite_windows} non-finite window(s))"
    print(
        f"perplexity {result.ppl:.6g} (log10 {result.log10_ppl:.4f}, nll {result.nll:.5f}) over "
        f"{result.tokens} tokens, {result.windows} windows, {what}{extra}\nwritten: {out}"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ppl",
        help="perplexity on evaluation text, optionally with a mask",
        description="Perplexity of a model on a local file or a hub dataset (wikitext-103, "
        "c4): strided sliding window (standard) or the reference evaluator's protocol (paper), "
        "with an identification or ranking mask installed if given.",
    )
    add_common(p, text=False)
    add_arguments(p, PerplexityConfig)
    add_mask_options(p)
    p.add_argument("--out", required=True, help="perplexity JSON to write")
    p.set_defaults(run=_run_ppl)

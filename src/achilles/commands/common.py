"""Option groups and helpers shared by subcommands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from achilles.config import (
    IdentifyConfig,
    ModelSpec,
    RankConfig,
    TextSpec,
    add_arguments,
    from_args,
)
from achilles.errors import AchillesError
from achilles.method.ranking import METHODS
from achilles.results.files import check_destination
from achilles.results.lock import claim_dir

if TYPE_CHECKING:
    from achilles.method.prepared import CheckedInputs
    from achilles.method.ranking.base import Ranking
    from achilles.model.loading import LoadedModel


def add_common(p: argparse.ArgumentParser, *, text: bool = True, texts: bool = False) -> None:
    """Model options, text options, and logging flags (``texts``: --text-file repeatable)."""
    add_arguments(p, ModelSpec)
    if text and texts:
        add_arguments(p, TextSpec, exclude=("text_file",))
        p.add_argument("--text-file", dest="text_file", action="append", metavar="FILE",
                       help="file holding the input text (UTF-8); repeat it to rank on several "
                       "texts, scores summed over them")
    elif text:
        add_arguments(p, TextSpec)
    g = p.add_argument_group("output")
    g.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    g.add_argument("--verbose", action="store_true", help="debug logging")


class _DeprecatedAlias(argparse.Action):
    """An old option spelling: works for one more release, says what replaces it."""

    def __init__(self, *args: object, new: str = "", **kw: object) -> None:
        self.new = new
        super().__init__(*args, **kw)  # type: ignore[arg-type]

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001
        print(f"achilles: warning: {option_string} is deprecated and will be removed in the "
              f"next release: use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(p: argparse.ArgumentParser, old: str, new: str, dest: str,
                         **kw: Any) -> None:
    """Accept ``old`` as a hidden spelling of ``new`` (same ``dest``), with a warning."""
    p.add_argument(old, dest=dest, action=_DeprecatedAlias, new=new, help=argparse.SUPPRESS,
                   default=argparse.SUPPRESS, **kw)


def add_weightless_common(p: argparse.ArgumentParser) -> None:
    """Model options without dtype/device (for commands that never load the weights), and logging flags."""
    add_arguments(p, ModelSpec, exclude=("dtype", "device", "device_map"))
    g = p.add_argument_group("output")
    g.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    g.add_argument("--verbose", action="store_true", help="debug logging")


def add_rank_options(p: argparse.ArgumentParser) -> None:
    add_arguments(p, RankConfig, choices={"method": sorted(METHODS)})


def add_identify_options(p: argparse.ArgumentParser, *, prefix_batch: bool = True) -> None:
    exclude = () if prefix_batch else ("batch_size",)
    add_arguments(p, IdentifyConfig, exclude=exclude)


def model_spec(args: argparse.Namespace) -> ModelSpec:
    return from_args(ModelSpec, args)


def text_of(args: argparse.Namespace) -> str:
    return from_args(TextSpec, args).resolve()


def texts_of(args: argparse.Namespace) -> list[str]:
    """The texts of ``--text`` or of every ``--text-file`` (see :func:`add_common`)."""
    files = getattr(args, "text_file", None)
    if isinstance(files, list) and len(files) > 1:
        if getattr(args, "text", None) is not None:
            raise AchillesError("give --text or --text-file, not both")
        return [TextSpec(text_file=f).resolve() for f in files]
    if isinstance(files, list):
        args = argparse.Namespace(**{**vars(args), "text_file": files[0]})
    return [text_of(args)]


def rank_config(args: argparse.Namespace) -> RankConfig:
    return from_args(RankConfig, args)


def identify_config(args: argparse.Namespace, **overrides: object) -> IdentifyConfig:
    return from_args(IdentifyConfig, args, **overrides)


def check_writable(path: str | Path, *, flag: str = "--out") -> Path:
    """Fail early (before loading a model) if ``path`` cannot be written; create nothing.

    A name with a suffix is a file destination, one without a folder destination (see
    :func:`achilles.results.files.check_destination`).
    """
    kind = "file" if Path(path).suffix else "dir"
    return check_destination(path, kind, flag=flag)


def claim_out_dir(args: argparse.Namespace, path: str | Path, *, flag: str = "--out-dir") -> Path:
    """Check output folder ``path`` and hold it for this run (see :func:`achilles.results.lock.claim_dir`).

    The claim is released when the command returns (``cli.main`` keeps it in
    ``args.exit_stack``); a second run into the same folder meanwhile is refused.
    """
    p = check_destination(path, "dir", flag=flag)
    stack = getattr(args, "exit_stack", None)
    if stack is not None:
        stack.enter_context(claim_dir(p, flag=flag))
    return p


def progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "quiet", False)


def fitted_text(args: argparse.Namespace, skeleton: object, text: str) -> str:
    """``text`` checked against the model's context: refused, or cut with ``--truncate``."""
    from achilles.model.loading import fit_text

    return fit_text(skeleton.tokenizer, skeleton.model, text,  # type: ignore[attr-defined]
                    truncate=getattr(args, "truncate", False))


def load_checked(
    args: argparse.Namespace, spec: ModelSpec, text: str, *, rank_config: RankConfig | None = None,
    ranking: Ranking | None = None, force: bool = False,
) -> tuple[LoadedModel, CheckedInputs]:
    """The command boilerplate after the config and the claimed out-dir: check the inputs
    before the weights load (text fitted to the context with ``--truncate``, pool, a
    ranking from disk), then load the model. Returns ``(LoadedModel, CheckedInputs)``;
    pass both to :func:`achilles.method.pipeline.prepare`."""
    from achilles.method.pipeline import preflight
    from achilles.model.loading import load_model

    checked = preflight(spec, text=text, rank_config=rank_config, ranking=ranking,
                        force=force, truncate=bool(getattr(args, "truncate", False)))
    return load_model(spec, tokenizer=checked.skeleton.tokenizer), checked

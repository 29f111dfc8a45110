"""Model lists: a file of model ids/paths with per-model options, or the shipped ``paper21``.

One model per line; ``#`` starts a comment. After the id or path a line may carry the model
options of ``achilles find`` (``--dtype``, ``--device``, ``--device-map``, ``--revision``,
``--trust-remote-code``) and ``--name`` (the run folder's name)::

    models/sink
    Qwen/Qwen2.5-0.5B-Instruct --dtype bfloat16
    /data/llama-70b --device-map auto --name llama70b

``paper21`` names the 21 models of the study, shipped with their shapes
(``achilles/data/paper21.json``) so ``achilles plan`` can size them offline.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from achilles.config import ModelSpec, add_arguments
from achilles.errors import AchillesError

BUILTIN_LISTS: tuple[str, ...] = ("paper21",)


@dataclass(frozen=True)
class ModelEntry:
    """One model of a census: its run-folder name, how to load it, and (if shipped) its shape.

    Attributes:
        name: the run folder's name (unique within the list).
        spec: the model id/path and its loading options.
        shape: a config dict sufficient to build the model on the meta device (``paper21``).
        info: the shipped facts about it (reported parameters, reference unit counts).
    """

    name: str
    spec: ModelSpec
    shape: dict[str, Any] | None = None
    info: dict[str, Any] | None = None


class _LineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise AchillesError(message)


def _line_parser() -> argparse.ArgumentParser:
    p = _LineParser(prog="", add_help=False)
    add_arguments(p, ModelSpec, exclude=("model",))
    p.add_argument("--name", default=argparse.SUPPRESS)
    return p


def slug(model: str) -> str:
    """A folder name for ``model``: a local folder's name, or the hub id with ``/`` as ``__``."""
    local = Path(model).expanduser()
    base = local.resolve().name if local.exists() else model.strip("/").replace("/", "__")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", base).lstrip("._-")[:200]  # one visible path component
    return name or "model"


NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
"""A run name: one path component (no ``/``, not ``.``/``..``, not hidden), as :func:`slug` makes."""


def check_name(name: str, where: str) -> str:
    """``name`` if it is a valid run-folder name (see :data:`NAME_RE`), else one error line."""
    if not NAME_RE.fullmatch(name):
        raise AchillesError(
            f"{where}: --name {name!r} is not a folder name: use letters, digits, '.', '_' and '-' "
            "(starting with a letter or digit, at most 200 characters)"
        )
    return name


def _unique(names: list[tuple[str | None, str]], where: list[str]) -> list[str]:
    """Run names, unique across explicit (``--name``) and automatic ones (``(explicit, auto)`` pairs).

    Explicit names are kept and must not repeat; an automatic name that is taken gets the
    first free ``-2``, ``-3``... suffix, so it can never land on another entry's folder.
    """
    taken: dict[str, str] = {}
    for (explicit, _), w in zip(names, where, strict=True):
        if explicit is not None:
            if explicit in taken:
                raise AchillesError(f"{w}: --name {explicit!r} is also the name of {taken[explicit]}: "
                                    "give every model its own name")
            taken[explicit] = w
    out = []
    for (explicit, auto), w in zip(names, where, strict=True):
        if explicit is not None:
            out.append(explicit)
            continue
        name, k = auto, 1
        while name in taken:
            k += 1
            name = f"{auto}-{k}"
        taken[name] = w
        out.append(name)
    return out


def builtin_list(name: str) -> dict[str, Any]:
    """The shipped model list ``name`` (``paper21``) as stored."""
    text = resources.files("achilles.data").joinpath(f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)


def read_model_list(source: str, base: ModelSpec | None = None, *, sizing_only: bool = False) -> list[ModelEntry]:
    """Parse ``source`` (a list file, or ``paper21``) into entries.

    ``base`` carries the options given on the command line; a line's own options override
    them, except remote code: a line may narrow, never widen, what the command line permits
    (``--trust-remote-code`` on a line needs it in ``base`` too, else the line is refused).
    ``sizing_only`` (``achilles plan``, which reads configs only): every entry runs no
    remote code, whatever its line says. Raises :class:`AchillesError` naming the file and
    line for a bad line, and for a missing or empty list.
    """
    base = base or ModelSpec(model="-")
    if source in BUILTIN_LISTS:
        doc = builtin_list(source)
        return [
            ModelEntry(m["name"], dataclasses.replace(base, model=m["id"]), dict(m["config"]), m)
            for m in doc["models"]
        ]
    path = Path(source)
    if not path.is_file():
        raise AchillesError(
            f"model list not found: {source} (give a file with one model id or path per line, "
            f"or one of: {', '.join(BUILTIN_LISTS)})"
        )
    parser = _line_parser()
    entries: list[tuple[str | None, ModelSpec]] = []
    where: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise AchillesError(f"model list {path} is not UTF-8 text: save it as UTF-8") from None
    for lineno, raw in enumerate(lines, 1):
        if "\x00" in raw:
            raise AchillesError(f"{path}:{lineno}: holds a NUL byte: a model list is plain text, "
                                "one model id or path per line")
        try:
            words = shlex.split(raw, comments=True)
        except ValueError as e:
            raise AchillesError(f"{path}:{lineno}: {e}") from None
        if not words:
            continue
        model, *options = words
        if model.startswith("-"):
            raise AchillesError(f"{path}:{lineno}: a line starts with the model id or path, not {model!r}")
        try:
            ns = vars(parser.parse_args(options))
        except AchillesError as e:
            raise AchillesError(f"{path}:{lineno}: {e}") from None
        name = ns.pop("name", None)
        if name is not None:
            check_name(name, f"{path}:{lineno}")
        if sizing_only:
            ns["trust_remote_code"] = False
        elif ns.get("trust_remote_code") and not base.trust_remote_code:
            raise AchillesError(
                f"{path}:{lineno}: --trust-remote-code on a list line needs --trust-remote-code on "
                "the command line too (a list may narrow, never widen, what the command line permits)"
            )
        entries.append((name, dataclasses.replace(base, model=model, **ns)))
        where.append(f"{path}:{lineno}")
    if not entries:
        raise AchillesError(f"model list {path} is empty: put one model id or path per line")
    names = _unique([(n, slug(s.model)) for n, s in entries], where)
    return [ModelEntry(n, s) for n, (_, s) in zip(names, entries, strict=True)]

"""Configuration dataclasses: the single source of truth for the CLI and saved runs.

Each field carries its CLI flag and help text in ``metadata``; :func:`add_arguments` turns a
dataclass into argparse options and :func:`from_args` builds it back from the parsed
namespace, so no option is spelled twice. Every result file stores the resolved configs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from achilles.errors import AchillesError, require
from achilles.results.inputs import read_text_input

DTYPE_ALIASES: dict[str, str] = {
    "auto": "auto", "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16",
    "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "half": "float16",
}
"""Accepted ``--dtype`` spellings (transformers' names and the short ones) -> canonical name."""
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def normalize_dtype(s: str) -> str:
    """``bf16`` -> ``bfloat16`` etc.; an :class:`AchillesError` for anything else."""
    key = str(s).strip().lower().removeprefix("torch.")
    if key not in DTYPE_ALIASES:
        raise AchillesError(
            f"--dtype {s!r}: use one of float32/fp32, bfloat16/bf16, float16/fp16, auto"
        )
    return DTYPE_ALIASES[key]


def check_device(s: str) -> str:
    """``auto``, ``cpu``, ``mps``, ``cuda`` or ``cuda:N``; an :class:`AchillesError` otherwise."""
    if not _DEVICE.fullmatch(str(s)):
        raise AchillesError(f"--device {s!r}: use auto, cpu, cuda, cuda:N (e.g. cuda:1) or mps")
    return str(s)


def opt(default: Any, help: str, flag: str | None = None, **kw: Any) -> Any:  # noqa: A002
    """A dataclass field with CLI metadata."""
    meta = {"help": help, "flag": flag, **kw}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load and how."""

    model: str = opt(
        None,
        "a causal LM: a local folder, a .gguf file (dequantized once, then cached), an "
        "installed model by name (smollm2), or a hub id",
        required=True,
    )
    gguf_file: str | None = opt(
        None, "a GGUF file inside the --model folder (or give the .gguf path to --model)"
    )
    dtype: str | None = opt(
        None,
        "weights dtype: float32/fp32, bfloat16/bf16, float16/fp16, or auto (the checkpoint's "
        "dtype, as in transformers); default: bfloat16 on a GPU with native bf16, else "
        "float16; float32 on CPU",
        type=normalize_dtype,
    )
    device: str = opt(
        "auto", "device when not using --device-map: auto (cuda if available), cpu, cuda, "
        "cuda:N or mps", type=check_device,
    )
    device_map: str | None = opt(
        None, "accelerate device map, e.g. 'auto' to spread a large model over all GPUs"
    )
    revision: str | None = opt(None, "hub revision (branch, tag or commit)")
    trust_remote_code: bool = opt(
        False, "allow the model folder's own Python code to run (off by default: a security risk)"
    )

    def __post_init__(self) -> None:
        if self.dtype is not None:
            object.__setattr__(self, "dtype", normalize_dtype(self.dtype))
        check_device(self.device)


@dataclass(frozen=True)
class TextSpec:
    """The input text (exactly one of --text / --text-file)."""

    text: str | None = opt(None, "input text")
    text_file: str | None = opt(None, "file holding the input text (UTF-8)")
    truncate: bool = opt(
        False,
        "cut a text longer than the model's context (max_position_embeddings) to fit, with a "
        "warning (default: refuse it)",
    )

    def resolve(self) -> str:
        require(
            (self.text is None) != (self.text_file is None),
            "give exactly one of --text or --text-file",
        )
        if self.text_file is not None:
            return read_text_input(self.text_file, "--text-file")
        return self.text  # type: ignore[return-value]


@dataclass(frozen=True)
class RankConfig:
    """Stage 1: rank units by noise sensitivity (or another ranking method)."""

    method: str = opt("perturbation", "ranking method")
    alpha: float = opt(5.0, "noise scale α (absolute std, or a multiple of the embedding RMS)")
    samples: int = opt(100, "number K of noisy copies")
    noise: Literal["absolute", "relative"] = opt(
        "absolute", "absolute: std α (the paper); relative: std α·RMS(embeddings)"
    )
    reduce: Literal["max", "mean"] = opt(
        "max", "how a unit's per-position scores are reduced to one score"
    )
    pool: Literal["paper", "mlp", "down", "all"] = opt(
        "paper", "unit pool preset (paper: the tensors the reference code hooks)"
    )
    components: tuple[str, ...] | None = opt(
        None, "explicit comma-separated component kinds (overrides --pool), e.g. mlp.down,attn.o"
    )
    keep: int = opt(10000, "how many top units to save")
    seed: int = opt(42, "random seed of the noise (sample i is the i-th randn draw)")
    batch_size: int | None = opt(None, "noisy copies per forward pass (default: from memory)")

    def __post_init__(self) -> None:
        require(math.isfinite(self.alpha) and self.alpha > 0, "--alpha must be > 0")
        require(self.samples >= 1, "--samples (K) must be >= 1")
        require(self.keep >= 1, "--keep must be >= 1")
        require(self.batch_size is None or self.batch_size >= 1, "--batch-size must be >= 1")
        require(
            self.components is None or len(self.components) > 0,
            "--components is empty: give component kinds, e.g. mlp.down,attn.o",
        )


@dataclass(frozen=True)
class IdentifyConfig:
    """Stage 2: causal identification by prefix masking."""

    epsilon: float = opt(1.0, "collapse threshold ε on Δ = log10(PPL_masked/PPL_clean)")
    step: int = opt(1, "prefix step Δn")
    search: Literal["linear", "bisect"] = opt(
        "linear", "linear: first n with Δ ≥ ε (reference); bisect: galloping + binary search"
    )
    max_neurons: int = opt(1000, "largest prefix tried")
    minimize: bool = opt(True, "drop members of S* while Δ stays ≥ ε (irreducible set)")
    curve_until: float = opt(
        4.0,
        "linear search keeps extending the curve past n* until Δ reaches this (so n*(ε) for "
        "ε in 0.5,1,2,3,4 is read off one curve); 'inf' traces up to --max-neurons",
    )
    batch_size: int | None = opt(None, "masked copies per forward pass (default: from memory)")
    fp32_check: bool = opt(
        True,
        "when the model is not float32, re-measure Δ of the final set in float32 (each layer "
        "upcast in place around its forward: one float32 layer of extra memory; offloaded "
        "models are reloaded in float32). Both stages' results are saved before it runs",
    )

    def __post_init__(self) -> None:
        require(math.isfinite(self.epsilon) and self.epsilon > 0, "--epsilon must be > 0")
        require(self.step >= 1, "--step must be >= 1")
        require(self.max_neurons >= 1, "--max-neurons must be >= 1")
        require(self.batch_size is None or self.batch_size >= 1, "--batch-size must be >= 1")
        require(
            not math.isnan(self.curve_until) and self.curve_until > 0,
            "--curve-until must be a number > 0 (or inf)",
        )


# ---------------------------------------------------------------------------- CLI bridge


def _flag(f: dataclasses.Field[Any]) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _strip_optional(hint: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return hint


def _parse_list(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


INT_RANGE = (-(2**63), 2**63 - 1)
"""What an integer option may be: a 64-bit integer (torch's seeds, counts and sizes are)."""


def parse_numbers(s: str, flag: str, kind: type = int) -> tuple:
    """``"1,3,5"`` -> ``(1, 3, 5)`` of ``kind``; an :class:`AchillesError` naming ``flag`` otherwise."""
    name = "integers" if kind is int else "numbers"
    try:
        vals = tuple(kind(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise AchillesError(f"{flag} takes a comma-separated list of {name}, got {s!r}") from None
    require(bool(vals), f"{flag} is empty: give at least one value, e.g. {flag} 1,3,5")
    lo, hi = INT_RANGE
    big = next((v for v in vals if kind is int and not lo <= v <= hi), None)
    require(big is None, f"{flag}: {big} is beyond the 64-bit integer range: give a smaller number")
    return vals


def parse_int(s: str) -> int:
    """An integer option's value (argparse ``type``): a 64-bit integer, or a usage error.

    Every integer option goes through it (dataclass fields via :func:`add_arguments`, the
    commands' own options by name), so none reaches torch as a number it cannot hold.
    """
    try:
        value = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {s!r}") from None
    lo, hi = INT_RANGE
    if not lo <= value <= hi:
        raise argparse.ArgumentTypeError(
            f"{s} is beyond the 64-bit integer range ({lo} to {hi}): give a smaller number"
        )
    return value


def _parse_float(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None


def add_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    exclude: tuple[str, ...] = (),
    choices: dict[str, list[str]] | None = None,
) -> None:
    """Add one option per field of dataclass ``cls`` (help and choices from metadata/types)."""
    hints = typing.get_type_hints(cls)
    title = (cls.__doc__ or cls.__name__).strip().splitlines()[0].rstrip(".")
    group = parser.add_argument_group(title[:1].lower() + title[1:])
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        hint = hints[f.name]
        kw: dict[str, Any] = {"dest": f.name, "help": f.metadata.get("help", "")}
        default = None if f.default is dataclasses.MISSING else f.default
        if f.metadata.get("required"):
            kw["required"] = True
        else:
            kw["default"] = argparse.SUPPRESS  # unset flags keep the dataclass default
            if default is not None and "default" not in kw["help"]:
                shown = ",".join(default) if isinstance(default, tuple) else default
                kw["help"] += f" (default: {shown})"
        inner = _strip_optional(hint)
        if inner is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(inner) is Literal:
            kw["choices"] = list(typing.get_args(inner))
        elif inner is int:
            kw["type"] = parse_int
        elif inner is float:
            kw["type"] = _parse_float
        elif typing.get_origin(inner) is tuple:
            kw["type"] = _parse_list
        if "type" in f.metadata:
            kw["type"] = _argparse_type(f.metadata["type"])
        if choices and f.name in choices:
            kw["choices"] = choices[f.name]
        group.add_argument(_flag(f), **kw)


def _argparse_type(fn: Any) -> Any:
    """``fn`` with its :class:`AchillesError` turned into argparse's usage error."""

    def convert(s: str) -> Any:
        try:
            return fn(s)
        except AchillesError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None

    convert.__name__ = getattr(fn, "__name__", "value")
    return convert


def from_args(cls: type, ns: argparse.Namespace, **overrides: Any) -> Any:
    """Build dataclass ``cls`` from the parsed options present in ``ns``."""
    kw = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}
    kw.update(overrides)
    try:
        return cls(**kw)
    except TypeError as e:  # a required field is missing
        raise AchillesError(str(e)) from None

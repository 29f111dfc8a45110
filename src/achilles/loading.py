"""Loading models and tokenising text, with clear errors for what users get wrong.

The loading path is the ordinary Hugging Face one (``AutoModelForCausalLM.from_pretrained``
with a local folder or a hub id), so a user with hub access runs exactly this code.
``trust_remote_code`` stays off unless asked for; safetensors weights are preferred.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from achilles.config import ModelSpec
from achilles.errors import AchillesError

logger = logging.getLogger(__name__)

MIN_TOKENS = 10
"""The paper's minimum input length: shorter texts give unstable critical sets."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model in eval mode with its tokenizer and the spec that loaded it."""

    model: torch.nn.Module
    tokenizer: object
    spec: ModelSpec

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AchillesError(f"--device {device} was asked for but no CUDA GPU is visible; use --device cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise AchillesError(
            f"--device {device}: only {torch.cuda.device_count()} CUDA GPU(s) are visible "
            f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})"
        )
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a GPU with native bf16 (compute capability ≥ 8.0), float16 with
    a warning on an older GPU, float32 on CPU."""
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type != "cuda":
        return torch.float32
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) >= (8, 0):
        return torch.bfloat16
    logger.warning(
        "this GPU (compute capability %d.%d) has no native bfloat16: loading in float16, which "
        "overflows on some models; pass --dtype float32 if results look non-finite",
        major, minor,
    )
    return torch.float16


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else is meant as a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _load_error(name: str, local: Path, e: BaseException) -> AchillesError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    where = "local folder" if local.exists() else "hub id"
    hint = (
        "check the folder holds a causal LM and its tokenizer"
        if local.exists()
        else "is the id right and the hub reachable? Offline, pass a local folder to --model"
    )
    if "trust_remote_code" in first:
        hint = "this model needs its own code: pass --trust-remote-code if you trust it"
    return AchillesError(f"could not load {where} {name!r}: {first} ({hint})")


def _source(spec: ModelSpec) -> tuple[str, Path]:
    name = spec.model
    local = Path(name).expanduser()
    if not local.exists() and _looks_like_path(name):
        raise AchillesError(f"model path not found: {name} (check --model)")
    if local.exists() and not local.is_dir():
        raise AchillesError(f"--model must be a folder or a hub id, not a file: {name}")
    if local.is_dir() and not (local / "config.json").is_file():
        raise AchillesError(f"{name} has no config.json: point --model at a saved model folder")
    return (str(local) if local.exists() else name), local


def inspect_model(spec: ModelSpec) -> LoadedModel:
    """Config, tokenizer and an empty (meta-device) model: everything but the weights.

    Cheap even for a 70B checkpoint, so commands validate their inputs (text length, unit
    pool, ranking fit) against it before a long weight load.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source, local = _source(spec)
    remote = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(source, **remote)
        tokenizer = AutoTokenizer.from_pretrained(source, **remote)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                config, trust_remote_code=spec.trust_remote_code
            )
    except (OSError, ValueError, KeyError) as e:
        raise _load_error(spec.model, local, e) from None
    return LoadedModel(model.eval(), tokenizer, spec)


def load_model(spec: ModelSpec, *, tokenizer: object | None = None) -> LoadedModel:
    """Load ``spec.model`` (a local folder or a hub id) in eval mode, with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, local = _source(spec)
    device = resolve_device("cuda" if spec.device_map else spec.device)
    # --dtype auto is the checkpoint's own dtype, as in transformers; no --dtype (None) is the
    # device default that resolve_dtype calls "auto"
    dtype = "auto" if spec.dtype == "auto" else resolve_dtype(spec.dtype or "auto", device)
    kwargs: dict[str, object] = {
        "dtype": dtype,
        "trust_remote_code": spec.trust_remote_code,
        "revision": spec.revision,
    }
    if spec.device_map:
        kwargs["device_map"] = spec.device_map
    try:
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(
                source, revision=spec.revision, trust_remote_code=spec.trust_remote_code
            )
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise _load_error(spec.model, local, e) from None
    if not spec.device_map:
        model.to(device)
    model.eval()
    logger.info("loaded %s (%s, %s)", spec.model, model.config.model_type, next(model.parameters()).dtype)
    return LoadedModel(model, tokenizer, spec)


def tokenize(tokenizer: object, text: str, *, min_tokens: int = MIN_TOKENS) -> torch.Tensor:
    """Token ids ``[1, T]`` of ``text`` with the tokenizer's special tokens (BOS for Llama).

    This is what the reference code feeds the model (``tokenizer.encode``); Qwen tokenizers
    add no BOS. Texts shorter than ``min_tokens`` are refused.
    """
    ids = tokenizer(text, return_tensors="pt").input_ids  # type: ignore[operator]
    n = int(ids.shape[1])
    if n < min_tokens:
        raise AchillesError(
            f"text is {n} tokens long; at least {min_tokens} are needed for a stable ranking "
            "(give a longer --text or --text-file)"
        )
    return ids

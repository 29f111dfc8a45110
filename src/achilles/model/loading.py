"""Loading models and tokenising text, with clear errors for what users get wrong.

The loading path is the ordinary Hugging Face one (``AutoModelForCausalLM.from_pretrained``
with a local folder or a hub id), so a user with hub access runs exactly this code.
``trust_remote_code`` stays off unless asked for; safetensors weights are preferred.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from achilles.config import ModelSpec
from achilles.errors import AchillesError
from achilles.model.batching import is_oom
from achilles.model.checks import check_loading_info, model_path_problem
from achilles.model.gguf_source import dequantized, gguf_metadata, quiet_transformers, source_of

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
    if device == "mps" and not torch.backends.mps.is_available():
        raise AchillesError("--device mps was asked for but this torch has no MPS (Apple GPU) "
                            "backend available here; use --device cpu")
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


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
"""The named device maps accelerate accepts."""

HUB_TIMEOUT_S = 3.0
"""How long the hub may take to answer a connection before a hub id is refused as unreachable."""


def _hub_reachable() -> bool:
    """Whether the hub endpoint accepts a TCP connection within :data:`HUB_TIMEOUT_S`."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=HUB_TIMEOUT_S):
            return True
    except OSError:
        return False


def _hub_options(spec: ModelSpec) -> dict[str, object]:
    """``local_files_only`` for a hub id: offline or unreachable, the local cache or one line."""
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(
        try_to_load_from_cache(spec.model, "config.json", revision=spec.revision), str
    )
    if constants.HF_HUB_OFFLINE or not _hub_reachable():
        if not cached:
            raise AchillesError(
                f"could not load hub id {spec.model!r}: not in the local cache and the hub is "
                "not reachable (offline): pass a local model folder to --model, or connect"
            )
        return {"local_files_only": True}
    return {}


def _strict_errors() -> tuple[type[BaseException], ...]:
    """huggingface_hub's config-field validation error (transformers 5 validates config.json)."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # older huggingface_hub: configs are not validated
        return ()
    return (StrictDataclassError,)


CONFIG_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, KeyError, ArithmeticError, *_strict_errors(),
)
"""What reading a config.json raises for a damaged or invalid one."""


SIZE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "n_embd", "n_layer", "n_head",
    "n_inner", "n_positions",
)
"""Config fields that size the model: each, when given, must be a whole number >= 1."""

BUILD_ERRORS: tuple[type[BaseException], ...] = (
    *CONFIG_ERRORS, TypeError, RuntimeError, AssertionError, ArithmeticError, AttributeError,
)
"""What building a model from a config raises when the config is inconsistent."""


def check_config(config: object, name: str) -> None:
    """Refuse a config whose size fields are not whole numbers >= 1 (one line naming the
    field), before a model is built from it: torch and transformers fail on them with an
    assertion or a division by zero."""
    for field in SIZE_FIELDS:
        value = getattr(config, field, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise AchillesError(
                f"the config.json of {name!r} gives {field} = {value!r}: it must be a whole "
                "number >= 1 (fix that field)"
            )


def build_error(name: str, e: BaseException) -> AchillesError:
    """The one line for a model that cannot be built from its (inconsistent) config."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return AchillesError(f"cannot build {name!r} from its config.json: {first} (check its sizes)")


def _load_error(name: str, local: Path, e: BaseException) -> AchillesError:
    if isinstance(e, _strict_errors()):  # "Validation error for field 'x':\n  TypeError: ..."
        why = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        return AchillesError(f"the config.json of {name!r} is invalid: {why} (fix that field)")
    if isinstance(e, ArithmeticError):  # e.g. head_dim = hidden_size // num_attention_heads
        return build_error(name, e)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "weights only load failed" in first.lower() or "unpickl" in first.lower():
        return AchillesError(
            f"refused to load {name!r}: its .bin weights hold pickled objects that torch's safe "
            "loader (weights_only) will not run; use a safetensors checkpoint"
        )
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
    problem = model_path_problem(name, spec.gguf_file)
    if problem is not None:
        raise AchillesError(problem)
    if spec.device_map is not None and spec.device_map not in DEVICE_MAPS:
        raise AchillesError(
            f"--device-map must be one of {', '.join(DEVICE_MAPS)}, not {spec.device_map!r}"
        )
    return (str(local) if local.exists() else name), local


def inspect_model(spec: ModelSpec) -> LoadedModel:
    """Config, tokenizer and an empty (meta-device) model: everything but the weights.

    Cheap even for a 70B checkpoint, so commands validate their inputs (text length, unit
    pool, ranking fit) against it before a long weight load.
    """
    from transformers import AutoModelForCausalLM

    gguf = source_of(spec)
    if gguf is not None:  # config and tokenizer from the cache or the GGUF metadata
        config, tokenizer = gguf_metadata(gguf)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        model.gguf_provenance = gguf.provenance()
        return LoadedModel(model.eval(), tokenizer, spec)
    source, local = _source(spec)
    remote: dict[str, object] = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    if not local.exists():
        remote.update(_hub_options(spec))
    config = load_config(source, spec.model, local, **remote)
    tokenizer = load_tokenizer(source, spec.model, local, **remote)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                config, trust_remote_code=spec.trust_remote_code
            )
    except CONFIG_ERRORS as e:
        raise _load_error(spec.model, local, e) from None
    except BUILD_ERRORS as e:
        raise build_error(spec.model, e) from None
    return LoadedModel(model.eval(), tokenizer, spec)


def load_config(source: str, name: str, local: Path, **kwargs: object) -> object:
    """``AutoConfig.from_pretrained(source, **kwargs)``, checked (:func:`check_config`): a
    damaged, invalid or inconsistent config.json is one line. Its field warnings are not
    shown: what would break a run is refused here instead."""
    from transformers import AutoConfig

    kwargs.setdefault("trust_remote_code", False)  # never None: transformers would ask on stdin
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(source, **kwargs)
    except CONFIG_ERRORS as e:
        raise _load_error(name, local, e) from None
    check_config(config, name)
    return config


def load_tokenizer(source: str, name: str, local: Path, **kwargs: object) -> object:
    """``AutoTokenizer.from_pretrained(source, **kwargs)``, checked: every way a tokenizer
    file can be unreadable, and a vocabulary that cannot encode an unknown word, is one line.

    The ``tokenizers`` library raises a bare ``Exception`` for a tokenizer.json it cannot
    parse (an unknown model type, a malformed vocabulary), so that is what is caught here.
    """
    from transformers import AutoTokenizer

    kwargs.setdefault("trust_remote_code", False)  # never None: transformers would ask on stdin
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except CONFIG_ERRORS as e:
        raise _load_error(name, local, e) from None
    except Exception as e:  # noqa: BLE001 - tokenizers' parse errors are plain Exceptions
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AchillesError(
            f"could not read the tokenizer of {name!r}: {first} (its tokenizer.json is damaged "
            "or of a kind this tokenizers version does not know: re-save it with save_pretrained)"
        ) from None
    check_tokenizer(tokenizer, name)
    return tokenizer


def check_tokenizer(tokenizer: object, name: str) -> None:
    """Refuse a word-level or WordPiece vocabulary without its unknown token: it fails on
    the first word it does not know (``Missing [UNK] token from the vocabulary``)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = getattr(backend, "model", None)
    if type(model).__name__ not in ("WordLevel", "WordPiece"):
        return
    unk = getattr(model, "unk_token", None)
    if unk is None or unk not in tokenizer.get_vocab():  # type: ignore[attr-defined]
        raise AchillesError(
            f"the tokenizer of {name!r} is a {type(model).__name__} vocabulary without its "
            f"unknown token {unk!r}: it cannot encode a word it does not know; add {unk!r} to "
            "the vocabulary in tokenizer.json"
        )


def load_model(spec: ModelSpec, *, tokenizer: object | None = None) -> LoadedModel:
    """Load ``spec.model`` (a local folder, a GGUF file or a hub id) in eval mode, with its
    tokenizer. A GGUF file is dequantized once to float32 and cached (see
    :mod:`achilles.model.gguf_source`); later loads read the cached folder."""
    from transformers import AutoModelForCausalLM

    gguf = source_of(spec)
    if gguf is not None:
        folder = dequantized(gguf)
        plain = dataclasses.replace(spec, model=str(folder), gguf_file=None, revision=None)
        lm = load_model(plain, tokenizer=tokenizer)
        cast(Any, lm.model).gguf_provenance = gguf.provenance()
        return LoadedModel(lm.model, lm.tokenizer, spec)
    source, local = _source(spec)
    if spec.device_map and not torch.cuda.is_available():
        raise AchillesError(
            f"--device-map {spec.device_map} spreads a model over CUDA GPUs, and none is visible: "
            "drop --device-map"
        )
    device = resolve_device("cuda" if spec.device_map else spec.device)
    # --dtype auto is the checkpoint's own dtype, as in transformers; no --dtype (None) is the
    # device default that resolve_dtype calls "auto"
    dtype = "auto" if spec.dtype == "auto" else resolve_dtype(spec.dtype or "auto", device)
    kwargs: dict[str, object] = {
        "dtype": dtype,
        "trust_remote_code": spec.trust_remote_code,
        "revision": spec.revision,
        # mismatches are reported below, one line each, rather than as the loader's table
        "ignore_mismatched_sizes": True,
        "output_loading_info": True,
    }
    hub = {} if local.exists() else _hub_options(spec)
    kwargs.update(hub)
    kwargs["config"] = load_config(source, spec.model, local, revision=spec.revision,
                                   trust_remote_code=spec.trust_remote_code, **hub)
    if spec.device_map:
        kwargs["device_map"] = spec.device_map
    try:
        if tokenizer is None:
            tokenizer = load_tokenizer(
                source, spec.model, local, revision=spec.revision,
                trust_remote_code=spec.trust_remote_code, **hub,
            )
        with quiet_transformers():  # its load-report table is replaced by one line below
            # with output_loading_info=True it returns (model, info), which its annotation omits
            model, info = cast(
                "tuple[Any, dict[str, Any]]", AutoModelForCausalLM.from_pretrained(source, **kwargs)
            )
    except _LOAD_ERRORS as e:
        if is_oom(e):
            raise AchillesError(
                f"out of memory loading {spec.model!r} in {dtype}: use a smaller --dtype, "
                "--device-map auto, or a machine with more memory"
            ) from None
        raise _load_error(spec.model, local, e) from None
    check_loading_info(spec.model, info)
    if not spec.device_map:
        model.to(device)
    model.eval()
    logger.info("loaded %s (%s, %s)", spec.model, model.config.model_type, next(model.parameters()).dtype)
    return LoadedModel(model, tokenizer, spec)


def _load_errors() -> tuple[type[BaseException], ...]:
    import pickle

    from safetensors import SafetensorError

    return (OSError, ValueError, KeyError, RuntimeError, TypeError, EOFError,
            pickle.UnpicklingError, SafetensorError, MemoryError, AssertionError, ArithmeticError,
            *_strict_errors())


_LOAD_ERRORS = _load_errors()


def check_token_ids(input_ids: torch.Tensor, model: torch.nn.Module) -> None:
    """Refuse token ids the model's embedding table does not have (a tokenizer/model mismatch)."""
    vocab = cast(Any, model).get_input_embeddings().num_embeddings
    top = int(input_ids.max()) if input_ids.numel() else -1
    if top >= vocab or (input_ids.numel() and int(input_ids.min()) < 0):
        raise AchillesError(
            f"the tokenizer produced token id {top}, but the model's vocabulary has {vocab} "
            "entries: the tokenizer does not belong to this model (check the model folder)"
        )


def context_length(model_or_config: object) -> int | None:
    """The model's context in tokens (``max_position_embeddings`` / ``n_positions``), if known."""
    cfg = getattr(model_or_config, "config", model_or_config)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        n = getattr(cfg, name, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def encode(tokenizer: object, text: str, **kwargs: object) -> Any:
    """``tokenizer(text, **kwargs).input_ids``; a text the tokenizer cannot encode is one line
    (the ``tokenizers`` library raises a bare ``Exception``)."""
    try:
        return tokenizer(text, **kwargs).input_ids  # type: ignore[operator]
    except Exception as e:  # noqa: BLE001 - see above
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AchillesError(
            f"the model's tokenizer cannot encode the text: {first} (fix its tokenizer.json)"
        ) from None


def fit_text(tokenizer: object, model: object, text: str, *, truncate: bool = False) -> str:
    """``text`` if it fits the model's context, else refused, or with ``truncate`` cut to fit.

    A text past the context runs on positions the model never saw (and costs time and
    memory quadratic in its length), so it is never used silently. The cut keeps the longest
    prefix of the text whose tokens fit, and says so in a warning.
    """
    limit = context_length(model)
    with quiet_transformers():
        n = len(encode(tokenizer, text))
    if limit is None or n <= limit:
        return text
    if not truncate:
        raise AchillesError(
            f"the text is {n} tokens, longer than the model's context of {limit} tokens "
            f"(max_position_embeddings): shorten it, or pass --truncate to keep the first {limit}"
        )
    with quiet_transformers():
        lo, hi = 0, len(text)  # bisect for the longest prefix text[:lo] that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(encode(tokenizer, text[:mid])) <= limit:
                lo = mid
            else:
                hi = mid - 1
        kept = len(encode(tokenizer, text[:lo]))
    logger.warning(
        "--truncate: the text is %d tokens, the model's context %d; using its first %d "
        "characters (%d tokens) of %d", n, limit, lo, kept, len(text),
    )
    return text[:lo]


def tokenize(tokenizer: object, text: str, *, min_tokens: int = MIN_TOKENS) -> torch.Tensor:
    """Token ids ``[1, T]`` of ``text`` with the tokenizer's special tokens (BOS for Llama).

    This is what the reference code feeds the model (``tokenizer.encode``); Qwen tokenizers
    add no BOS. Texts shorter than ``min_tokens`` are refused.
    """
    with quiet_transformers():  # its "longer than the maximum" warning: see fit_text
        ids = encode(tokenizer, text, return_tensors="pt")
    n = int(ids.shape[1])
    if n < min_tokens:
        raise AchillesError(
            f"text is {n} tokens long; at least {min_tokens} are needed for a stable ranking "
            "(give a longer --text or --text-file)"
        )
    return ids

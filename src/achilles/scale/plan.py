"""Size a run from a model's config alone: units, memory, GPUs, passes, FLOPs and time.

Nothing here loads weights. The model is built on the meta device
(``accelerate.init_empty_weights`` + ``AutoModelForCausalLM.from_config``), so a 72B config
is sized in seconds; the unit pool comes from the same adapter table and
:func:`~achilles.model.units.build_pool` a real run uses, the GPU count from accelerate's own
``infer_auto_device_map``, and the batch size from the rule ``choose_batch_size`` applies to
free memory. FLOPs are ``2 · (matmul parameters) · tokens`` per row: the input embedding is a
lookup, stage 1 skips the LM head, and attention's T² term is left out (under 1 % at T ≈ 115).

Stage 2 is bounded, not predicted: the linear search evaluates at most
``max_neurons / step`` prefixes (and extends the curve past n*), bisection at most
``2 · ceil(log2(max_neurons / step)) + 1``; minimisation of a set of n* units evaluates at
most ``n*(n*+1)/2 + n*`` sets, reported for an assumed n*.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import types
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, cast

import torch

from achilles.config import opt
from achilles.errors import AchillesError, require
from achilles.method.recheck import upcast_groups
from achilles.model.batching import batch_size_for_memory
from achilles.model.units import build_pool
from achilles.results.envelope import envelope, new_run_id

logger = logging.getLogger(__name__)

DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

WEIGHT_SHARE = 0.9
"""Share of a GPU's memory the weights may fill; the rest is for activations and the CUDA
context (accelerate's own ``device_map="auto"`` also leaves room)."""

MAX_GPUS = 64

def parse_size(text: str) -> int:
    """``"141GiB"`` -> bytes (accelerate's parser: ``GB`` is 10⁹, ``GiB`` 2³⁰)."""
    from accelerate.utils import convert_file_size_to_int

    try:
        return int(convert_file_size_to_int(text.strip()))
    except ValueError:
        raise AchillesError(f"not a memory size: {text!r} (write e.g. 80GiB or 141GB)") from None


def format_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit that keeps it at or above 1."""
    for unit, power in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 2**power:
            return f"{n / 2**power:.1f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class PlanConfig:
    """What to size: the hardware, the throughput and the run's settings."""

    gpu_memory: str = opt("80GiB", "memory of one GPU (e.g. 80GiB, 141GB)")
    gpus: int | None = opt(None, "GPUs available per run; a plan needing more is marked as not fitting")
    tflops: float = opt(
        400.0, "sustained throughput of one GPU in TFLOP/s for the estimate (not the peak)"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = opt("bfloat16", "weights dtype of the run")
    tokens: int = opt(115, "tokens of the input text T (the study's text has 111-129)")
    samples: int = opt(100, "number K of noisy copies in stage 1")
    max_neurons: int = opt(1000, "largest prefix stage 2 tries")
    step: int = opt(1, "prefix step Δn of stage 2")
    pool: Literal["paper", "mlp", "down", "all"] = opt("paper", "unit pool preset")
    assume_n_star: int = opt(10, "n* assumed for the bound on minimisation passes")

    def __post_init__(self) -> None:
        require(self.tokens >= 2, "--tokens must be >= 2")
        require(self.samples >= 1, "--samples must be >= 1")
        require(self.max_neurons >= 1 and self.step >= 1, "--max-neurons and --step must be >= 1")
        require(self.tflops > 0 and math.isfinite(self.tflops), "--tflops must be > 0")
        require(self.gpus is None or self.gpus >= 1, "--gpus must be >= 1")
        require(self.assume_n_star >= 1, "--assume-n-star must be >= 1")
        parse_size(self.gpu_memory)

    @property
    def gpu_bytes(self) -> int:
        return parse_size(self.gpu_memory)


@dataclass
class Plan:
    """The sizing of one run (``achilles plan --json``)."""

    model: str
    model_type: str
    layers: int
    params: int
    matmul_params: int
    head_params: int
    units: int
    units_per_component: dict[str, int]
    weight_bytes: dict[str, int]
    gpus: int | None
    fits: bool
    stage1_accumulator_bytes: int
    gpu_load_bytes: int
    fp32_check_bytes: int
    activation_bytes: int
    stage1: dict[str, Any]
    stage2: dict[str, Any]
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    run_id: str = field(default_factory=new_run_id)

    def to_dict(self) -> dict[str, Any]:
        own = asdict(self)
        config, run_id = own.pop("config"), own.pop("run_id")
        return {**envelope("plan", config=config, run_id=run_id), **own}


def meta_model(config: Any, dtype: str = "bfloat16") -> torch.nn.Module:
    """``config`` (a ``PretrainedConfig`` or a dict with ``model_type``) built without weights."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from achilles.model.loading import BUILD_ERRORS, CONFIG_ERRORS, build_error, check_config

    if isinstance(config, Mapping):
        d = dict(config)
        try:
            config = AutoConfig.for_model(d.pop("model_type"), **d)
        except CONFIG_ERRORS as e:
            raise AchillesError(f"cannot build a config from {d}: {e}") from None
    name = str(getattr(config, "_name_or_path", "") or config.model_type)
    check_config(config, name)
    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=_DTYPES[dtype])
    except BUILD_ERRORS as e:
        raise build_error(name, e) from None
    model.tie_weights()  # init_empty_weights re-registers parameters, which unties them
    return model.eval()


def _gpus_needed(
    model: torch.nn.Module, gpu_bytes: int, total: int, *, shared: int = 0, reserve: int = 0
) -> tuple[int | None, dict[int, int]]:
    """Fewest GPUs of ``gpu_bytes`` that hold the run without offloading.

    Each GPU holds its part of the weights (accelerate's device map, at most
    :data:`WEIGHT_SHARE` of the GPU), its share of ``shared`` bytes spread over all GPUs (the
    stage-1 sums) and ``reserve`` bytes every GPU needs for itself (activations of one row,
    the float32 re-check). Returns the count and the weight bytes placed on each GPU
    (``None`` if even ``MAX_GPUS`` do not do).
    """
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes

    if reserve >= gpu_bytes:
        return None, {}
    sizes = compute_module_sizes(model)
    no_split = getattr(model, "_no_split_modules", None) or []
    start = max(1, math.ceil(total / max(int(WEIGHT_SHARE * gpu_bytes), 1)))
    for n in range(start, MAX_GPUS + 1):
        per_gpu = min(int(WEIGHT_SHARE * gpu_bytes), gpu_bytes - math.ceil(shared / n) - reserve)
        if per_gpu <= 0:
            continue
        memory: dict[int | str, int] = {i: per_gpu for i in range(n)}
        memory["cpu"] = 2**62
        # accelerate warns that no such CUDA devices exist here: expected, it is a plan
        with contextlib.redirect_stdout(io.StringIO()), _quiet("accelerate"):
            device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split)
        if all(isinstance(v, int) for v in device_map.values()):
            load = {i: 0 for i in range(n)}
            for name, dev in device_map.items():
                load[dev] += sizes[name]
            if max(load.values()) <= per_gpu:  # what is placed fits beside the rest
                return n, load
    return None, {}


@contextlib.contextmanager
def _quiet(name: str):  # noqa: ANN202
    lg = logging.getLogger(name)
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(level)


UNCHECKED_TOKENS = 4096
"""Above this T a plan whose shape records no context length says so (the shipped shapes of
``paper21`` give none; the study's texts are 111-129 tokens)."""

_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def _context(source: Any, cfg: Any) -> int | None:
    """The model's context: what a run checks texts against (:func:`achilles.model.loading.
    context_length`) for a real config; for a shape dict only a length it states (the config
    class's default is not the model's)."""
    from achilles.model.loading import context_length

    if isinstance(source, Mapping):
        stated = {k: source[k] for k in _CONTEXT_KEYS if source.get(k) is not None}
        return context_length(types.SimpleNamespace(**stated)) if stated else None
    return context_length(cfg)


def _activation_bytes(model: torch.nn.Module, tokens: int, widest: int) -> int:
    """Memory a GPU needs beyond weights and sums to run one row (batch size 1): the larger
    of stage 1's and stage 2's (its chunked LM head), under the batch rule's 70 % margin
    (:func:`achilles.model.batching.batch_size_for_memory`)."""
    from achilles.model.batching import head_bytes, row_bytes_estimate

    row = row_bytes_estimate(model, tokens, widest, logits=False)
    return math.ceil(row / 0.7) + head_bytes(model, tokens)


def _no_fit(settings: PlanConfig, weights: int, accum: int, activations: int, upcast: int) -> str:
    mem = settings.gpu_memory
    if activations + upcast >= settings.gpu_bytes:
        return (f"does not fit on any GPU of {mem}: one row of T = {settings.tokens:,} tokens "
                f"needs {format_bytes(activations)} of activations"
                + (f" and the float32 re-check {format_bytes(upcast)}" if upcast else "")
                + ": use fewer --tokens or larger GPUs")
    return (f"does not fit on {MAX_GPUS} GPUs of {mem} without offloading: weights "
            f"{format_bytes(weights)} and stage-1 sums {format_bytes(accum)} in all, plus "
            f"{format_bytes(activations + upcast)} on every GPU for one row"
            + (" and the float32 re-check" if upcast else ""))


def plan_model(config: Any, settings: PlanConfig, *, name: str = "", truncate: bool = False) -> Plan:
    """Size a run of ``config`` (a ``PretrainedConfig`` or a shape dict) under ``settings``.

    A T past the model's context is refused (a run refuses such a text), or with
    ``truncate`` cut to the context with a note (as a run's ``--truncate`` does).
    """
    model = meta_model(config, settings.dtype)
    cfg = cast(Any, model.config)
    pool = build_pool(model, settings.pool)
    summary = pool.summary()
    params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    embed = cast(Any, model).get_input_embeddings().weight
    head = cast(Any, model).get_output_embeddings()
    head_params = head.weight.numel() if head is not None else 0
    tied = head is not None and head.weight is embed
    # weights of matrix products: 2-D parameters outside embedding tables (lookups: tokens,
    # GPT-2's positions), plus the head when it is tied to the token table; norm weights and
    # biases are element-wise
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    matmul = sum(p.numel() for p in model.parameters() if p.dim() >= 2 and id(p) not in lookups)
    matmul += head_params if tied else 0
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    weight_bytes = {k: params * v + buffers for k, v in DTYPE_BYTES.items()}
    total = weight_bytes[settings.dtype]
    T, K = settings.tokens, settings.samples
    notes: list[str] = []
    plan_name = name or str(getattr(cfg, "_name_or_path", "") or cfg.model_type)
    limit = _context(config, cfg)
    if limit is not None and limit < T and truncate:
        notes.append(f"--truncate: T = {T:,} tokens cut to the model's context of {limit:,}")
        settings = dataclasses.replace(settings, tokens=limit)
        T = limit
    elif limit is not None and limit < T:
        raise AchillesError(
            f"{plan_name}: T = {T:,} tokens is past the model's context of {limit:,} tokens "
            f"(a run refuses such a text): give --tokens {limit} or fewer, or a shorter text"
        )
    if limit is None and T > UNCHECKED_TOKENS:
        notes.append(f"its shape records no context length: T = {T:,} tokens is not checked "
                     "against the model's context")

    # stage 1 keeps a float32 [T, C] clean activation, running sum and batch sum per site
    accum = 3 * 4 * T * pool.n_units
    widest = max(s.width for s in pool.sites)
    activations = _activation_bytes(model, T, widest)
    upcast = _upcast_bytes(model, settings.dtype)
    gpu = settings.gpu_bytes
    gpus, load = _gpus_needed(model, gpu, total, shared=accum, reserve=activations + upcast)
    fits = gpus is not None and (settings.gpus is None or gpus <= settings.gpus)
    if gpus is None:
        notes.append(_no_fit(settings, total, accum, activations, upcast))
    elif not fits:
        notes.append(f"needs {gpus} GPUs of {settings.gpu_memory}; only {settings.gpus} given")
    n_gpu = gpus or 1
    worst = max(load.values()) if load else total
    per_gpu_load = worst + math.ceil(accum / n_gpu)  # the fullest GPU's weights and stage-1 sums
    free = max(0, gpu - per_gpu_load)
    k_max = max(1, settings.max_neurons // settings.step)

    b1 = batch_size_for_memory(model, free, T, K, widest, logits=False)
    b2 = batch_size_for_memory(model, free, T, k_max, widest, logits=True)
    n = settings.assume_n_star
    rows2 = {
        "linear": 1 + k_max,
        "bisect": 1 + 2 * math.ceil(math.log2(k_max)) + 1 if k_max > 1 else 2,
        "minimize": n * (n + 1) // 2 + n,
    }
    flops1 = 2 * (matmul - head_params) * T * (K + 1)
    flops_row2 = 2 * matmul * T
    flops2 = {k: flops_row2 * v for k, v in rows2.items()}
    # a device map runs the layers one GPU after another: one GPU's throughput, not n of them
    rate = settings.tflops * 1e12
    seconds = (flops1 + flops2["linear"] + flops2["minimize"]) / rate
    if cfg.model_type == "phi3" and settings.pool == "paper":
        notes.append(
            "the reference also hooks resid_mlp_dropout, a copy of mlp.down_proj: its count "
            f"per token is {pool.n_units + cfg.num_hidden_layers * cfg.hidden_size:,}"
        )
    return Plan(
        model=plan_name,
        model_type=cfg.model_type,
        layers=int(summary["n_layers"]),
        params=params,
        matmul_params=matmul,
        head_params=head_params,
        units=pool.n_units,
        units_per_component=summary["units_per_component"],
        weight_bytes=weight_bytes,
        gpus=gpus,
        fits=fits,
        stage1_accumulator_bytes=accum,
        gpu_load_bytes=per_gpu_load,
        fp32_check_bytes=upcast,
        activation_bytes=activations,
        stage1={
            "passes_rows": K + 1,
            "batch_size": b1,
            "forward_passes": 1 + math.ceil(K / b1),
            "flops": flops1,
            "seconds": flops1 / rate,
        },
        stage2={
            "rows": rows2,
            "batch_size": b2,
            "forward_passes": {k: math.ceil(v / b2) for k, v in rows2.items()},
            "flops": flops2,
            "seconds": {k: v / rate for k, v in flops2.items()},
            "assumed_n_star": n,
        },
        seconds=seconds,
        config={**asdict(settings), "gpu_bytes": settings.gpu_bytes},
        notes=notes,
    )


def plan_source(
    model: str, settings: PlanConfig, *, revision: str | None = None, name: str = "",
    gguf_file: str | None = None, truncate: bool = False,
) -> Plan:
    """Size the model at ``model`` (a local folder with ``config.json``, a GGUF file, or a hub id)."""
    from achilles.config import ModelSpec
    from achilles.model.gguf_source import gguf_metadata, source_of
    from achilles.model.loading import _source, load_config

    spec = ModelSpec(model=model, revision=revision, gguf_file=gguf_file)
    gguf = source_of(spec)
    if gguf is not None:
        return plan_model(gguf_metadata(gguf)[0], settings, name=name or model, truncate=truncate)
    source, local = _source(spec)
    config = load_config(source, model, local, revision=revision)
    return plan_model(config, settings, name=name or model, truncate=truncate)


def count_tokens(
    model: str, text: str, *, revision: str | None = None, gguf_file: str | None = None
) -> int:
    """Tokens of ``text`` under the tokenizer of ``model`` (a folder, GGUF or hub id), BOS included."""
    from achilles.config import ModelSpec
    from achilles.model.gguf_source import gguf_metadata, source_of
    from achilles.model.loading import _source, load_tokenizer, tokenize

    spec = ModelSpec(model=model, revision=revision, gguf_file=gguf_file)
    gguf = source_of(spec)
    if gguf is not None:
        return int(tokenize(gguf_metadata(gguf)[1], text).shape[1])
    source, local = _source(spec)
    tokenizer = load_tokenizer(source, model, local, revision=revision)
    return int(tokenize(tokenizer, text).shape[1])


def plan_entry(
    entry: Any, settings: PlanConfig, text: str | None = None, *, truncate: bool = False
) -> Plan:
    """Plan one :class:`~achilles.scale.census.models.ModelEntry`: from its shipped shape, else its
    config. ``text`` sets T (its tokens); ``truncate`` cuts a T past the context to it, as a
    run's ``--truncate`` cuts the text."""
    if entry.spec.dtype in DTYPE_BYTES:
        settings = dataclasses.replace(settings, dtype=entry.spec.dtype)
    if text is not None:
        if entry.shape is not None:
            raise AchillesError(
                f"{entry.name} is a shipped shape without a tokenizer: give --tokens, not a text"
            )
        tokens = count_tokens(entry.spec.model, text, revision=entry.spec.revision,
                              gguf_file=entry.spec.gguf_file)
        settings = dataclasses.replace(settings, tokens=tokens)
    if entry.shape is not None:
        return plan_model(entry.shape, settings, name=entry.name)
    return plan_source(entry.spec.model, settings, revision=entry.spec.revision, name=entry.name,
                       gguf_file=entry.spec.gguf_file, truncate=truncate and text is not None)


def _upcast_bytes(model: torch.nn.Module, dtype: str) -> int:
    """Extra memory of the float32 re-check: it upcasts one decoder layer (or one weight-
    holding module outside the layers) at a time in place (:func:`achilles.method.recheck.
    upcast_groups`), so the largest such group is held in float32 at once (none for a
    float32 run; offloaded runs reload instead)."""
    extra = 4 - DTYPE_BYTES[dtype]
    if extra <= 0:
        return 0
    def size(m: torch.nn.Module, recurse: bool) -> int:
        # parameters, and floating buffers kept in the weights' dtype (Gemma's embed scale);
        # float32 buffers (rotary frequencies) are not upcast
        bufs = (b for b in m.buffers(recurse=recurse) if b.is_floating_point() and b.dtype != torch.float32)
        return sum(t.numel() for t in (*m.parameters(recurse=recurse), *bufs))

    layers, others = upcast_groups(model, low_precision_only=False)
    sizes = [size(layer, True) for layer in layers] + [size(m, False) for m in others]
    return extra * max(sizes, default=0)

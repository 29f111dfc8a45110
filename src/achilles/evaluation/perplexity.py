"""Perplexity of a (masked) model on evaluation text, computed honestly.

Two protocols:

* ``standard``: the strided sliding window of the Hugging Face perplexity guide over the
  concatenated token stream. Windows hold ``max_length`` tokens and start every ``stride``
  tokens; each token is scored **once**, with the context its window gives, and a window's
  first token (which has no context inside the window) is never a target. With
  ``stride == max_length`` the windows are disjoint.
* ``paper``: the reference evaluator (``wikitext_evaluator.py``): every document (row or
  paragraph) longer than 50 characters is one sample, truncated to ``max_length`` (512)
  tokens, no stride. The headline ``nll`` weights each sample by its ``T - 1`` predicted
  tokens; the reference's own figure, which weights each sample's mean loss by ``T``
  (BOS included), is reported under ``reference_nll_T_weighted`` / ``reference_ppl_T_weighted``
  so results can be compared with the paper's numbers.

NLL is computed from logits upcast to float32, summed per window in float32 and across
windows in float64. A window whose NLL is not finite is counted in ``nonfinite_windows`` and
makes the overall NLL non-finite: it is never dropped silently (the finite windows' figure
is reported separately as ``nll_finite_windows_only``). ``ppl = exp(nll)`` overflows to
``inf``; ``log10_ppl`` is the number to compare.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from achilles.config import opt
from achilles.errors import AchillesError, require
from achilles.method.metrics import LN10
from achilles.model.batching import input_device, run_batched
from achilles.model.loading import check_token_ids, context_length
from achilles.model.masking import masked
from achilles.model.units import Unit, UnitPool
from achilles.results.envelope import Enveloped

logger = logging.getLogger(__name__)

Protocol = Literal["standard", "paper"]

DEFAULT_MAX_LENGTH: dict[str, int] = {"standard": 1024, "paper": 512}
PAPER_MIN_CHARS = 50
"""The reference evaluator keeps documents whose stripped text is longer than this."""


@dataclass(frozen=True)
class PerplexityOptions:
    """Perplexity evaluation: windowing protocol and limits."""

    protocol: Protocol = opt(
        "standard",
        "standard: strided sliding window over the token stream; paper: the reference "
        "evaluator (each document > 50 chars is one sample, truncated, no stride)",
    )
    max_length: int | None = opt(
        None, "tokens per window (default: the model's context, at most 1024 standard, 512 paper)"
    )
    stride: int | None = opt(None, "window start every STRIDE tokens (default: --max-length)")
    batch_size: int = opt(4, "windows per forward pass")
    max_samples: int | None = opt(None, "use at most this many documents")
    max_tokens: int | None = opt(None, "use at most this many tokens")
    window_bos: bool = opt(
        True,
        "open every sliding window with the tokenizer's BOS (when it adds one), as in "
        "training; without it models whose first-token massive activations need BOS collapse",
    )

    def __post_init__(self) -> None:
        require(self.max_length is None or self.max_length >= 2, "--max-length must be >= 2")
        require(self.stride is None or self.stride >= 1, "--stride must be >= 1")
        require(
            self.stride is None or self.max_length is None or self.stride <= self.max_length,
            "--stride must be <= --max-length (a larger stride would skip tokens)",
        )
        require(self.stride is None or self.protocol == "standard",
                "--stride applies to --protocol standard only (paper: no stride)")
        require(self.batch_size >= 1, "--batch-size must be >= 1")
        require(self.max_samples is None or self.max_samples >= 1, "--max-samples must be >= 1")
        require(self.max_tokens is None or self.max_tokens >= 2, "--max-tokens must be >= 2")


@dataclass(frozen=True)
class PerplexityConfig(PerplexityOptions):
    """Perplexity evaluation: data, windowing protocol and limits."""

    data: str = opt(
        None, "evaluation text: a local .txt/.jsonl/.parquet file, or wikitext-103 or c4",
        required=True,
    )


@dataclass
class PerplexityResult(Enveloped):
    """Perplexity of one model (and mask) on one evaluation corpus (``kind: perplexity``)."""

    KIND = "perplexity"

    nll_sum: float
    tokens: int
    windows: int
    nonfinite_windows: int
    nll_sum_finite: float
    tokens_finite: int
    protocol: str
    max_length: int
    stride: int | None
    samples: int
    reference_nll_sum_T: float | None = None
    reference_tokens_T: int | None = None
    masked_units: int = 0

    @property
    def nll(self) -> float:
        """Mean NLL per predicted token (nats); non-finite if any window was."""
        return self.nll_sum / self.tokens

    @property
    def ppl(self) -> float:
        return exp_or_inf(self.nll)

    @property
    def log10_ppl(self) -> float:
        return self.nll / LN10

    @property
    def finite(self) -> bool:
        return math.isfinite(self.nll)

    @property
    def reference_nll_T_weighted(self) -> float | None:
        if self.reference_nll_sum_T is None or not self.reference_tokens_T:
            return None
        return self.reference_nll_sum_T / self.reference_tokens_T

    def summary(self) -> dict[str, Any]:
        """The metric keys (no config/env), as stored in result files."""
        d: dict[str, Any] = {
            "nll": self.nll,
            "ppl": self.ppl,
            "log10_ppl": self.log10_ppl,
            "tokens": self.tokens,
            "windows": self.windows,
            "nonfinite_windows": self.nonfinite_windows,
            "nll_finite_windows_only": (
                self.nll_sum_finite / self.tokens_finite if self.tokens_finite else None
            ),
            "samples": self.samples,
            "masked_units": self.masked_units,
        }
        ref = self.reference_nll_T_weighted
        if ref is not None:
            d["reference_nll_T_weighted"] = ref
            d["reference_ppl_T_weighted"] = exp_or_inf(ref)
        return d

    def fields(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "max_length": self.max_length, "stride": self.stride,
                **self.summary()}


def exp_or_inf(x: float) -> float:
    """``exp(x)``; ``inf`` on overflow, ``nan`` stays ``nan``."""
    if math.isnan(x):
        return math.nan
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


@dataclass(frozen=True)
class _Window:
    ids: torch.Tensor  # [T] long
    first_target: int  # index of the first scored token (>= 1)
    sample: int  # index of the sample (paper protocol) or -1

    @property
    def predicted(self) -> int:
        return int(self.ids.shape[0]) - self.first_target


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, verbose=False).input_ids)  # long streams are windowed later


class PerplexityEvaluator:
    """Tokenises the evaluation text once; :meth:`evaluate` measures it under any mask.

    One evaluator shared between masks makes their perplexities comparable: same tokens,
    same windows, same batching.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        texts: Sequence[str],
        options: PerplexityOptions | None = None,
        *,
        progress: bool = False,
        **overrides: Any,
    ) -> None:
        """``options`` (default :class:`PerplexityOptions`), with ``overrides`` replacing its
        fields (``max_length=64``, ...)."""
        o = dataclasses.replace(options or PerplexityOptions(), **overrides)
        protocol, max_length, stride, batch_size = o.protocol, o.max_length, o.stride, o.batch_size
        max_samples, max_tokens, window_bos = o.max_samples, o.max_tokens, o.window_bos
        require(protocol in DEFAULT_MAX_LENGTH, f"unknown protocol {protocol!r}: standard or paper")
        self.model = model
        self.protocol = protocol
        self.batch_size = batch_size
        self.progress = progress
        length = max_length or DEFAULT_MAX_LENGTH[protocol]
        cap = context_length(model)
        if cap is not None and length > cap:
            log = logger.info if max_length else logger.debug
            log("max_length %d capped at the model's %d positions", length, cap)
            length = cap
        self.max_length = length
        self.stride = None if protocol == "paper" else min(stride or length, length)
        if protocol == "paper":
            docs = [t.strip() for t in texts if len(t.strip()) > PAPER_MIN_CHARS]
            if not docs:
                raise AchillesError(
                    f"no document is longer than {PAPER_MIN_CHARS} characters: the paper "
                    "protocol needs paragraphs of text (or use --protocol standard)"
                )
            if max_samples is not None:
                docs = docs[:max_samples]
            self.windows = self._paper_windows(tokenizer, docs, max_tokens)
        else:
            docs = [t for t in texts if t.strip()]
            if max_samples is not None:
                docs = docs[:max_samples]
            ids = _token_ids(tokenizer, "\n\n".join(docs))
            if max_tokens is not None:
                ids = ids[:max_tokens]
            bos = leading_bos(tokenizer) if window_bos else None
            assert self.stride is not None  # set above for every protocol but "paper"
            self.windows = sliding_windows(
                torch.tensor(ids, dtype=torch.long), length, self.stride, bos=bos
            )
        self.samples = len(docs)
        if not self.windows:
            raise AchillesError("the evaluation text is too short: it gives no token to predict")
        ends = [int(f(w.ids)) for w in self.windows for f in (torch.min, torch.max)]
        check_token_ids(torch.tensor(ends), model)  # before any pass
        self.tokens = sum(w.predicted for w in self.windows)
        logger.info(
            "perplexity (%s): %d samples, %d windows, %d predicted tokens",
            protocol, self.samples, len(self.windows), self.tokens,
        )

    def _paper_windows(
        self, tokenizer: Any, docs: list[str], max_tokens: int | None
    ) -> list[_Window]:
        windows, total = [], 0
        for i, doc in enumerate(docs):
            ids = _token_ids(tokenizer, doc)[: self.max_length]
            if max_tokens is not None:
                ids = ids[: max_tokens - total]
            if len(ids) >= 2:
                windows.append(_Window(torch.tensor(ids, dtype=torch.long), 1, i))
                total += len(ids)
            if max_tokens is not None and total >= max_tokens:
                break
        return windows

    @torch.no_grad()
    def evaluate(
        self, pool: UnitPool | None = None, units: Sequence[Unit] = ()
    ) -> PerplexityResult:
        """Perplexity with ``units`` of ``pool`` zeroed (no mask when ``units`` is empty)."""
        if units and pool is None:
            raise ValueError("masking units needs their pool")
        ctx = masked(self.model, pool, units) if units else nullcontext()  # type: ignore[arg-type]
        sums = [0.0] * len(self.windows)
        order = sorted(range(len(self.windows)), key=lambda i: -self.windows[i].ids.shape[0])
        bar = tqdm(total=len(order), desc="perplexity", disable=not self.progress)

        def run(idx: Sequence[int]) -> None:
            for i, s in zip(idx, window_nll(self.model, [self.windows[i] for i in idx]),
                            strict=True):
                sums[i] = s

        with ctx, torch.no_grad():
            # halves the batch on out-of-memory and keeps the smaller size for later masks
            self.batch_size = run_batched(order, run, self.batch_size, on_progress=bar.update)
        bar.close()
        total = math.fsum(sums)
        finite = [(s, w) for s, w in zip(sums, self.windows, strict=True) if math.isfinite(s)]
        ref_sum = ref_tok = None
        if self.protocol == "paper":
            # reference: total += mean_loss * T (T includes BOS); ppl = exp(total / Σ T)
            ref_sum = math.fsum(s / w.predicted * w.ids.shape[0]
                                for s, w in zip(sums, self.windows, strict=True))
            ref_tok = sum(int(w.ids.shape[0]) for w in self.windows)
        return PerplexityResult(
            nll_sum=total,
            tokens=self.tokens,
            windows=len(self.windows),
            nonfinite_windows=len(self.windows) - len(finite),
            nll_sum_finite=math.fsum(s for s, _ in finite),
            tokens_finite=sum(w.predicted for _, w in finite),
            protocol=self.protocol,
            max_length=self.max_length,
            stride=self.stride,
            samples=self.samples,
            reference_nll_sum_T=ref_sum,
            reference_tokens_T=ref_tok,
            masked_units=len(units),
        )

    def settings(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "max_length": self.max_length,
            "stride": self.stride,
            "batch_size": self.batch_size,
            "samples": self.samples,
            "windows": len(self.windows),
            "tokens": self.tokens,
        }


def leading_bos(tokenizer: Any) -> int | None:
    """The BOS id if the tokenizer puts one in front of every text (Llama), else ``None``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = list(tokenizer("a").input_ids)
    return bos if ids and ids[0] == bos else None


def sliding_windows(
    ids: torch.Tensor, max_length: int, stride: int, *, bos: int | None = None
) -> list[_Window]:
    """Strided windows over the 1-D stream ``ids``; every token is scored at most once.

    As in the HF perplexity guide, a window scores only the tokens no earlier window
    scored, with the rest of the window as context. With ``bos``, every window after the
    first (which starts with the stream's own BOS) is opened by ``bos``, which is never
    scored; windows then hold ``max_length - 1`` stream tokens and advance by at most that.
    """
    n = int(ids.shape[0])
    windows: list[_Window] = []
    prev_end = 0
    begin = 0
    while begin < n:
        prefixed = bos is not None and begin > 0
        span = max_length - 1 if prefixed else max_length
        end = min(begin + span, n)
        toks = ids[begin:end]
        if prefixed:
            toks = torch.cat([torch.tensor([bos], dtype=ids.dtype), toks])
            first = max(prev_end - begin + 1, 1)  # window index k holds stream token begin+k-1
        else:
            first = max(prev_end - begin, 1)
        if toks.shape[0] >= 2 and first < toks.shape[0]:
            windows.append(_Window(toks, first, -1))
        prev_end = end
        if end == n:
            break
        begin += min(stride, span)
    return windows


def window_nll(model: torch.nn.Module, windows: Sequence[_Window]) -> list[float]:
    """Summed float32 NLL of each window's targets (right-padded into one batch)."""
    device = input_device(model)
    lengths = [int(w.ids.shape[0]) for w in windows]
    t = max(lengths)
    ids = torch.zeros(len(windows), t, dtype=torch.long)
    for r, w in enumerate(windows):
        ids[r, : lengths[r]] = w.ids
    kwargs: dict[str, Any] = {"input_ids": ids.to(device), "use_cache": False}
    if min(lengths) < t:
        attn = torch.arange(t).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
        kwargs["attention_mask"] = attn.long().to(device)
    logits = model(**kwargs).logits  # [B, T, V]
    out: list[float] = []
    for r, w in enumerate(windows):
        # position j predicts token j + 1; targets are tokens first_target .. len-1
        lg = logits[r, w.first_target - 1 : lengths[r] - 1].float()
        tgt = ids[r, w.first_target : lengths[r]].to(lg.device)
        out.append(float(F.cross_entropy(lg, tgt, reduction="sum")))
    return out


def evaluator_from_config(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    cfg: PerplexityConfig,
    *,
    progress: bool = False,
) -> PerplexityEvaluator:
    """A :class:`PerplexityEvaluator` with the options of ``cfg`` (a :class:`PerplexityOptions`)."""
    return PerplexityEvaluator(model, tokenizer, texts, cfg, progress=progress)


def evaluate_perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    pool: UnitPool | None = None,
    units: Sequence[Unit] = (),
    progress: bool = False,
    **options: Any,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``texts`` (see the module docstring for the protocols);
    ``options``: fields of :class:`PerplexityOptions` (``protocol``, ``max_length``, ...)."""
    ev = PerplexityEvaluator(model, tokenizer, texts, progress=progress, **options)
    return ev.evaluate(pool, units)

"""Next-token probabilities as critical units are masked one after another (paper Figure 1).

At each level ``n`` (0 = unmasked, then the first ``n`` units of the minimal or critical set
of an ``identification.json``) :func:`probe` reports the top-k next tokens after the prompt
with their probabilities (float32 softmax of the last position's logits), the probability
and rank of the target, and a greedy continuation generated under the same mask (masks
apply at every position, including the newly generated ones).

The target is scored by its **first token** (``tokenizer(target)`` without special tokens):
a multi-token target such as ``" Paris"`` in a small vocabulary is reported through its
first piece, and :attr:`ProbeResult.target_tokens` lists all pieces.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch

from achilles.errors import AchillesError, require
from achilles.method.identify import Identification
from achilles.model.batching import input_device
from achilles.model.loading import LoadedModel, tokenize
from achilles.model.masking import masked
from achilles.model.names import decode_text, decode_token
from achilles.model.units import Unit, UnitPool, build_pool
from achilles.results.envelope import Enveloped
from achilles.results.provenance import environment

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeConfig:
    """What to probe.

    Args:
        prompt: the raw prompt (no chat template); it may be short.
        target: the expected continuation; its first token is scored.
        set: which set of the identification to mask, ``minimal`` or ``critical``.
        top_k: next tokens shown per level.
        max_new_tokens: length of the greedy continuation per level (0: none).
        levels: the numbers of masked units to show (default: 0, 1, …, size of the set).
    """

    prompt: str
    target: str
    set: Literal["minimal", "critical"] = "minimal"
    top_k: int = 10
    max_new_tokens: int = 20
    levels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        require(bool(self.prompt), "--prompt is empty")
        require(bool(self.target), "--target is empty: give the expected answer, e.g. ' Paris'")
        require(self.set in ("minimal", "critical"), "--set must be 'minimal' or 'critical'")
        require(self.top_k >= 1, "--top-k must be >= 1")
        require(self.max_new_tokens >= 0, "--max-new-tokens must be >= 0")
        require(
            self.levels is None or (len(self.levels) > 0 and all(n >= 0 for n in self.levels)),
            "--levels must be a non-empty list of numbers >= 0",
        )

    def resolve_levels(self, n_units: int) -> list[int]:
        """The levels to run, checked against the size of the mask set."""
        if self.levels is None:
            return list(range(n_units + 1))
        too_big = [n for n in self.levels if n > n_units]
        if too_big:
            raise AchillesError(
                f"--levels {too_big[0]} exceeds the {self.set} set's {n_units} unit(s)"
            )
        return sorted(set(self.levels))


def mask_units(ident: Identification, which: str) -> list[Unit]:
    """The units of the chosen set, refusing an identification that found none."""
    units = ident.minimal_set if which == "minimal" else ident.critical_set
    if not units:
        raise AchillesError(
            f"the identification has an empty {which} set (no collapse was found): nothing to "
            "mask; rerun `achilles identify` with a larger --max-neurons or smaller --epsilon"
        )
    return list(units)


@dataclass
class TokenProb:
    """One next-token candidate."""

    token_id: int
    token: str
    prob: float


@dataclass
class ProbeLevel:
    """The next-token distribution and continuation with the first ``n_masked`` units masked."""

    n_masked: int
    masked_units: list[str]
    top: list[TokenProb]
    target_prob: float
    target_rank: int  # 1-based rank of the target's first token among all vocabulary entries
    continuation: str


@dataclass
class ProbeResult(Enveloped):
    """A probe over masking levels (saved as ``probe.json``)."""

    KIND = "probe"

    prompt: str
    target: str
    target_token_id: int
    target_token: str
    target_tokens: list[str]
    set: str
    levels: list[ProbeLevel]

    def fields(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "target": self.target,
            "target_token_id": self.target_token_id,
            "target_token": self.target_token,
            "target_tokens": self.target_tokens,
            "target_note": "the target is scored by its first token",
            "set": self.set,
            "levels": [dataclasses.asdict(lv) for lv in self.levels],
        }

    def summary(self) -> str:
        """The probe as text, one block per level."""
        note = ""
        if len(self.target_tokens) > 1:
            note = f" (first of {len(self.target_tokens)} tokens {self.target_tokens!r})"
        lines = [f"prompt: {self.prompt!r}", f"target: {self.target_token!r}{note}"]
        for lv in self.levels:
            what = ", ".join(lv.masked_units) if lv.masked_units else "nothing"
            lines.append(f"\n[{lv.n_masked} masked: {what}]")
            lines.append(
                f"  P(target) = {lv.target_prob:.6g}, rank #{lv.target_rank}"
            )
            for i, t in enumerate(lv.top, 1):
                mark = " <" if t.token_id == self.target_token_id else ""
                lines.append(f"  {i:>3}. {_quoted(t.token):<16} {t.prob:.4f}{mark}")
            if lv.continuation or lv.n_masked == 0:
                lines.append(f"  greedy: {_quoted(lv.continuation)}")
        return "\n".join(lines)


def _quoted(text: str) -> str:
    """``text`` in quotes with control characters escaped; the ``\\xNN`` that :func:`decode_text`
    writes for broken UTF-8 bytes stays one backslash (``repr`` would double it)."""
    return "'" + "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    ) + "'"


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return decode_text(tokenizer, ids)


@torch.no_grad()
def _level(
    lm: LoadedModel,
    input_ids: torch.Tensor,
    target_id: int,
    config: ProbeConfig,
) -> tuple[list[TokenProb], float, int, str]:
    model, tok = lm.model, lm.tokenizer
    logits = model(input_ids).logits[0, -1].float()
    probs = torch.softmax(logits, dim=-1)
    k = min(config.top_k, probs.numel())
    vals, idx = torch.topk(probs, k)
    top = [TokenProb(int(i), decode_token(tok, int(i)), float(v)) for v, i in zip(vals, idx, strict=True)]
    p_target = probs[target_id]
    rank = int((probs > p_target).sum()) + 1
    text = ""
    if config.max_new_tokens > 0:
        pad = getattr(tok, "pad_token_id", None)
        if pad is None:
            pad = getattr(tok, "eos_token_id", None)
        out = cast(Any, model).generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=config.max_new_tokens,
            pad_token_id=pad,
        )
        text = _decode(tok, out[0, input_ids.shape[1]:].tolist())
    return top, float(p_target), rank, text


def check_mask(
    model: torch.nn.Module, units: Sequence[Unit], source: str = "identification"
) -> tuple[UnitPool, list[Unit]]:
    """The pool holding ``units`` in ``model`` and the units validated against it.

    Works on a weightless (meta-device) model too, so a mask made for another model is
    refused before the weights are loaded.
    """
    kinds = sorted({u.component for u in units})
    pool = build_pool(model, components=kinds)
    return pool, pool.validate(units, source=source)


def probe(
    lm: LoadedModel,
    ident: Identification,
    config: ProbeConfig,
    *,
    source: str = "identification",
) -> ProbeResult:
    """Next-token distributions and greedy continuations at each masking level."""
    units = mask_units(ident, config.set)
    levels = config.resolve_levels(len(units))
    pool, units = check_mask(lm.model, units, source)
    device = input_device(lm.model)
    input_ids = tokenize(lm.tokenizer, config.prompt, min_tokens=1).to(device)
    target_ids = lm.tokenizer(config.target, add_special_tokens=False).input_ids  # type: ignore[operator]
    if not target_ids:
        raise AchillesError(f"--target {config.target!r} tokenizes to nothing")
    target_id = int(target_ids[0])
    pieces = [decode_token(lm.tokenizer, i) for i in target_ids]
    if len(target_ids) > 1:
        logger.warning(
            "target %r is %d tokens %r; scoring its first token %r",
            config.target, len(target_ids), pieces, pieces[0],
        )
    out: list[ProbeLevel] = []
    for n in levels:
        subset = units[:n]
        logger.info("probe: %d unit(s) masked", n)
        with masked(lm.model, pool, subset):
            top, p, rank, text = _level(lm, input_ids, target_id, config)
        out.append(ProbeLevel(n, [str(u) for u in subset], top, p, rank, text))
    return ProbeResult(
        prompt=config.prompt,
        target=config.target,
        target_token_id=target_id,
        target_token=pieces[0],
        target_tokens=pieces,
        set=config.set,
        levels=out,
        config={
            "model": dataclasses.asdict(lm.spec),
            "probe": dataclasses.asdict(config),
            "mask_source": source,
            "identification": ident.config,
        },
        env=environment(lm.model), run_id=ident.run_id,  # a probe of a run's set belongs to it
    )

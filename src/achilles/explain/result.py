"""``Mechanism``: the typed result of ``achilles explain``, saved as ``mechanism.json``."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from achilles.results.envelope import Envelope

MECHANISM_FILE = "mechanism.json"


@dataclass
class Mechanism(Envelope):
    """Why masking a set collapses the model, as measured (see ``docs/explain.md``).

    ``massive`` lists ``{layer, position, channel, value, ratio}`` (``layer`` -1 is the
    embeddings); ``sink_heads`` ``{layer, head, clean, masked, ...}`` largest drop first;
    ``patching`` ``{component, recovered}`` largest first (fractions of Δ); ``mediation``
    how many components it takes to recover 50 % and 90 % of Δ; ``drivers`` the input
    driving each ``mlp.down`` / ``attn.o`` unit; ``continuations`` greedy text, clean vs masked.
    """

    KIND = "mechanism"

    summary: str
    set_name: str
    units: list[dict[str, Any]]
    tokens: int
    sink_position: int
    delta: float
    nll_clean: float
    nll_masked: float
    massive: list[dict[str, Any]]
    massive_masked: list[dict[str, Any]]
    massive_groups: list[dict[str, Any]]
    residual_profile: dict[str, Any]
    writers: list[dict[str, Any]]
    sink_attention: dict[str, Any]
    sink_heads: list[dict[str, Any]]
    patching: list[dict[str, Any]]
    patching_cumulative: list[dict[str, Any]]
    patching_reverse: list[dict[str, Any]]
    patching_checks: dict[str, Any]
    output: dict[str, Any]
    cost: dict[str, Any]
    mediation: dict[str, Any] = field(default_factory=dict)
    drivers: list[dict[str, Any]] = field(default_factory=list)
    continuations: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None

    def fields(self) -> dict[str, Any]:
        own = asdict(self)
        for key in ("config", "env", "run_id"):
            own.pop(key)
        return own

    @classmethod
    def load(cls, path: str | Path) -> Mechanism:
        d = cls.read(path)
        return cls(**{f.name: _decode(d[f.name]) for f in fields(cls) if f.name in d})


TEXT_KEYS = ("text", "token", "tokens", "prompt", "clean_text", "masked_text")
"""Keys whose values are text, never decoded as numbers."""


def _decode(x: Any) -> Any:
    """``"nan"``/``"inf"`` strings back to floats, recursively."""
    if isinstance(x, str) and x in ("nan", "inf", "-inf"):
        return float(x)
    if isinstance(x, list):
        return [_decode(v) for v in x]
    if isinstance(x, dict):
        return {k: v if k in TEXT_KEYS else _decode(v) for k, v in x.items()}
    return x


def finite_first_key(value: float) -> tuple[int, float]:
    """Sort key, largest first, that lists non-finite values at the top (reported, not hidden)."""
    return (0, 0.0) if not math.isfinite(value) else (1, -value)

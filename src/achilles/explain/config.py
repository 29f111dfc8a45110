"""``ExplainConfig``: the options of ``achilles explain`` (CLI flags come from the fields)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from achilles.config import opt
from achilles.errors import require

MASSIVE_RATIO = 100.0
"""Default ratio |h| / median |h| of the layer above which an activation is flagged massive.

Sun et al. (2024) use |h| > 100 and > 1000x the median in real LLMs; small models have smaller
residual streams, so the default flag is relative only (100x) and the absolute floor is off."""


@dataclass(frozen=True)
class ExplainConfig:
    """Explain a critical set: massive activations, attention sinks, activation patching."""

    set: Literal["minimal", "critical"] = opt(
        "minimal", "which set of the run to mask: its minimal set or the critical prefix"
    )
    sink_position: int = opt(0, "token position of the attention sink (0: the first token)")
    massive_ratio: float = opt(
        MASSIVE_RATIO, "flag |h| at or above this many times the layer's median |h|"
    )
    massive_min: float = opt(0.0, "and at or above this absolute |h| (Sun et al.: 100)")
    top_channels: int = opt(3, "largest |h| channels kept per position and layer")
    sink_drop: float = opt(
        0.3, "a head loses its sink when its attention on the sink position drops by this much"
    )
    top_components: int = opt(10, "components restored together in the cumulative patching")
    erase_factor: float = opt(
        10.0, "a massive activation is erased when the set divides it by at least this much at "
        "its peak layer"
    )
    patch_scope: Literal["full", "after", "heads", "mlps"] = opt(
        "full", "components to patch: full (every head and MLP), after (the layers from the "
        "set's first on: exact, as earlier components are untouched by the mask), heads, mlps"
    )
    generate_tokens: int = opt(
        16, "greedy tokens generated per prompt, clean vs masked, to show what the collapsed "
        "model says (0: none)"
    )
    batch_size: int | None = opt(None, "rows per forward pass (default: from free memory)")

    def __post_init__(self) -> None:
        require(self.sink_position >= 0, "--sink-position must be >= 0")
        require(self.massive_ratio > 0, "--massive-ratio must be > 0")
        require(self.massive_min >= 0, "--massive-min must be >= 0")
        require(self.top_channels >= 1, "--top-channels must be >= 1")
        require(0 <= self.sink_drop <= 1, "--sink-drop must be between 0 and 1")
        require(self.top_components >= 0, "--top-components must be >= 0")
        require(self.erase_factor > 1, "--erase-factor must be > 1")
        require(self.patch_scope in ("full", "after", "heads", "mlps"),
                "--patch-scope must be one of full, after, heads, mlps")
        require(self.generate_tokens >= 0, "--generate-tokens must be >= 0")
        require(self.batch_size is None or self.batch_size >= 1, "--batch-size must be >= 1")

"""``achilles explain``: why masking a critical set collapses the model, measured causally.

Massive activations in the residual stream (Sun et al. 2024), the heads that use the sink
position and wake up when it is gone (Xiao et al. 2024; Guo et al. 2024), activation patching
of every head and MLP in both directions, and what the collapsed model predicts. The result
is a :class:`Mechanism` saved as ``mechanism.json``; see ``docs/explain.md``.
"""

from __future__ import annotations

from achilles.explain.config import ExplainConfig
from achilles.explain.result import MECHANISM_FILE, Mechanism
from achilles.explain.run import explain, explain_run, run_set

__all__ = ["MECHANISM_FILE", "ExplainConfig", "Mechanism", "explain", "explain_run", "run_set"]

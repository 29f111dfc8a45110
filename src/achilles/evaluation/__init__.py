"""Evaluation of (masked) models: perplexity on held-out text, and downstream benchmarks.

* :mod:`achilles.evaluation.data` loads evaluation text (local files or hub datasets);
* :mod:`achilles.evaluation.perplexity` measures perplexity (strided sliding window, or the
  reference evaluator's per-paragraph protocol);
* :mod:`achilles.evaluation.masks` turns ``identification.json``/``ranking.json`` into masks;
* :mod:`achilles.evaluation.downstream` runs lm-evaluation-harness tasks under masks.
"""

from achilles.evaluation.data import Corpus, load_corpus
from achilles.evaluation.perplexity import (
    PerplexityConfig,
    PerplexityEvaluator,
    PerplexityOptions,
    PerplexityResult,
    evaluate_perplexity,
)

__all__ = [
    "Corpus",
    "PerplexityConfig",
    "PerplexityEvaluator",
    "PerplexityOptions",
    "PerplexityResult",
    "evaluate_perplexity",
    "load_corpus",
]

"""achilles: find the critical neurons of transformer language models.

Implements "Perturbation-based Causal Identification of Critical Neurons" (Qin et al., 2025,
arXiv 2510.10238): stage 1 ranks units by their sensitivity to noise on the input
embeddings; stage 2 masks growing prefixes of the ranking until perplexity collapses.
"""

from __future__ import annotations

__version__ = "0.1.0"

# Names are imported on first use (PEP 562), so ``achilles --model typo`` can refuse a bad
# path before torch is imported; ``from achilles import X`` works as usual.
_EXPORTS = {
    "achilles.adapters": ("ArchAdapter", "get_adapter", "register_adapter", "supported_model_types"),
    "achilles.config": ("IdentifyConfig", "ModelSpec", "RankConfig", "TextSpec"),
    "achilles.errors": ("AchillesError",),
    "achilles.identify": ("Identification", "MaskEvaluator", "identify"),
    "achilles.loading": ("LoadedModel", "load_model", "tokenize"),
    "achilles.masking": ("ChannelMasker", "masked", "zero_weights_"),
    "achilles.pipeline": ("find", "identify_with", "rank"),
    "achilles.ranking": ("Ranking", "Scores"),
    "achilles.units": ("Unit", "UnitPool", "build_pool"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> object:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'achilles' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


__all__ = [
    "AchillesError",
    "ArchAdapter",
    "ChannelMasker",
    "Identification",
    "IdentifyConfig",
    "LoadedModel",
    "MaskEvaluator",
    "ModelSpec",
    "RankConfig",
    "Ranking",
    "Scores",
    "TextSpec",
    "Unit",
    "UnitPool",
    "build_pool",
    "find",
    "get_adapter",
    "identify",
    "identify_with",
    "load_model",
    "masked",
    "rank",
    "register_adapter",
    "supported_model_types",
    "tokenize",
    "zero_weights_",
]

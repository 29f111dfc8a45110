"""achilles: find the critical neurons of transformer language models.

Implements "Perturbation-based Causal Identification of Critical Neurons" (Qin et al., 2025,
arXiv 2510.10238): stage 1 ranks units by their sensitivity to noise on the input
embeddings; stage 2 masks growing prefixes of the ranking until perplexity collapses.
"""

from __future__ import annotations

from achilles.config import IdentifyConfig, ModelSpec, RankConfig, TextSpec
from achilles.errors import AchillesError
from achilles.method.identify import Identification, MaskEvaluator, identify
from achilles.method.pipeline import find, identify_with, rank
from achilles.method.prepared import PreparedRun, prepare
from achilles.method.ranking import Ranking, Scores
from achilles.model.adapters import ArchAdapter, register_adapter, supported_model_types
from achilles.model.derive import get_adapter
from achilles.model.loading import LoadedModel, load_model, tokenize
from achilles.model.masking import ChannelMasker, masked, zero_weights_
from achilles.model.units import Unit, UnitPool, build_pool
from achilles.version import __version__

__all__ = [
    "__version__",
    "AchillesError",
    "ArchAdapter",
    "ChannelMasker",
    "Identification",
    "IdentifyConfig",
    "LoadedModel",
    "MaskEvaluator",
    "ModelSpec",
    "PreparedRun",
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
    "prepare",
    "rank",
    "register_adapter",
    "supported_model_types",
    "tokenize",
    "zero_weights_",
]

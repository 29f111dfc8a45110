"""Analyses of a run: where the critical units live, the phase transition of the masking
curve, the weights behind the units, and the controls (mean-ablation, random sets, fp32).

Pure computation; the figures are in :mod:`achilles.plots`, the report in
:mod:`achilles.report`.
"""

from __future__ import annotations

from achilles.analysis.controls import (
    MeanAblation,
    RandomSets,
    fp32_delta,
    mean_ablation,
    random_like,
    random_sets,
    recheck_fp32,
)
from achilles.analysis.locations import (
    LayerDistribution,
    layer_distribution,
    locations,
    outer_layers,
)
from achilles.analysis.phase import PhaseTransition, phase_transition
from achilles.analysis.run import ANALYSIS_FILE, analyze_run, load_run
from achilles.analysis.weights import MASSIVE_RATIO, UnitWeights, unit_weights
from achilles.method.recheck import Fp32Check

__all__ = [
    "ANALYSIS_FILE",
    "MASSIVE_RATIO",
    "Fp32Check",
    "LayerDistribution",
    "MeanAblation",
    "PhaseTransition",
    "RandomSets",
    "UnitWeights",
    "analyze_run",
    "fp32_delta",
    "layer_distribution",
    "load_run",
    "locations",
    "mean_ablation",
    "outer_layers",
    "phase_transition",
    "random_like",
    "random_sets",
    "recheck_fp32",
    "unit_weights",
]

"""Compression that spares the critical units, and the quantizer keep-list.

* :mod:`~achilles.weights.compress.ownership`: which weights belong to a unit, per component kind.
* :mod:`~achilles.weights.compress.methods`: ``rtn-wB[-gG]``, ``magnitude-S``, ``wanda-S`` behind one
  interface (``Method.apply``), with protected weights kept bit-identical.
* :mod:`~achilles.weights.compress.run`: the experiment (original, whole, critical protected,
  random protected) and its typed result (``compression.json``).
* :mod:`~achilles.weights.compress.keeplist`: the keep-list JSON for quantizers.
"""

from achilles.weights.compress.keeplist import keep_list
from achilles.weights.compress.methods import DEFAULT_METHODS, Method, parse_method, parse_methods
from achilles.weights.compress.ownership import WeightSlice, unit_slices, weights_of
from achilles.weights.compress.run import CompressionResult, compress_experiment

__all__ = [
    "DEFAULT_METHODS",
    "CompressionResult",
    "Method",
    "WeightSlice",
    "compress_experiment",
    "keep_list",
    "parse_method",
    "parse_methods",
    "unit_slices",
    "weights_of",
]

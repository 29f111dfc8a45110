"""Experiments built on the core: several rankings or runs at once.

``compare`` (methods side by side, Figure 3), ``sweep`` (α × K, Figure 4), ``robustness``
(critical sets across texts), ``overlap`` (across finished runs) and ``probe`` (next-token
probabilities under masks, Figure 1).
"""

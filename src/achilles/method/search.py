"""Stage 2 search strategies as pure functions (no torch, no model).

Every function takes an *objective* that maps candidates to Δ values and returns a typed trace
of what it evaluated. Objectives are batched (a list of candidates in, a list of Δ out) so the
caller can evaluate many masks in one forward pass. Non-finite Δ must already be mapped to
``+inf`` by the caller: collapse, which satisfies any threshold.

* :func:`linear_search`: the reference behaviour, the first prefix size ``n`` (a multiple of
  ``step``) with ``Δ(n) ≥ ε``; optionally keeps tracing the curve past it.
* :func:`bisect_search`: galloping (n = step·1, 2, 4, …) then binary search; O(log n)
  evaluations, equal to the linear answer when Δ is monotone in ``n``; the answer is confirmed
  by a final evaluation.
* :func:`minimize_set`: drop members (last first, repeated until a full pass removes nothing)
  while Δ stays ≥ ε; the result is irreducible: removing any one member brings Δ below ε.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

U = TypeVar("U")

PrefixObjective = Callable[[Sequence[int]], Sequence[float]]
SetObjective = Callable[[Sequence[Sequence[U]]], Sequence[float]]


@dataclass
class SearchTrace:
    """What a prefix search evaluated and found.

    Attributes:
        n_star: the first prefix size found with Δ ≥ ε, or ``None``.
        points: every evaluated ``(n, Δ)`` in evaluation order (duplicates possible).
        evaluations: how many prefixes were evaluated (forward-pass rows).
    """

    n_star: int | None
    points: list[tuple[int, float]] = field(default_factory=list)
    evaluations: int = 0

    def curve(self) -> list[tuple[int, float]]:
        """Evaluated points sorted by ``n``, the last evaluation of each ``n`` kept."""
        return sorted(dict(self.points).items())


def first_crossing(curve: Sequence[tuple[int, float]], epsilon: float) -> int | None:
    """The smallest ``n`` of a sorted curve with ``Δ ≥ ε``."""
    return next((n for n, d in curve if d >= epsilon), None)


def linear_search(
    objective: PrefixObjective,
    *,
    epsilon: float,
    n_max: int,
    step: int = 1,
    batch: int = 1,
    continue_until: float | None = None,
) -> SearchTrace:
    """First ``n ∈ {step, 2·step, …} ≤ n_max`` with ``Δ(n) ≥ ε``.

    Prefix sizes are evaluated ``batch`` at a time. With ``continue_until`` the curve is traced
    further, until some ``Δ ≥ max(ε, continue_until)`` or ``n_max``.
    """
    ns = list(range(step, n_max + 1, step))
    goal = epsilon if continue_until is None else max(epsilon, continue_until)
    trace = SearchTrace(n_star=None)
    for i in range(0, len(ns), batch):
        chunk = ns[i : i + batch]
        deltas = list(objective(chunk))
        trace.points += list(zip(chunk, deltas, strict=True))
        trace.evaluations += len(chunk)
        if trace.n_star is None:
            trace.n_star = first_crossing(list(zip(chunk, deltas, strict=True)), epsilon)
        if trace.n_star is not None and any(d >= goal for d in deltas):
            break
    return trace


def bisect_search(
    objective: PrefixObjective, *, epsilon: float, n_max: int, step: int = 1
) -> SearchTrace:
    """Galloping then binary search for a prefix size with ``Δ ≥ ε`` whose predecessor is below.

    On a monotone curve this is the linear answer in O(log(n*)) evaluations; on a
    non-monotone one it is *a* crossing, not necessarily the first.
    """
    k_max = n_max // step
    trace = SearchTrace(n_star=None)
    cache: dict[int, float] = {}

    def f(k: int) -> float:
        if k not in cache:
            (d,) = objective([k * step])
            cache[k] = d
            trace.points.append((k * step, d))
            trace.evaluations += 1
        return cache[k]

    if k_max < 1:
        return trace
    lo, hi, k = 0, None, 1
    while True:  # gallop: 1, 2, 4, ... (capped at k_max)
        if f(k) >= epsilon:
            hi = k
            break
        lo = k
        if k == k_max:
            return trace
        k = min(2 * k, k_max)
    while hi - lo > 1:  # invariant: Δ(lo) < ε ≤ Δ(hi)  (lo = 0 is the empty mask)
        mid = (lo + hi) // 2
        if f(mid) >= epsilon:
            hi = mid
        else:
            lo = mid
    # confirm with a fresh evaluation of the answer
    (d,) = objective([hi * step])
    trace.points.append((hi * step, d))
    trace.evaluations += 1
    trace.n_star = hi * step if d >= epsilon else None
    return trace


@dataclass
class MinimizeTrace:
    """Result of :func:`minimize_set`.

    Attributes:
        members: the irreducible set, in original order.
        delta: Δ of that set.
        necessity: Δ of the set without each member (same order as ``members``); each is < ε.
        evaluations: how many sets were evaluated.
    """

    members: list
    delta: float
    necessity: list[float]
    evaluations: int


def minimize_set(
    objective: SetObjective,
    members: Sequence[U],
    *,
    epsilon: float,
    delta: float | None = None,
    batch: int = 1,
    on_pass: Callable[[str, int], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> MinimizeTrace:
    """Drop members of a collapse set (last first) while Δ stays ≥ ε, until none can go.

    The result is that of the plain sequential loop (try removing each member, last first,
    keep the removal when Δ stays ≥ ε, repeat passes until one removes nothing) for any
    ``batch``: the next ``batch`` removals are evaluated against the current set in one call;
    rejections before the first acceptance stand, and the candidates after it are evaluated
    again against the smaller set. Larger batches trade wasted rows for fewer calls.

    Args:
        objective: maps a list of candidate sets to their Δ values.
        members: a set with Δ ≥ ε (e.g. the prefix found by the search), in rank order.
        epsilon: the threshold.
        delta: Δ of ``members`` if already known.
        batch: candidate removals per objective call.
        on_pass: called with a label and the number of candidates at the start of each pass
            (and of the final necessity pass), e.g. to reset a progress bar.
        on_step: called with the number of candidates settled by each objective call.
    """
    current = list(members)
    passes = 0
    evaluations = 0
    if delta is None:
        (delta,) = objective([current])
        evaluations += 1
    if delta < epsilon:
        raise ValueError(f"the starting set has Δ={delta} < ε={epsilon}")
    changed = True
    while changed and len(current) > 1:
        changed = False
        queue = list(reversed(current))  # this pass's candidates, last first
        passes += 1
        if on_pass:
            on_pass(f"pass {passes}", len(queue))
        while queue and len(current) > 1:
            chunk = queue[:batch]
            candidates = [[x for x in current if x != u] for u in chunk]
            deltas = list(objective(candidates))
            evaluations += len(chunk)
            hit = next((i for i, d in enumerate(deltas) if d >= epsilon), None)
            settled = len(chunk) if hit is None else hit + 1
            if on_step:
                on_step(settled)
            if hit is None:
                queue = queue[len(chunk) :]
            else:
                current, delta, changed = candidates[hit], deltas[hit], True
                queue = queue[hit + 1 :]
        if on_step and queue:
            on_step(len(queue))  # the pass ends with one member left: the rest is not tried
    if on_pass:
        on_pass("necessity", len(current))
    necessity = list(objective([[x for x in current if x != u] for u in current]))
    evaluations += len(current)
    if on_step:
        on_step(len(current))
    return MinimizeTrace(current, float(delta), [float(x) for x in necessity], evaluations)

"""Pure stage-2 searches on synthetic objectives."""

from __future__ import annotations

import math
import random

import pytest

from achilles.method.search import bisect_search, first_crossing, linear_search, minimize_set


def _prefix(curve):  # noqa: ANN001, ANN202
    calls = []

    def f(ns):  # noqa: ANN001, ANN202
        calls.append(list(ns))
        return [curve(n) for n in ns]

    return f, calls


@pytest.mark.parametrize("seed", range(25))
def test_bisect_equals_linear_on_monotone_curves(seed: int) -> None:
    rng = random.Random(seed)
    n_max = rng.randint(1, 400)
    jumps = sorted(rng.random() for _ in range(n_max))
    curve = lambda n: jumps[n - 1] * 3.0 if n >= 1 else 0.0  # noqa: E731 - monotone in n
    step = rng.choice([1, 1, 2, 5])
    eps = rng.uniform(0.1, 3.2)
    lin = linear_search(_prefix(curve)[0], epsilon=eps, n_max=n_max, step=step, batch=rng.randint(1, 9))
    bis = bisect_search(_prefix(curve)[0], epsilon=eps, n_max=n_max, step=step)
    assert lin.n_star == bis.n_star
    if lin.n_star is not None:
        assert lin.n_star % step == 0 and curve(lin.n_star) >= eps
        assert lin.n_star == step or curve(lin.n_star - step) < eps


def test_bisect_uses_logarithmically_many_evaluations() -> None:
    f, calls = _prefix(lambda n: 5.0 if n >= 700 else 0.0)
    t = bisect_search(f, epsilon=1.0, n_max=1000)
    assert t.n_star == 700
    assert t.evaluations <= 2 * math.ceil(math.log2(1000)) + 2
    assert calls[-1] == [700]  # the final confirmation


def test_linear_is_first_crossing_on_non_monotone_curve() -> None:
    values = {1: 0.0, 2: 0.2, 3: 4.3, 4: 4.3, 5: 1.4, 6: 1.5, 7: 0.1}
    t = linear_search(_prefix(values.get)[0], epsilon=1.0, n_max=7, batch=2, continue_until=None)
    assert t.n_star == 3
    assert t.curve() == [(1, 0.0), (2, 0.2), (3, 4.3), (4, 4.3)]


def test_linear_continues_until_goal_and_stops_at_n_max() -> None:
    curve = lambda n: n / 10  # noqa: E731
    t = linear_search(_prefix(curve)[0], epsilon=1.0, n_max=100, continue_until=4.0)
    assert t.n_star == 10 and t.curve()[-1] == (40, 4.0)
    t = linear_search(_prefix(lambda n: 0.0)[0], epsilon=1.0, n_max=30)
    assert t.n_star is None and len(t.curve()) == 30


def test_non_finite_counts_as_collapse() -> None:
    curve = lambda n: math.inf if n == 4 else 0.0  # noqa: E731
    assert linear_search(_prefix(curve)[0], epsilon=2.0, n_max=10).n_star == 4
    assert first_crossing([(1, 0.0), (2, math.inf)], 1.0) == 2


def _threshold_set_objective(critical: set[str], need: int, spoilers: set[str] = frozenset()):  # noqa: ANN202
    """Δ = 3 when at least ``need`` critical members are present and no spoiler, else 0."""
    evals = []

    def f(sets):  # noqa: ANN001, ANN202
        evals.extend(sets)
        return [3.0 if len(critical & set(s)) >= need and not (spoilers & set(s)) else 0.0 for s in sets]

    return f, evals


def test_minimize_returns_an_irreducible_set() -> None:
    members = list("abcdefgh")
    f, _ = _threshold_set_objective({"b", "e", "g"}, need=3)
    t = minimize_set(f, members, epsilon=1.0, delta=3.0)
    assert t.members == ["b", "e", "g"]
    assert t.delta == 3.0 and all(d < 1.0 for d in t.necessity)


def test_minimize_drops_last_first_and_repeats_until_stable() -> None:
    # any 2 of {a, b, c}: last-first removal keeps the two earliest
    f, _ = _threshold_set_objective({"a", "b", "c"}, need=2)
    t = minimize_set(f, ["a", "x", "b", "c", "y"], epsilon=1.0)
    assert t.members == ["a", "b"]
    for i in range(len(t.members)):
        rest = t.members[:i] + t.members[i + 1 :]
        assert f([rest])[0] < 1.0


def test_minimize_refuses_a_non_collapse_set() -> None:
    f, _ = _threshold_set_objective({"a"}, need=1)
    with pytest.raises(ValueError):
        minimize_set(f, ["b"], epsilon=1.0)


@pytest.mark.parametrize("seed", range(20))
def test_batched_minimize_equals_sequential_on_arbitrary_set_functions(seed: int) -> None:
    """Non-monotone Δ: a fixed pseudo-random value per subset."""
    rng = random.Random(seed)
    members = [f"u{i}" for i in range(rng.randint(2, 14))]
    table: dict[frozenset, float] = {}

    def f(sets):  # noqa: ANN001, ANN202
        out = []
        for s in sets:
            key = frozenset(s)
            if key not in table:
                # the full set collapses, nothing masked is Δ = 0, the rest is arbitrary
                table[key] = 5.0 if len(key) == len(members) else rng.uniform(0, 2) if key else 0.0
            out.append(table[key])
        return out

    sequential = minimize_set(f, members, epsilon=1.0, batch=1)
    for batch in (2, 3, 8, 64):
        batched = minimize_set(f, members, epsilon=1.0, batch=batch)
        assert batched.members == sequential.members
        assert batched.delta == sequential.delta
        assert batched.necessity == sequential.necessity
    assert all(d < 1.0 for d in sequential.necessity)

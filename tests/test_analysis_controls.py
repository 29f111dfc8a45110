"""The random-set control draws what its label says (pure: a hand-built unit pool)."""

from __future__ import annotations

import random

from achilles.analysis.controls import describe_random_sets, random_like
from achilles.analysis.run import dense_modules
from achilles.model.units import Site, Unit, UnitPool

POOL = UnitPool(
    "llama",
    (
        Site("model.layers.0.mlp.down_proj", 0, "mlp.down", 12),
        Site("model.layers.0.self_attn.o_proj", 0, "attn.o", 8),
        Site("model.layers.1.mlp.down_proj", 1, "mlp.down", 12),
    ),
    ("mlp.down", "attn.o"),
)
DOWN0 = "model.layers.0.mlp.down_proj"


def units(module: str, channels: range | list[int]) -> list[Unit]:
    s = next(s for s in POOL.sites if s.module == module)
    return [Unit(module, c, s.layer, s.component) for c in channels]


def test_small_set_draws_from_its_own_module_and_seeds_differ() -> None:
    crit = units(DOWN0, [0, 1])
    draws = [random_like(crit, POOL, random.Random(seed)) for seed in range(10)]
    for r in draws:
        assert len(r) == 2 and {u.module for u in r} == {DOWN0}
        assert not {u.key for u in r} & {u.key for u in crit}
    assert len({frozenset(u.key for u in r) for r in draws}) > 1
    assert describe_random_sets(crit, draws) == "same-module"


def test_set_covering_most_of_its_module_is_filled_from_the_same_kind_and_labelled() -> None:
    crit = units(DOWN0, range(8))  # 8 of 12 channels: 4 others, of which at most 2 drawn
    draws = [random_like(crit, POOL, random.Random(seed)) for seed in range(10)]
    for r in draws:
        keys = [u.key for u in r]
        assert len(r) == 8 and len(set(keys)) == 8
        assert not set(keys) & {u.key for u in crit}
        mods = [u.module for u in r]
        assert mods.count(DOWN0) == 2
        # the fill comes from the other mlp.down module (no other mlp.down in layer 0)
        assert mods.count("model.layers.1.mlp.down_proj") == 6
    assert len({frozenset(u.key for u in r) for r in draws}) == 10  # really random per seed
    label = describe_random_sets(crit, draws)
    assert label.startswith("2 same-module + 6 from other modules")
    assert "model.layers.1.mlp.down_proj" in label
    assert dense_modules(crit, POOL) == [
        {"module": DOWN0, "count": 8, "width": 12, "share": 8 / 12}
    ]
    assert dense_modules(crit[:6], POOL) == []


def test_fill_falls_back_to_other_kinds_when_the_kind_is_exhausted() -> None:
    crit = units(DOWN0, range(12)) + units("model.layers.1.mlp.down_proj", range(12))
    r = random_like(crit, POOL, random.Random(0))
    assert len(r) == 8  # only attn.o has free channels: all 8 of them, then nothing is left
    assert {u.module for u in r} == {"model.layers.0.self_attn.o_proj"}
    assert describe_random_sets(crit, [r]).endswith("only 8 of 24 units were free")

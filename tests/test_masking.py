"""Masking: hook masking equals weight zeroing; per-row masks; hooks always removed."""

from __future__ import annotations

import pytest
import torch
from tiny import ARCHS, make_model

from achilles import ChannelMasker, Unit, build_pool, masked, zero_weights_
from achilles.model.masking import restore_weights_

IDS = torch.tensor([[0, 5, 17, 42, 99, 3, 250, 7, 64, 11, 12, 200]])


def _logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(
    ("arch", "module", "channels"),
    [
        ("llama", "model.layers.0.mlp.down_proj", [3, 17]),
        ("llama", "model.layers.1.self_attn.o_proj", [0]),
        ("llama", "model.layers.0.mlp.gate_proj", [5, 40]),
        ("qwen2", "model.layers.0.self_attn.q_proj", [2]),  # Linear with bias
        ("gpt2", "transformer.h.0.mlp.c_proj", [4, 9]),  # Conv1D, weight [in, out]
        ("gpt2", "transformer.h.1.attn.c_attn", [30]),
        ("gpt_neox", "gpt_neox.layers.0.mlp.dense_4h_to_h", [1]),
        # mlp.neuron: an input channel; the oracle zeroes the weight column reading it
        ("llama", "model.layers.1.mlp.down_proj:input", [0, 33]),
        ("gpt2", "transformer.h.0.mlp.c_proj:input", [12]),
    ],
)
def test_hook_mask_equals_zeroing_weight_row_and_bias(arch: str, module: str, channels: list[int]) -> None:
    model = make_model(arch)
    pool = build_pool(model, "all")
    units = [Unit(module, c) for c in channels]
    with masked(model, pool, units):
        hooked_logits = _logits(model)
    saved = zero_weights_(model, units)
    weight_logits = _logits(model)
    restore_weights_(model, saved)
    assert not torch.equal(hooked_logits, _logits(model)), "the mask must change something"
    torch.testing.assert_close(hooked_logits, weight_logits, rtol=1e-5, atol=1e-6)


def test_masked_channel_is_zero_at_every_position_and_row() -> None:
    model = make_model("llama")
    pool = build_pool(model, "paper")
    name = "model.layers.0.mlp.act_fn"
    seen = {}
    # observe downstream: down_proj's input is act(gate) * up, so channel 7 must be 0 there
    handle = model.get_submodule("model.layers.0.mlp.down_proj").register_forward_pre_hook(
        lambda m, i: seen.__setitem__("o", i[0])
    )
    try:
        with masked(model, pool, [Unit(name, 7)]), torch.no_grad():
            model(IDS.repeat(3, 1))
    finally:
        handle.remove()
    out = seen["o"]
    assert out.shape[0] == 3
    assert torch.all(out[:, :, 7] == 0)
    assert torch.all(out[:, :, 6] != 0)


def test_per_row_masks_equal_separate_forwards() -> None:
    model = make_model("llama")
    pool = build_pool(model, "paper")
    masks = [
        [],
        [Unit("model.layers.0.mlp.down_proj", 1)],
        [Unit("model.layers.1.self_attn.q_proj", 3), Unit("model.layers.0.mlp.up_proj", 8)],
    ]
    masker = ChannelMasker(model, pool, rows=3)
    masker.set_rows(masks)
    with masker.installed():
        batched = _logits(model, IDS.repeat(3, 1))
    for r, units in enumerate(masks):
        with masked(model, pool, units):
            single = _logits(model)
        torch.testing.assert_close(batched[r : r + 1], single, rtol=1e-5, atol=1e-5)


def test_inf_channel_is_zeroed_not_nan() -> None:
    model = make_model("llama")
    pool = build_pool(model, "paper")
    name = "model.layers.0.mlp.down_proj"
    with torch.no_grad():
        model.get_submodule(name).weight[5] = float("inf")
    with masked(model, pool, [Unit(name, 5)]):
        logits = _logits(model)
    assert torch.isfinite(logits).all()


def test_hooks_removed_even_when_forward_raises() -> None:
    model = make_model("llama")
    pool = build_pool(model, "paper")
    before = _logits(model)
    with pytest.raises(IndexError), masked(model, pool, [Unit("model.layers.0.mlp.down_proj", 0)]):
        model(torch.tensor([[10_000]]))  # index out of range inside the forward
    assert all(not m._forward_hooks for m in model.modules())
    assert torch.equal(before, _logits(model))


@pytest.mark.parametrize("arch", ARCHS)
def test_masking_every_site_kind_runs(arch: str) -> None:
    model = make_model(arch)
    pool = build_pool(model, "all")
    units = [Unit(s.module, 0) for s in pool.sites]
    with masked(model, pool, units):
        logits = _logits(model)
    assert logits.shape[:2] == IDS.shape


def test_vectorised_prefix_masks_equal_explicit_unit_lists() -> None:
    from achilles.model.masking import PrefixIndex

    model = make_model("llama")
    pool = build_pool(model, "paper")
    ranking = pool.units(torch.randperm(pool.n_units, generator=torch.Generator().manual_seed(1))[:50].tolist())
    sizes = [0, 1, 7, 23, 50]
    explicit = ChannelMasker(model, pool, rows=len(sizes))
    explicit.set_rows([ranking[:n] for n in sizes])
    fast = ChannelMasker(model, pool, rows=len(sizes))
    fast.set_prefixes(PrefixIndex.build(pool, ranking), sizes)
    assert explicit._masks.keys() == fast._masks.keys()
    for m in explicit._masks:
        assert torch.equal(explicit._masks[m], fast._masks[m])

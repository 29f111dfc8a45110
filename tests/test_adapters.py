"""Architecture adapters: every component resolves, widths match real outputs."""

from __future__ import annotations

import pytest
import torch
from tiny import ARCHS, FF, HEADS, KV, LAYERS, D, llama_param_count, make_model

from achilles import AchillesError, ArchAdapter, build_pool, get_adapter, register_adapter
from achilles.model.adapters import COMPONENT_KINDS
from achilles.model.hooks import hooked, split_site


def test_tiny_llama_parameter_count() -> None:
    model = make_model("llama")
    assert sum(p.numel() for p in model.parameters()) == llama_param_count()


@pytest.mark.parametrize("arch", ARCHS)
def test_every_component_resolves_with_true_width(arch: str) -> None:
    model = make_model(arch)
    pool = build_pool(model, "all")
    assert len(pool.sites) == LAYERS * len(get_adapter(model).components)
    seen: dict[str, tuple[int, ...]] = {}

    def grab(name):  # noqa: ANN001, ANN202
        return lambda out: seen.__setitem__(name, tuple(out.shape))

    ids = torch.arange(2, 14).unsqueeze(0)
    with hooked(model, {s.module: grab(s.module) for s in pool.sites}):
        model(ids)
    for s in pool.sites:
        assert seen[s.module] == (1, 12, s.width), s
        assert split_site(s.module)[0] in dict(model.named_modules())
    assert pool.n_units == sum(s.width for s in pool.sites)


def test_paper_pool_llama_matches_reference_hooks() -> None:
    pool = build_pool(make_model("llama"), "paper")
    kinds = {s.component for s in pool.sites}
    assert kinds == {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.act",
                     "mlp.down", "norm.mlp"}
    per_layer = D + 2 * KV * (D // HEADS) + D + 3 * FF + D + D
    assert pool.n_units == LAYERS * per_layer
    # input_layernorm is not hooked by the reference; post_attention_layernorm is
    assert not any(s.module.endswith("input_layernorm") for s in pool.sites)
    assert any(s.module.endswith("post_attention_layernorm") for s in pool.sites)


def test_paper_pool_phi3_has_no_duplicate_dropout() -> None:
    pool = build_pool(make_model("phi3"), "paper")
    assert not any("dropout" in s.module for s in pool.sites)
    assert {s.component for s in pool.sites} >= {"attn.qkv", "mlp.gate_up", "mlp.down"}


def test_presets_and_explicit_components() -> None:
    model = make_model("llama")
    assert {s.component for s in build_pool(model, "down").sites} == {"mlp.down"}
    assert {s.component for s in build_pool(model, "mlp").sites} == {
        "mlp.gate", "mlp.up", "mlp.act", "mlp.down"}
    pool = build_pool(model, components=["mlp.down", "attn.o"])
    assert [s.component for s in pool.sites[:2]] == ["mlp.down", "attn.o"]


def test_unknown_or_missing_component_is_a_clear_error() -> None:
    model = make_model("llama")
    with pytest.raises(AchillesError, match="unknown component 'mlp.foo'"):
        build_pool(model, components=["mlp.foo"])
    with pytest.raises(AchillesError, match="does not exist in this architecture"):
        build_pool(model, components=["attn.qkv"])
    with pytest.raises(AchillesError, match="unknown pool"):
        build_pool(model, "everything")


def test_unknown_architecture_lists_modules_and_how_to_register(monkeypatch: pytest.MonkeyPatch) -> None:
    from achilles.model import adapters

    monkeypatch.setattr(adapters, "_ADAPTERS", dict(adapters._ADAPTERS))  # registered for this test only
    model = make_model("llama")
    model.config.model_type = "mystery"
    for layer in model.model.layers:  # without it, the tree fits no known layout
        del layer.input_layernorm
    with pytest.raises(AchillesError) as e:
        build_pool(model)
    msg = str(e.value)
    assert "unsupported architecture 'mystery'" in msg
    assert "model.layers holds self_attn.q_proj" in msg
    assert "register_adapter" in msg and "\n" not in msg
    register_adapter("mystery", ArchAdapter(
        layers="model.layers", components={"mlp.down": "mlp.down_proj"}, paper=("mlp.down",)))
    assert build_pool(model).n_units == LAYERS * D


def test_adapter_table_uses_known_kinds_only() -> None:
    with pytest.raises(ValueError):
        ArchAdapter(layers="x", components={"mlp.nope": "y"}, paper=())
    assert "mlp.down" in COMPONENT_KINDS


def test_mlp_neuron_is_act_gate_times_up() -> None:
    """The down_proj input site equals act(gate(h)) * up(h), computed from the MLP's input h."""
    model = make_model("llama")
    pool = build_pool(model, components=["mlp.neuron", "norm.mlp"])
    seen: dict[str, torch.Tensor] = {}
    ids = torch.arange(2, 14).unsqueeze(0)
    with hooked(model, {s.module: (lambda n: lambda t: seen.__setitem__(n, t.detach()))(s.module)
                        for s in pool.sites}), torch.no_grad():
        model(ids)
    for layer in range(LAYERS):
        mlp = model.get_submodule(f"model.layers.{layer}.mlp")
        h = seen[f"model.layers.{layer}.post_attention_layernorm"]
        want = mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h)
        torch.testing.assert_close(seen[f"model.layers.{layer}.mlp.down_proj:input"], want)
    assert {s.width for s in pool.sites if s.component == "mlp.neuron"} == {FF}


def test_mlp_neuron_equals_act_in_ungated_mlps() -> None:
    model = make_model("gpt2")
    pool = build_pool(model, components=["mlp.neuron", "mlp.act"])
    seen: dict[str, torch.Tensor] = {}
    with hooked(model, {s.module: (lambda n: lambda t: seen.__setitem__(n, t.detach()))(s.module)
                        for s in pool.sites}), torch.no_grad():
        model(torch.arange(2, 14).unsqueeze(0))
    torch.testing.assert_close(seen["transformer.h.0.mlp.c_proj:input"], seen["transformer.h.0.mlp.act"])
    assert "mlp.neuron" not in get_adapter(model).preset("mlp")
    assert "mlp.neuron" in get_adapter(model).preset("all")

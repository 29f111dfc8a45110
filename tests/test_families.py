"""Model families: derived adapters for unknown types, MoE and unmappable refusals, norm gains.

The per-family oracles (hook mask == weight edit, export == hook mask, every site resolves
with its true width) are the ARCHS-parametrised tests of test_masking, test_export and
test_adapters; ARCHS in tiny.py lists every family in the table.
"""

from __future__ import annotations

import logging
from dataclasses import fields

import pytest
import torch
import transformers as T
from tiny import ARCHS, TEXT, _llama_like, make_model

from achilles import AchillesError, Unit, build_pool, get_adapter, masked, zero_weights_
from achilles.cli import main
from achilles.model.adapters import _ADAPTERS, NORM_GAIN_OFFSET, ArchAdapter, reference_paper_kinds
from achilles.model.derive import derive_adapter

IDS = torch.tensor([[0, 5, 17, 42, 99, 3, 250, 7, 64, 11, 12, 200]])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _same_mapping(a: ArchAdapter, b: ArchAdapter) -> bool:
    """Equal in everything but the free-text notes (components compared in table order)."""
    return all(
        getattr(a, f.name) == getattr(b, f.name) for f in fields(ArchAdapter) if f.name != "notes"
    ) and list(a.components) == list(b.components)


def _renamed(arch: str, seed: int = 0) -> torch.nn.Module:
    model = make_model(arch, seed)
    model.config.model_type = f"unknown-{arch}"
    return model


# arch -> the layout its module tree is derived as (None: no layout fits, refused)
DERIVED_AS = {
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma": "llama",
    "smollm3": "llama", "granite": "llama", "gemma2": "gemma2", "gemma3_text": "gemma2",
    "gpt2": "gpt2", "gpt_neox": "gpt_neox",
    "olmo2": None, "phi": None, "phi3": None, "starcoder2": None,
}


def test_every_family_has_a_derivation_verdict() -> None:
    assert set(DERIVED_AS) == set(ARCHS) == set(_ADAPTERS)


@pytest.mark.parametrize("arch", ARCHS)
def test_derived_adapter_equals_the_explicit_row_or_is_refused(arch: str) -> None:
    explicit = get_adapter(make_model(arch))
    model = _renamed(arch)
    if DERIVED_AS[arch] is None:
        with pytest.raises(AchillesError) as e:
            derive_adapter(model)
        msg = str(e.value)
        assert "\n" not in msg and "matches no known layout" in msg and "register_adapter" in msg
        return
    adapter, layout, path = derive_adapter(model)
    assert layout == DERIVED_AS[arch] and path == explicit.layers
    assert _same_mapping(adapter, explicit), (adapter, explicit)
    assert build_pool(model, "all").sites == build_pool(make_model(arch), "all").sites


def test_derivation_is_logged_once_in_one_line(caplog) -> None:  # noqa: ANN001
    model = _renamed("gpt2")
    with caplog.at_level(logging.INFO, logger="achilles"):
        build_pool(model, "all")
        build_pool(model, "paper")
        get_adapter(model)
    lines = [r.getMessage() for r in caplog.records if r.name == "achilles.model.derive"]
    assert lines == [("model_type 'unknown-gpt2' is not in the table; derived the gpt2 layout "
                      "from its module tree (layers at transformer.h)")]


@pytest.mark.parametrize(("arch", "kinds"), [
    ("gpt2", ["attn.qkv", "mlp.up", "mlp.act", "mlp.neuron", "norm.mlp"]),  # Conv1D [in, out]
    ("gemma2", ["attn.k", "mlp.gate", "norm.attn", "norm.mlp_out"]),  # norms scale by 1 + w
    ("gpt_neox", ["attn.o", "mlp.down", "norm.attn"]),
])
def test_derived_adapter_hook_mask_equals_weight_edit(arch: str, kinds: list[str]) -> None:
    """On an unknown type, the derived adapter's hook mask equals the exact weight edits."""
    model = _renamed(arch)
    with torch.no_grad():  # biases start at 0 and gains at 1 (Gemma: 0): perturb them
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    pool = build_pool(model, "all")
    units = [Unit(s.module, (3 * s.layer + 1) % s.width) for s in pool.sites if s.component in kinds]
    assert {u.module.rsplit(".", 1)[-1] for u in units}
    clean = _logits(model)
    with masked(model, pool, units):
        want = _logits(model)
    zero_weights_(model, units)
    assert not torch.equal(want, clean)
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=1e-5)


def _moe(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "mixtral":
        config = _llama_like(T.MixtralConfig, num_local_experts=4, num_experts_per_tok=2)
    else:
        config = _llama_like(T.Qwen3MoeConfig, num_experts=4, num_experts_per_tok=2,
                             moe_intermediate_size=16, head_dim=8)
    return T.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_mixture_of_experts_is_refused_in_one_line_saying_why(kind: str) -> None:
    model = _moe(kind)
    with pytest.raises(AchillesError) as e:
        build_pool(model)
    msg = str(e.value)
    assert msg.startswith(f"model_type '{kind}' is a mixture of experts")
    assert "routed" in msg and "not a unit of the dense pool" in msg and "\n" not in msg


def test_moe_found_by_its_modules_when_the_config_says_nothing() -> None:
    model = _moe("mixtral")
    model.config.num_local_experts = 1  # a count of 1 alone would not say "mixture"
    with pytest.raises(AchillesError, match=r"mixture of experts \(it has expert modules "
                                            r"\(model\.layers\.0\.mlp"):
        build_pool(model)


def test_cli_refuses_a_moe_folder_with_exit_2_and_writes_nothing(tmp_path, capsys, tokenizer) -> None:  # noqa: ANN001
    src = tmp_path / "moe"
    _moe("mixtral").save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = tmp_path / "ranking.json"
    capsys.readouterr()  # drop save_pretrained's progress bar
    code = main(["rank", "--model", str(src), "--text", TEXT, "--method", "random",
                 "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "mixture of experts" in err[0], err
    assert "Traceback" not in err[0] and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]


def test_a_weight_the_layout_does_not_place_is_refused() -> None:
    """A third norm on a Llama-spelled layer: the layout would misdescribe it, so it is refused."""
    model = _renamed("llama")
    for layer in model.model.layers:
        layer.extra_layernorm = T.models.llama.modeling_llama.LlamaRMSNorm(32)
    with pytest.raises(AchillesError) as e:
        build_pool(model)
    msg = str(e.value)
    assert msg.startswith("unsupported architecture 'unknown-llama'")
    assert "llama at model.layers: modules with weights it does not place: extra_layernorm" in msg
    assert "\n" not in msg


def test_a_tree_near_a_layout_names_what_is_missing() -> None:
    msg = ""
    try:
        build_pool(_renamed("olmo2"))
    except AchillesError as e:
        msg = str(e)
    assert "(llama at model.layers: no input_layernorm)" in msg


def test_a_tree_with_no_layer_list_is_refused() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model.config = T.PretrainedConfig()
    with pytest.raises(AchillesError, match="unsupported architecture .*matches no known layout"):
        get_adapter(model)


def test_registered_adapter_wins_over_derivation() -> None:
    from achilles import register_adapter

    model = _renamed("llama")
    model.config.model_type = "registered-llama"
    register_adapter("registered-llama", ArchAdapter(
        layers="model.layers", components={"mlp.down": "mlp.down_proj"}, paper=("mlp.down",)))
    try:
        assert get_adapter(model).paper == ("mlp.down",)
    finally:
        del _ADAPTERS["registered-llama"]


def test_every_paper_pool_is_the_reference_name_filter() -> None:
    """One rule makes every row's --pool paper: the reference hooks names with mlp/attention/..."""
    for model_type, adapter in _ADAPTERS.items():
        assert adapter.paper == reference_paper_kinds(adapter.components), model_type


@pytest.mark.parametrize("arch", ARCHS)
def test_norm_gain_offset_zeroes_the_channel(arch: str) -> None:
    """Independent check of NORM_GAIN_OFFSET: gain -offset (bias 0) makes the channel exactly 0
    for a random input, and gain 0 does so only where the offset is 0."""
    model = make_model(arch)
    norms = [s for s in build_pool(model, "all").sites if s.component.startswith("norm.")]
    assert norms
    x = torch.randn(2, 5, norms[0].width)
    for s in norms:
        mod = model.get_submodule(s.module)
        offset = NORM_GAIN_OFFSET[type(mod).__name__]
        with torch.no_grad():
            mod.weight[3] = -offset
            if getattr(mod, "bias", None) is not None:
                mod.bias[3] = 0
            assert torch.all(mod(x)[..., 3] == 0), s
            mod.weight[3] = 0
            assert torch.all(mod(x)[..., 3] == 0) == (offset == 0), s

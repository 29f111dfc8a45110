"""Ranking methods of issue 4, each checked against an independent oracle.

Oracles are written here with plain PyTorch hooks and autograd (not through
``achilles.model.hooks``): activations from a forward hook, ``∂L/∂a`` from a leaf put in place of
one site's output with the model's own ``labels=`` loss, Wanda by hand from weights and
captured inputs.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny import ARCHS, TEXT, make_model

from achilles import build_pool
from achilles.cli import main
from achilles.config import RankConfig
from achilles.method.ranking import METHODS, Ranking, get_method, rank_units
from achilles.method.ranking.gradient import activations_and_grads

IDS = torch.tensor([[0, 5, 17, 42, 99, 3, 250, 7, 64, 11, 12, 200, 31, 8]])
MINE = ("activation", "gradient", "taylor", "wanda", "massive", "random")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # noqa: ANN202
    """One intra-op thread: tiny models run ~10× faster on a shared, loaded CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Site name -> module (a ``path:input`` site maps to the module whose input it is)."""
    mods = dict(model.named_modules())
    return {**mods, **{f"{n}:input": m for n, m in mods.items() if n}}


def _hook_site(mods, name, fn):  # noqa: ANN001, ANN202
    """Plain PyTorch hook on a site: ``fn(tensor) -> replacement | None``, output or input."""
    if name.endswith(":input"):
        def pre(_m, args):  # noqa: ANN001, ANN202
            new = fn(args[0])
            return None if new is None else (new, *args[1:])
        return mods[name].register_forward_pre_hook(pre)
    return mods[name].register_forward_hook(lambda _m, _i, out: fn(out))


def _oracle_outputs(model: torch.nn.Module, pool) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Each site's output ``[T, C]`` from plain forward hooks on an ordinary full forward."""
    mods, outs, handles = _modules(model), {}, []
    for s in pool.sites:
        def hook(out, name=s.module):  # noqa: ANN001, ANN202
            outs[name] = out[0].detach().clone()
        handles.append(_hook_site(mods, s.module, hook))
    with torch.no_grad():
        model(IDS)
    for h in handles:
        h.remove()
    return outs


def _oracle_grad(model: torch.nn.Module, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, ∂L/∂a)`` of one site: its output replaced by a leaf, L from ``labels=``."""
    leaf: list[torch.Tensor] = []

    def hook(out):  # noqa: ANN001, ANN202
        x = out.detach().clone().requires_grad_(True)
        leaf.append(x)
        return x

    h = _hook_site(_modules(model), module, hook)
    try:
        loss = model(IDS, labels=IDS).loss  # HF's own shifted mean NLL over T-1 targets
    finally:
        h.remove()
    (g,) = torch.autograd.grad(loss, leaf)
    return leaf[0][0].detach(), g[0]


def _scores(method: str, model: torch.nn.Module, pool, **cfg):  # noqa: ANN001, ANN003, ANN202
    return get_method(method)(model, IDS, pool, RankConfig(method=method, **cfg))


def test_every_method_is_registered() -> None:
    assert set(MINE) <= set(METHODS)
    for m in MINE:
        assert callable(get_method(m))


# ------------------------------------------------------------------------------ activation


@pytest.mark.parametrize("arch", ARCHS)
def test_activation_equals_direct_forward(arch: str) -> None:
    model = make_model(arch)
    pool = build_pool(model, "all")
    want = _oracle_outputs(model, pool)
    got = _scores("activation", model, pool)
    for s in pool.sites:
        v, p = want[s.module].abs().max(0)
        torch.testing.assert_close(got.values[s.module], v, rtol=1e-6, atol=0)
        assert torch.equal(got.positions[s.module], p), s.module
        assert got.values[s.module].dtype == torch.float32


def test_activation_is_magnitude_not_signed_and_mean_reduce() -> None:
    model = make_model("llama")
    pool = build_pool(model, "mlp")
    want = _oracle_outputs(model, pool)
    got = _scores("activation", model, pool, reduce="mean")
    for s in pool.sites:
        a = want[s.module].abs()
        torch.testing.assert_close(got.values[s.module], a.mean(0), rtol=1e-6, atol=0)
        assert torch.equal(got.positions[s.module], a.argmax(0))
    # a unit whose largest value is negative ranks by its magnitude
    down = "model.layers.0.mlp.down_proj"
    a = want[down]
    c = int((a.min(0).values.abs() - a.max(0).values).argmax())
    assert -a[:, c].min() > a[:, c].max()
    got_max = _scores("activation", model, pool)
    assert got_max.values[down][c] == a[:, c].abs().max()


# ------------------------------------------------------------------------ gradient, taylor


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_and_taylor_equal_autograd_per_site(arch: str) -> None:
    model = make_model(arch)
    pool = build_pool(model, "all")
    acts, grads = activations_and_grads(model, IDS, pool)
    grad_scores = _scores("gradient", model, pool)
    taylor_mean = _scores("taylor", model, pool, reduce="mean")
    for s in pool.sites:
        a, g = _oracle_grad(model, s.module)
        torch.testing.assert_close(acts[s.module], a, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grads[s.module], g, rtol=1e-4, atol=1e-8)
        v, p = g.abs().max(0)
        torch.testing.assert_close(grad_scores.values[s.module], v, rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(
            taylor_mean.values[s.module], (a * g).abs().mean(0), rtol=1e-4, atol=1e-8
        )


def test_gradient_gives_each_layer_its_own_gradient() -> None:
    """The reference bug: detached outputs gave every layer ∂L/∂h_final, others nothing."""
    model = make_model("llama")
    pool = build_pool(model, "paper")
    _, grads = activations_and_grads(model, IDS, pool)
    for s in pool.sites:  # q/k/v, gate/up/act and norms get gradients too
        assert grads[s.module].abs().sum() > 0, s.module
    d0, d1 = grads["model.layers.0.mlp.down_proj"], grads["model.layers.1.mlp.down_proj"]
    o1 = grads["model.layers.1.self_attn.o_proj"]
    assert not torch.allclose(d0, d1)
    assert not torch.allclose(o1, d1)
    # the last down_proj feeds the final norm directly: its gradient is ∂L/∂h_final
    h = {}

    def keep_input(_m, args, _out) -> None:  # noqa: ANN001
        h["x"] = args[0]

    hook = model.model.norm.register_forward_hook(keep_input)
    try:
        loss = model(IDS, labels=IDS).loss
    finally:
        hook.remove()
    (g_final,) = torch.autograd.grad(loss, h["x"])
    torch.testing.assert_close(d1, g_final[0], rtol=1e-4, atol=1e-8)


def test_taylor_max_equals_activation_times_gradient() -> None:
    model = make_model("gpt2")
    pool = build_pool(model, "paper")
    got = _scores("taylor", model, pool)
    for s in pool.sites:
        a, g = _oracle_grad(model, s.module)
        v, p = (a * g).abs().max(0)
        torch.testing.assert_close(got.values[s.module], v, rtol=1e-4, atol=1e-9)
        assert torch.equal(got.positions[s.module], p)


def test_gradient_works_under_no_grad_and_keeps_frozen_flags() -> None:
    model = make_model("llama")
    pool = build_pool(model, "down")
    want = _scores("gradient", model, pool)
    frozen = model.model.layers[0].mlp.up_proj.weight
    frozen.requires_grad_(False)
    with torch.no_grad():
        got = _scores("gradient", model, pool)
    assert not frozen.requires_grad
    assert all(p.requires_grad for p in model.parameters() if p is not frozen)
    for s in pool.sites:
        torch.testing.assert_close(got.values[s.module], want.values[s.module])


# ----------------------------------------------------------------------------------- wanda


def _captured_inputs(model: torch.nn.Module, pool) -> dict[str, torch.Tensor]:  # noqa: ANN001
    mods, ins, handles = _modules(model), {}, []
    for s in pool.sites:
        if s.module.endswith(":input"):  # an identity site: its input is its output
            continue
        def pre(_m, args, name=s.module):  # noqa: ANN001, ANN202
            ins[name] = args[0][0].detach().clone()
        handles.append(mods[s.module].register_forward_pre_hook(pre))
    with torch.no_grad():
        model(IDS)
    for h in handles:
        h.remove()
    return ins


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_wanda_equals_hand_computation(arch: str) -> None:
    model = make_model(arch)
    pool = build_pool(model, "all")
    mods = _modules(model)
    ins, outs = _captured_inputs(model, pool), _oracle_outputs(model, pool)
    got = _scores("wanda", model, pool)
    kinds = set()
    for s in pool.sites:
        mod, x, a = mods[s.module], ins.get(s.module, outs[s.module]), outs[s.module]
        if s.component == "mlp.neuron":  # parameter-free view of down_proj's input: ‖a_c‖₂
            torch.testing.assert_close(got.values[s.module], torch.sqrt((a * a).sum(0)),
                                       rtol=1e-4, atol=1e-6)
            kinds.add("neuron")
            continue
        norm_j = torch.sqrt((x * x).sum(0))  # ‖x_j‖₂ over positions
        if isinstance(mod, torch.nn.Linear):
            want = torch.stack([(mod.weight[c].abs() * norm_j).sum() for c in range(s.width)])
            kinds.add("linear")
        elif type(mod).__name__ == "Conv1D":  # weight [in, out]
            want = torch.stack([(mod.weight[:, c].abs() * norm_j).sum() for c in range(s.width)])
            kinds.add("conv1d")
        elif s.component.startswith("norm."):
            if arch == "llama":  # RMSNorm: x̂ = x / sqrt(mean(x²) + eps)
                xhat = x / torch.sqrt((x * x).mean(-1, keepdim=True) + mod.variance_epsilon)
            else:  # LayerNorm: x̂ = (x - μ) / sqrt(var + eps)
                mu = x.mean(-1, keepdim=True)
                xhat = (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + mod.eps)
            want = mod.weight.abs() * torch.sqrt((xhat * xhat).sum(0))
            kinds.add("norm")
        else:  # parameter-free activation: ‖a_c‖₂
            assert s.component == "mlp.act"
            want = torch.sqrt((a * a).sum(0))
            kinds.add("act")
        torch.testing.assert_close(got.values[s.module], want.detach(), rtol=1e-4, atol=1e-6)
        assert torch.equal(got.positions[s.module], a.abs().argmax(0))
    # every rule was exercised: GPT-2's projections are all Conv1D, Llama's all Linear
    assert kinds == {"conv1d" if arch == "gpt2" else "linear", "norm", "act", "neuron"}


# --------------------------------------------------------------------------------- massive


def test_massive_ranks_a_planted_massive_channel_first() -> None:
    model = make_model("llama")
    down = "model.layers.0.mlp.down_proj"
    with torch.no_grad():
        model.get_submodule(down).weight[7] *= 100.0
    pool = build_pool(model, "down")
    got = _scores("massive", model, pool)
    top = rank_units(got, pool, keep=3)
    assert (top[0].unit.module, top[0].unit.channel) == (down, 7)
    a = _oracle_outputs(model, pool)[down].abs()
    torch.testing.assert_close(got.values[down], a.max(0).values / a.median(), rtol=1e-6, atol=0)
    assert top[0].score > 10 * top[1].score  # far above every other channel


def test_massive_median_falls_back_to_nonzero_entries() -> None:
    from achilles.method.ranking.massive import median_magnitude

    m = torch.tensor([[0.0, 0.0, 0.0], [0.0, 2.0, 4.0]])
    assert float(median_magnitude(m)) == 2.0
    assert float(median_magnitude(torch.zeros(2, 3))) == 1.0


# ---------------------------------------------------------------------------------- random


def test_random_is_a_seeded_permutation_of_the_whole_pool() -> None:
    model = make_model("llama")
    pool = build_pool(model, "all")
    order = lambda seed: [r.unit.key for r in rank_units(  # noqa: E731
        _scores("random", model, pool, seed=seed), pool, keep=pool.n_units)]
    a, b, c = order(1), order(1), order(2)
    assert a == b
    assert a != c
    everything = {u.key for u in pool.units(range(pool.n_units))}
    assert len(a) == pool.n_units and set(a) == everything
    flat = _scores("random", model, pool, seed=1).flat(pool)
    assert flat.unique().numel() == pool.n_units  # no ties
    # not the pool order, and not close to it
    assert a[: pool.n_units // 10] != [u.key for u in pool.units(range(pool.n_units // 10))]


# ----------------------------------------------------------------------- model left intact


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", MINE)
def test_method_leaves_model_untouched(arch: str, method: str) -> None:
    model = make_model(arch)
    pool = build_pool(model, "all")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = model(IDS).logits
    scores = _scores(method, model, pool)
    flat = scores.flat(pool)
    assert flat.shape == (pool.n_units,) and flat.dtype == torch.float32
    assert torch.isfinite(flat).all()
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, logits)
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, name
        assert not m._forward_hooks_with_kwargs, name
    for p in model.parameters():
        assert p.grad is None and p.requires_grad
    assert not model.training


# ------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("method", ["gradient", "wanda"])
def test_cli_rank_with_method(tiny_dir, tmp_path, method: str) -> None:  # noqa: ANN001
    out = tmp_path / "ranking.json"
    rc = main([
        "rank", "--model", str(tiny_dir), "--device", "cpu", "--text", TEXT,
        "--method", method, "--keep", "25", "--quiet", "--out", str(out),
    ])  # fmt: skip
    assert rc == 0
    ranking = Ranking.load(str(out))
    assert ranking.method == method and len(ranking.neurons) == 25
    scores = [r.score for r in ranking.neurons]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0
    assert json.loads(out.read_text())["config"]["rank"]["method"] == method


def test_gradient_restores_flags_and_hooks_when_the_forward_raises() -> None:
    model = make_model("llama")
    pool = build_pool(model, "down")

    def boom(_m, _i, _o) -> None:  # noqa: ANN001
        raise RuntimeError("boom")

    h = model.lm_head.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            _scores("gradient", model, pool)
    finally:
        h.remove()
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("method", ["gradient", "wanda", "massive"])
def test_bfloat16_model_gives_float32_scores_close_to_float32(method: str) -> None:
    model = make_model("llama")
    pool = build_pool(model, "down")
    want = _scores(method, model, pool).flat(pool)
    got = _scores(method, model.to(torch.bfloat16), pool).flat(pool)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert torch.corrcoef(torch.stack([want, got]))[0, 1] > 0.95

"""Paths a GPU user walks, held on CPU: offloaded weights, masker sizing, chunked-head NLL,
noise prefetch, batch-invariant stage 1, the fp32 re-check in the core, dtype choice,
version spellings and Gemma's embedding scale."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import cpu_offload
from tiny import TEXT, make_model

from achilles.analysis.weights import unit_weights
from achilles.config import RankConfig
from achilles.errors import AchillesError
from achilles.experiments.probe import ProbeConfig, probe
from achilles.method.identify import Identification, MaskEvaluator
from achilles.method.ranking import METHODS, get_method
from achilles.model.loading import LoadedModel
from achilles.model.masking import zero_weights_
from achilles.model.units import build_pool


def _offloaded(model: torch.nn.Module, to: str = "cpu", folder: str | None = None) -> torch.nn.Module:
    """A copy whose weights sit on ``meta`` outside each module's forward (accelerate), kept
    in CPU memory or on disk between forwards."""
    from accelerate import disk_offload

    cpu = torch.device("cpu")
    if to == "disk":
        off = disk_offload(copy.deepcopy(model), offload_dir=folder, execution_device=cpu)
    else:
        off = cpu_offload(copy.deepcopy(model), execution_device=cpu)
    assert all(p.device.type == "meta" for p in off.parameters())
    return off


@pytest.fixture(scope="module", params=["cpu", "disk"])
def plain_and_offloaded(request, tmp_path_factory):  # noqa: ANN001, ANN201
    model = make_model("llama")
    return model, _offloaded(model, request.param, str(tmp_path_factory.mktemp("offload")))


@pytest.fixture(scope="module")
def ids(tokenizer) -> torch.Tensor:  # noqa: ANN001
    return tokenizer(TEXT, return_tensors="pt").input_ids


# 1. offloaded weights ---------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_gives_the_same_scores_offloaded(plain_and_offloaded, ids, method: str) -> None:  # noqa: ANN001
    model, off = plain_and_offloaded
    pool = build_pool(model)
    cfg = RankConfig(method=method, samples=4)
    want = get_method(method)(model, ids, pool, cfg).flat(pool)
    got = get_method(method)(off, ids, pool, cfg).flat(pool)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert all(p.device.type == "meta" for p in off.parameters())  # weights went back


def test_weight_analysis_and_masking_agree_offloaded(plain_and_offloaded, ids) -> None:  # noqa: ANN001
    model, off = plain_and_offloaded
    pool = build_pool(model)
    units = pool.units([3, 40, 77, 150, 300])
    want = [w.to_dict() for w in unit_weights(model, ids, units, kinds=["attn.o", "mlp.down"])]
    got = [w.to_dict() for w in unit_weights(off, ids, units, kinds=["attn.o", "mlp.down"])]
    assert want and got == want
    a = MaskEvaluator(model, pool, ids, batch_size=2).measure([units, units[:2]])
    b = MaskEvaluator(off, pool, ids, batch_size=2).measure([units, units[:2]])
    assert a == b


def test_probe_offloaded(plain_and_offloaded, tokenizer) -> None:  # noqa: ANN001
    model, off = plain_and_offloaded
    pool = build_pool(model)
    units = pool.units([5, 60])
    ident = Identification(
        epsilon=1.0, n_star=2, critical_set=units, minimal_set=units, delta_critical=1.0,
        delta_minimal=1.0, necessity=[0.5, 0.5], curve=[], n_star_by_epsilon={},
        baseline_nll=1.0, tokens=10, n_units=pool.n_units, forward_passes=1,
    )
    cfg = ProbeConfig(prompt="The river", target=" ran", max_new_tokens=3, top_k=4)
    from achilles.config import ModelSpec

    spec = ModelSpec(model="tiny")
    want = probe(LoadedModel(model, tokenizer, spec), ident, cfg).to_dict()
    got = probe(LoadedModel(off, tokenizer, spec), ident, cfg).to_dict()
    assert got["levels"] == want["levels"]


def test_zero_weights_refuses_offloaded_parameters(plain_and_offloaded) -> None:  # noqa: ANN001
    model, off = plain_and_offloaded
    unit = build_pool(model).units([1])
    with pytest.raises(AchillesError, match="offloaded"):
        zero_weights_(off, unit)


# 2. masker sized to the rows in use -----------------------------------------------------


def test_masks_are_sized_to_the_call_not_the_masker() -> None:
    from achilles.model.masking import ChannelMasker, PrefixIndex

    model = make_model("llama")
    pool = build_pool(model)
    masker = ChannelMasker(model, pool, rows=544)  # sized for a long linear scan
    a, b = pool.units([3]), pool.units([200, 201])
    masker.set_rows([a, b, []])
    touched = {a[0].module, b[0].module}
    assert set(masker._masks) == touched
    width = {s.module: s.width for s in pool.sites}
    assert masker.mask_bytes() == sum(3 * width[m] for m in touched)  # 3 rows, not 544
    ranking = pool.units(list(range(0, pool.n_units, 7)))
    masker.set_prefixes(PrefixIndex.build(pool, ranking), [1, 2])
    assert set(masker._masks) == {ranking[0].module}  # only the sites the prefixes reach
    assert masker.mask_bytes() == 2 * width[ranking[0].module]
    with pytest.raises(ValueError, match="545 masks"):
        masker.set_rows([[]] * 545)


def test_hooks_use_the_masks_built_before_the_forward(ids) -> None:  # noqa: ANN001
    from achilles.model.masking import ChannelMasker

    model = make_model("llama")
    pool = build_pool(model)
    masker = ChannelMasker(model, pool, rows=4)
    masker.set_rows([pool.units([3]), pool.units([40])])
    before = {m: t.data_ptr() for m, t in masker._masks.items()}
    with masker.installed():
        model(input_ids=ids.expand(2, -1))
    assert {m: t.data_ptr() for m, t in masker._masks.items()} == before


# 7. Δ against an unmasked row of the same batch; minimisation batch by timing ----------


def test_reference_row_takes_delta_within_the_batch(ids) -> None:  # noqa: ANN001
    model = make_model("llama")
    pool = build_pool(model)
    masks = [pool.units([i, i + 50]) for i in range(6)]
    plain = MaskEvaluator(model, pool, ids, batch_size=1).measure(masks)
    ev = MaskEvaluator(model, pool, ids, batch_size=4, reference_row=True)
    assert ev.masks_per_pass == 3
    ev.baseline_nll = 1e9  # a batched pass must not compare with the 1-row clean NLL
    passes = ev.forward_passes
    got = ev.measure(masks)
    assert ev.forward_passes - passes == 2  # 6 masks, 3 per pass (+ the reference row)
    for g, p in zip(got, plain, strict=True):
        assert g.delta == pytest.approx(p.delta, abs=1e-5)
    seq = ev.measure(masks[:2], sequential=True)  # one mask per pass: the stored clean NLL
    assert all(m.delta < -1e6 for m in seq)


def test_minimize_batch_from_pass_times() -> None:
    from achilles.method.identify import minimize_batch

    assert minimize_batch(1.0, 1.2, 16) == 16  # a GPU: 16 rows cost about one
    assert minimize_batch(1.0, 16.0, 16) == 1  # CPU: rows cost what they cost
    assert minimize_batch(1.0, 7.9, 16) == 16 and minimize_batch(1.0, 8.0, 16) == 1
    assert minimize_batch(1.0, 0.1, 1) == 1


# stage 1 is batch-invariant ---------------------------------------------------------------


def test_stage1_scores_are_bit_identical_for_every_batch_size(ids) -> None:  # noqa: ANN001
    from achilles.method.ranking.perturbation import perturbation_scores

    model = make_model("llama")
    pool = build_pool(model)
    got = {
        b: perturbation_scores(model, ids, pool, RankConfig(samples=20, batch_size=b)).flat(pool)
        for b in (1, 7, None)
    }
    assert torch.equal(got[1], got[7]) and torch.equal(got[1], got[None])


# 5. noise prefetch ------------------------------------------------------------------------


def test_prefetched_noise_gives_the_same_draws_with_retries() -> None:
    from achilles.method.ranking.perturbation import NoiseStream, PrefetchedNoise, noise_draws

    shape = (1, 5, 3)
    want = torch.cat(noise_draws(7, 23, shape))
    with PrefetchedNoise(NoiseStream(7, shape), 23) as noise:
        got = [noise.take(0, 8), noise.take(8, 8)]
        got.append(noise.take(16, 4))  # an OOM retry at half the batch: prefetch discarded
        got += [noise.take(20, 3)]  # the short last batch
    assert torch.equal(torch.cat(got), want)


def test_stage1_with_prefetch_equals_without(ids) -> None:  # noqa: ANN001
    from achilles.method.ranking.perturbation import perturbation_scores

    model = make_model("llama")
    pool = build_pool(model)
    cfg = RankConfig(samples=11, batch_size=3)
    a = perturbation_scores(model, ids, pool, cfg, prefetch=False).flat(pool)
    b = perturbation_scores(model, ids, pool, cfg, prefetch=True).flat(pool)
    assert torch.equal(a, b)


# 6. NLL from a chunked head ---------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "gpt_neox", "phi3"])
def test_chunked_head_nll_equals_the_full_forward(arch: str, ids) -> None:  # noqa: ANN001
    from achilles.method.metrics import _full_nll, sequence_nll

    model = make_model(arch)
    if arch == "gemma2":
        model.config.final_logit_softcapping = 0.5  # small enough to bite on tiny logits
    batch = torch.cat([ids, ids.flip(1)]).repeat(5, 1)  # 10 rows: two head chunks of 8 and 2
    want = _full_nll(model, batch, 8)
    torch.testing.assert_close(sequence_nll(model, batch), want, rtol=1e-6, atol=1e-4)
    # independent oracle: float64 log-softmax of the model's own logits
    with torch.no_grad():
        lg = model(input_ids=batch).logits[:, :-1].double()
    hand = -lg.log_softmax(-1).gather(-1, batch[:, 1:, None]).squeeze(-1).sum(1)
    torch.testing.assert_close(sequence_nll(model, batch).double(), hand, rtol=1e-5, atol=1e-3)


# 3. dtype=auto picks bf16 only where the GPU has it ------------------------------------------


@pytest.mark.parametrize(
    ("capability", "want"), [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16), ((7, 5), torch.float16)]
)
def test_auto_dtype_follows_compute_capability(monkeypatch, caplog, capability, want) -> None:  # noqa: ANN001
    from achilles.model.loading import resolve_dtype

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    with caplog.at_level("WARNING", logger="achilles.model.loading"):
        assert resolve_dtype("auto", torch.device("cuda", 0)) is want
    assert ("no native bfloat16" in caplog.text) == (want is torch.float16)
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("bfloat16", torch.device("cuda", 0)) is torch.bfloat16  # asked for


# 8. version floors ------------------------------------------------------------------------


def test_oom_is_recognised_without_the_torch_2_5_alias(monkeypatch) -> None:  # noqa: ANN001
    from achilles.model.batching import is_oom

    err = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.delattr(torch, "OutOfMemoryError", raising=False)  # torch < 2.5
    assert is_oom(err) and is_oom(RuntimeError("CUDA error: out of memory"))
    assert not is_oom(RuntimeError("shape mismatch"))


def test_dependency_floors_cover_the_apis_used() -> None:
    from pathlib import Path

    import tomllib

    deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    floors = dict(d.split(">=") for d in deps["dependencies"] if ">=" in d)
    # from_pretrained(dtype=...) is transformers >= 4.56; torch.OutOfMemoryError is 2.5
    assert tuple(int(x) for x in floors["transformers"].split(".")[:2]) >= (4, 56)
    assert tuple(int(x) for x in floors["torch"].split(".")[:2]) >= (2, 5)


# 9. Gemma: the noise is defined after the embedding scale, whatever the transformers version


def _layer0_inputs(model: torch.nn.Module, ids: torch.Tensor, cfg: RankConfig) -> list[torch.Tensor]:
    """Hidden states entering layer 0 on every pass of stage 1 (test-side hook)."""
    from achilles.method.ranking.perturbation import perturbation_scores

    seen: list[torch.Tensor] = []

    def grab(_m, args, kwargs):  # noqa: ANN001, ANN202
        h = args[0] if args else kwargs["hidden_states"]
        seen.append(h.detach().clone())

    handle = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        perturbation_scores(model, ids, build_pool(model), cfg)
    finally:
        handle.remove()
    return seen


def _as_transformers_4(model: torch.nn.Module) -> torch.nn.Module:
    """Gemma as transformers 4.x builds it: a plain embedding, √d applied to inputs_embeds."""
    scaled = model.model.embed_tokens
    plain = torch.nn.Embedding(scaled.num_embeddings, scaled.embedding_dim)
    plain.weight = scaled.weight
    model.model.embed_tokens = plain
    root = float(model.config.hidden_size) ** 0.5

    def rescale(_m, args, kwargs):  # noqa: ANN001, ANN202
        x = kwargs.get("inputs_embeds")
        if x is None:
            x = plain(kwargs.pop("input_ids"))
        kwargs["inputs_embeds"] = x * torch.tensor(root, dtype=x.dtype)
        return args, kwargs

    model.model.register_forward_pre_hook(rescale, with_kwargs=True)
    return model


@pytest.mark.parametrize("arch", ["gemma", "gemma2"])
@pytest.mark.parametrize("old", [False, True])
@pytest.mark.parametrize("noise", ["absolute", "relative"])
def test_gemma_noise_is_added_after_the_embedding_scale(arch: str, old: bool, noise: str, ids) -> None:  # noqa: ANN001
    from achilles.method.ranking.perturbation import noise_draws

    model = make_model(arch)
    if old:
        model = _as_transformers_4(model)
    cfg = RankConfig(samples=3, batch_size=3, alpha=0.5, noise=noise)
    clean, noisy = _layer0_inputs(model, ids, cfg)
    with torch.no_grad():
        scaled = model.model.embed_tokens(ids)
    if old:
        scaled = scaled * float(model.config.hidden_size) ** 0.5
    torch.testing.assert_close(clean, scaled)  # layer 0 sees the scaled embedding
    sigma = cfg.alpha * (float(scaled.pow(2).mean().sqrt()) if noise == "relative" else 1.0)
    eps = torch.cat(noise_draws(cfg.seed, 3, tuple(ids.shape) + (model.config.hidden_size,)))
    torch.testing.assert_close((noisy - clean) / sigma, eps, rtol=1e-4, atol=1e-4)


# 4. fp32 re-check: in the core, in place, after the results are saved ----------------------


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_in_place_upcast_is_lossless_and_equals_a_float32_copy(arch: str, low, ids) -> None:  # noqa: ANN001
    from achilles.method.metrics import sequence_nll
    from achilles.method.recheck import float32_forward

    model = make_model(arch).to(low)
    before = {k: (v.clone(), v.dtype) for k, v in model.state_dict().items()}
    want = sequence_nll(copy.deepcopy(model).float(), ids)
    with float32_forward(model):
        got = sequence_nll(model, ids)
        assert next(model.parameters()).dtype == low  # only while a layer runs
    assert torch.equal(got, want)
    after = model.state_dict()
    for k, (v, dtype) in before.items():
        assert after[k].dtype == dtype and torch.equal(after[k], v), k  # bit for bit


def test_upcast_restores_the_layer_when_its_forward_raises(ids) -> None:  # noqa: ANN001
    from achilles.method.recheck import float32_forward
    from achilles.model.hooks import hooked

    model = make_model("llama").to(torch.bfloat16)

    def boom(_out: torch.Tensor) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), float32_forward(model), \
            hooked(model, {"model.layers.1.mlp.down_proj": boom}):
        model(input_ids=ids)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_identify_saves_before_the_fp32_recheck(tokenizer, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    from test_batching import _strong_bf16_llama

    from achilles.cli import main
    from achilles.method import recheck

    model_dir = tmp_path / "model"
    _strong_bf16_llama().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    def fail(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("the re-check failed")

    monkeypatch.setattr(recheck, "recheck_fp32", fail)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="re-check failed"):
        main(["find", "--model", str(model_dir), "--text", TEXT, "--dtype", "bfloat16",
              "--samples", "2", "--epsilon", "0.02", "--max-neurons", "30", "--no-minimize",
              "--no-report", "--out-dir", str(out), "--quiet"])
    saved = Identification.load(str(out / "identification.json"))
    assert (out / "ranking.json").is_file() and saved.fp32_check is None and saved.found


def test_cuda_minimisation_path_reverifies_one_mask_per_pass(ids, monkeypatch) -> None:  # noqa: ANN001
    """The CUDA branch of identify (reference rows, timed batch, re-verification), run on CPU."""
    import importlib

    from test_batching import _strong_bf16_llama

    from achilles.config import IdentifyConfig
    from achilles.method.ranking import rank_units

    identify_mod = importlib.import_module("achilles.method.identify")
    model = _strong_bf16_llama().float()
    pool = build_pool(model)
    scores = get_method("perturbation")(model, ids, pool, RankConfig(samples=4))
    ranking = [r.unit for r in rank_units(scores, pool, 60)]
    cfg = IdentifyConfig(epsilon=0.02, max_neurons=60, fp32_check=False, batch_size=6)
    plain = identify_mod.identify(model, ids, pool, ranking, cfg)
    assert plain.found and len(plain.minimal_set) > 1

    monkeypatch.setattr(identify_mod, "input_device", lambda _m: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(identify_mod, "minimize_batch", lambda *a: 4)  # speculate 4 per pass
    seen: list[bool] = []
    measure = identify_mod.MaskEvaluator.measure

    def spy(self, masks, *, sequential=False):  # noqa: ANN001, ANN202
        seen.append(sequential)
        assert self.reference_row  # batched passes carry an unmasked row
        return measure(self, masks, sequential=sequential)

    monkeypatch.setattr(identify_mod.MaskEvaluator, "measure", spy)
    gpu = identify_mod.identify(model, ids, pool, ranking, cfg)
    assert True in seen and False in seen  # batched search, then one mask per pass
    assert gpu.minimal_set == plain.minimal_set
    assert gpu.delta_minimal == pytest.approx(plain.delta_minimal, abs=1e-6)
    assert gpu.necessity == pytest.approx(plain.necessity, abs=1e-6)


def test_site_device_follows_the_block_for_parameter_free_sites(plain_and_offloaded) -> None:  # noqa: ANN001
    from achilles.model.masking import site_device

    model, off = plain_and_offloaded
    assert site_device(model, "model.layers.0.mlp.act_fn") == torch.device("cpu")
    layer = off.model.layers[1]
    hooks = [m._hf_hook for m in layer.modules() if hasattr(m, "_hf_hook")]
    old = [h.execution_device for h in hooks]
    try:
        for h in hooks:  # as if layer 1 ran on a second GPU
            h.execution_device = torch.device("cuda", 3)
        for site in ("model.layers.1.mlp.act_fn", "model.layers.1.mlp.down_proj:input",
                     "model.layers.1.self_attn.o_proj"):
            assert site_device(off, site) == torch.device("cuda", 3)
        assert site_device(off, "model.layers.0.mlp.act_fn") == torch.device("cpu")
    finally:
        for h, d in zip(hooks, old, strict=True):
            h.execution_device = d


def test_stage2_batch_counts_the_chunked_head_once(monkeypatch) -> None:  # noqa: ANN001
    from achilles.model import batching

    model = make_model("llama")
    free = 10 * 2**20
    monkeypatch.setattr(batching, "model_devices", lambda _m: [torch.device("cuda", 0)])
    monkeypatch.setattr(batching, "free_cuda_bytes", lambda _d: free)
    per_row = batching.row_bytes_estimate(model, 100, 48, logits=False)
    head = batching.head_bytes(model, 100)
    assert head == batching.LOGIT_CHUNK * 100 * 320 * (4 + 4 + 4)
    want = int(0.7 * (free - head) // per_row)
    assert batching.choose_batch_size(model, 100, 10_000, 48) == want
    assert batching.choose_batch_size(model, 100, 10_000, 48, logits=False) == int(0.7 * free // per_row)

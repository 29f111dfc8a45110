"""Scale and GPU-path behaviour, checked on CPU: lazy noise, OOM halving, batching, fp32 check.

No timing is asserted here; timings live in ``bench/`` and ``docs/benchmarks.md``.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import TEXT, make_model

from achilles.config import IdentifyConfig, ModelSpec, RankConfig
from achilles.method.identify import Identification, MaskEvaluator
from achilles.method.pipeline import find
from achilles.method.ranking.perturbation import NoiseStream, noise_draws, perturbation_scores
from achilles.model.batching import choose_batch_size, run_batched
from achilles.model.loading import LoadedModel
from achilles.model.units import build_pool

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ids(tokenizer):  # noqa: ANN001, ANN201
    return tokenizer(TEXT, return_tensors="pt").input_ids


@pytest.mark.parametrize("batch", [1, 3, 7, 10, 16])
def test_lazy_noise_equals_eager_draws(batch: int) -> None:
    shape = (1, 5, 7)
    eager = torch.cat(noise_draws(42, 10, shape))
    stream = NoiseStream(42, shape)
    lazy = torch.cat([stream.take(i, min(batch, 10 - i)) for i in range(0, 10, batch)])
    assert torch.equal(lazy, eager)


def test_lazy_noise_retry_after_failed_batch_gives_the_same_draws() -> None:
    shape = (1, 4, 3)
    eager = torch.cat(noise_draws(7, 9, shape))
    stream = NoiseStream(7, shape)
    first = stream.take(0, 4)
    stream.take(4, 4)  # this batch "fails" ...
    retry = [stream.take(4, 2), stream.take(6, 2), stream.take(8, 1)]  # ... and is retried halved
    assert torch.equal(torch.cat([first, *retry]), eager)
    with pytest.raises(ValueError, match="in order"):
        stream.take(2, 1)


def _scores(model, ids, batch):  # noqa: ANN001, ANN202
    pool = build_pool(model)
    s = perturbation_scores(model, ids, pool, RankConfig(samples=8, batch_size=batch))
    return torch.cat([s.values[x.module] for x in pool.sites])


def test_fake_oom_mid_batch_halves_and_leaves_no_partial_sums(ids) -> None:  # noqa: ANN001
    model = make_model("llama")
    clean_run_halved = _scores(model, ids, 2)
    full_batch = _scores(model, ids, 4)

    raised = []

    def boom(_mod, _inp, out):  # noqa: ANN001, ANN202
        # the first noisy batch dies in layer 1, after layer 0's sites have staged their sums
        if out.shape[0] > 1 and not raised:
            raised.append(out.shape[0])
            raise torch.OutOfMemoryError("CUDA out of memory (fake, injected by the test)")

    handle = model.model.layers[1].register_forward_hook(boom)
    try:
        after_oom = _scores(model, ids, 4)
    finally:
        handle.remove()
    assert raised == [4]
    assert torch.equal(after_oom, clean_run_halved)  # batches of 2 after the halving
    torch.testing.assert_close(after_oom, full_batch, rtol=1e-5, atol=1e-6)


def test_run_batched_reraises_other_errors_and_oom_at_batch_one() -> None:
    def bad(_chunk):  # noqa: ANN001, ANN202
        raise ValueError("not memory")

    with pytest.raises(ValueError):
        run_batched(range(4), bad, 2)

    def oom(_chunk):  # noqa: ANN001, ANN202
        raise torch.OutOfMemoryError("out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        run_batched(range(4), oom, 4)


def test_choose_batch_size_on_cpu_and_requested() -> None:
    model = make_model("llama")
    assert choose_batch_size(model, 100, 1000, 48, 7) == 7
    assert choose_batch_size(model, 100, 3, 48, 7) == 3
    assert 1 <= choose_batch_size(model, 100, 1000, 48, logits=False) <= 1000


def test_mask_evaluator_batch_size_does_not_change_deltas(ids) -> None:  # noqa: ANN001
    model = make_model("llama")
    pool = build_pool(model)
    units = pool.units(range(0, pool.n_units, 7))
    masks = [units[: 3 * n] for n in range(10)]
    one = MaskEvaluator(model, pool, ids, batch_size=1)
    seven = MaskEvaluator(model, pool, ids, batch_size=7)
    d1 = [m.delta for m in one.measure(masks)]
    d7 = [m.delta for m in seven.measure(masks)]
    assert one.forward_passes == 1 + 10 and seven.forward_passes == 1 + 2
    torch.testing.assert_close(torch.tensor(d7), torch.tensor(d1), rtol=1e-4, atol=1e-5)


def _strong_bf16_llama() -> torch.nn.Module:
    """A tiny Llama whose MLPs dominate the residual stream, so masking moves Δ, in bf16."""
    model = make_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(40)
        model.lm_head.weight.mul_(10)
    return model.to(torch.bfloat16)


def test_bf16_run_records_an_fp32_check(tokenizer, tmp_path) -> None:  # noqa: ANN001
    lm = LoadedModel(_strong_bf16_llama(), tokenizer, ModelSpec(model="tiny-llama"))
    _, ident = find(lm, TEXT, RankConfig(samples=4), IdentifyConfig(epsilon=0.02, max_neurons=40))
    assert ident.found
    check = ident.fp32_check
    assert check is not None and check["dtype_run"] == "bfloat16"
    assert check["set"] == "minimal" and check["n"] == len(ident.minimal_set)
    assert math.isfinite(check["delta_run"]) and math.isfinite(check["delta_fp32"])
    assert math.isfinite(check["baseline_nll_fp32"])
    assert isinstance(check["agree"], bool)
    assert next(lm.model.parameters()).dtype == torch.bfloat16  # the run's model is untouched
    path = tmp_path / "identification.json"
    ident.save(str(path))
    assert Identification.load(str(path)).fp32_check == check


def test_fp32_check_off_or_float32_records_nothing(tokenizer) -> None:  # noqa: ANN001
    cfg = IdentifyConfig(epsilon=0.02, max_neurons=40, fp32_check=False, minimize=False)
    lm = LoadedModel(_strong_bf16_llama(), tokenizer, ModelSpec(model="tiny-llama"))
    assert find(lm, TEXT, RankConfig(samples=2), cfg)[1].fp32_check is None
    lm32 = LoadedModel(make_model("llama"), tokenizer, ModelSpec(model="tiny-llama"))
    cfg = IdentifyConfig(epsilon=0.02, max_neurons=5, minimize=False)
    assert find(lm32, TEXT, RankConfig(samples=2), cfg)[1].fp32_check is None


def test_gpu_bench_runs_tiny_on_cpu() -> None:
    r = subprocess.run(
        [sys.executable, "bench/gpu.py", "--tiny", "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "stage 1" in r.stdout
    for row in ("linear (find defaults)", "bisect", "fp32 re-check", "cpu_offload (smoke)"):
        assert row in r.stdout


def test_offloaded_model_scores_equal_and_inputs_go_to_the_execution_device(ids) -> None:  # noqa: ANN001
    """Under accelerate offloading the embedding weight is on ``meta``; stage 1 still works."""
    import copy

    from accelerate import cpu_offload

    from achilles.method.metrics import sequence_nll
    from achilles.model.batching import input_device

    model = make_model("llama")
    pool = build_pool(model)
    cfg = RankConfig(samples=6, batch_size=3)
    plain = perturbation_scores(model, ids, pool, cfg)
    nll = sequence_nll(model, ids)
    off = copy.deepcopy(model)
    cpu_offload(off, execution_device=torch.device("cpu"))
    assert off.get_input_embeddings().weight.device.type == "meta"
    assert input_device(off) == torch.device("cpu")
    dispatched = perturbation_scores(off, ids, pool, cfg)
    for s in pool.sites:
        torch.testing.assert_close(dispatched.values[s.module], plain.values[s.module])
    torch.testing.assert_close(sequence_nll(off, ids), nll)

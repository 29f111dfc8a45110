"""``achilles plan``: unit counts against the study's logged counts, memory against built models,
FLOPs against torch's FLOP counter, and the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import transformers as T_
from tiny import ARCHS, configs, make_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoTokenizer

from achilles.cli import main
from achilles.errors import AchillesError
from achilles.model import batching
from achilles.model.batching import batch_size_for_memory, row_bytes_estimate
from achilles.scale.census.models import builtin_list, read_model_list
from achilles.scale.plan import PlanConfig, meta_model, parse_size, plan_model

PAPER21 = builtin_list("paper21")["models"]
ROOT = Path(__file__).resolve().parents[1]


def _reference_units(shape: dict) -> int:
    """The study's per-token count from the shape alone: q+k+v+o + 3·d_ff + 2·d per layer."""
    d, ff, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    hd = shape.get("head_dim", d // shape["num_attention_heads"])
    q, kv = shape["num_attention_heads"] * hd, shape["num_key_value_heads"] * hd
    return layers * (q + 2 * kv + d + 3 * ff + 2 * d)


@pytest.fixture(scope="module")
def paper_plans() -> dict[str, object]:
    settings = PlanConfig(gpu_memory="141GB")
    return {e.name: plan_model(e.shape, settings, name=e.name) for e in read_model_list("paper21")}


def test_paper21_lists_the_study(paper_plans) -> None:  # noqa: ANN001
    assert len(PAPER21) == 21 == len(paper_plans)
    assert len({m["id"] for m in PAPER21}) == 21


@pytest.mark.parametrize("m", PAPER21, ids=[m["name"] for m in PAPER21])
def test_unit_counts_equal_the_reference_per_token_counts(m, paper_plans) -> None:  # noqa: ANN001
    plan = paper_plans[m["name"]]
    reference = m["reference_units_per_token"]
    if m["config"]["model_type"] == "phi3":
        # the reference also hooks resid_mlp_dropout, an exact copy of down_proj (d per layer)
        dup = m["config"]["num_hidden_layers"] * m["config"]["hidden_size"]
        assert plan.units + dup == reference
        assert any("resid_mlp_dropout" in n for n in plan.notes)
    else:
        assert _reference_units(m["config"]) == reference
        assert plan.units == reference
    # the study's |N| is this count times T: e.g. 9,881,600 × 115 = 1,136,384,000 for Qwen-72B
    assert plan.params == pytest.approx(m["params_reported"], rel=0.015)


def test_worked_examples(paper_plans) -> None:  # noqa: ANN001
    assert paper_plans["Qwen2.5-72B-Instruct"].units == 9_881_600
    assert paper_plans["Meta-Llama-3-8B-Instruct"].units == 1_966_080
    q72 = paper_plans["Qwen2.5-72B-Instruct"]
    assert q72.gpus == 2 and q72.fits  # 145 GB of bf16 weights: not on one 141 GB GPU
    assert paper_plans["Meta-Llama-3-8B-Instruct"].gpus == 1


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_within_5_percent_of_a_built_model(arch: str, dtype: torch.dtype) -> None:
    model = make_model(arch).to(dtype)
    built = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    name = str(dtype).removeprefix("torch.")
    plan = plan_model(configs()[arch], PlanConfig(dtype=name))
    assert plan.params == sum(p.numel() for p in model.parameters())
    assert plan.weight_bytes[name] == pytest.approx(built, rel=0.05)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_flops_match_torch_flop_counter(arch: str) -> None:
    T = 8
    model = make_model(arch)
    plan = plan_model(configs()[arch], PlanConfig(tokens=T, samples=1, dtype="float32"))
    ids = torch.randint(2, 300, (1, T))
    with FlopCounterMode(display=False) as full:
        model(ids)
    # per row: 2 · matmul parameters · T; attention's T² products are left out (a few %)
    per_row = plan.stage2["flops"]["linear"] / plan.stage2["rows"]["linear"]
    assert per_row == pytest.approx(full.get_total_flops(), rel=0.08)
    assert per_row <= full.get_total_flops()
    body = model.get_submodule(model.base_model_prefix)
    with FlopCounterMode(display=False) as stage1:
        body(ids)
    assert plan.stage1["flops"] / 2 == pytest.approx(stage1.get_total_flops(), rel=0.08)


def test_stage_passes_and_bounds() -> None:
    plan = plan_model(configs()["llama"], PlanConfig(samples=7, max_neurons=100, step=4, assume_n_star=3))
    assert plan.stage1["passes_rows"] == 8
    assert plan.stage2["rows"]["linear"] == 1 + 25
    assert plan.stage2["rows"]["bisect"] == 1 + 2 * math.ceil(math.log2(25)) + 1
    assert plan.stage2["rows"]["minimize"] == 3 * 4 // 2 + 3


def test_gpu_count_grows_as_gpus_shrink() -> None:
    shape = configs()["llama"]
    base = plan_model(shape, PlanConfig(dtype="float32", tokens=2))
    total = base.weight_bytes["float32"]
    per_gpu_extra = base.activation_bytes + base.fp32_check_bytes  # every GPU runs one row
    counts = []
    for frac in (2.0, 0.8, 0.5):
        gpu = per_gpu_extra + total * frac
        p = plan_model(shape, PlanConfig(dtype="float32", tokens=2, gpu_memory=f"{gpu / 2**20:.4f}MiB"))
        assert p.gpus is not None and p.fits
        assert p.gpu_load_bytes + p.activation_bytes + p.fp32_check_bytes <= p.config["gpu_bytes"]
        counts.append(p.gpus)
    assert counts[0] == 1 and counts[0] < counts[1] < counts[2]
    p = plan_model(shape, PlanConfig(dtype="float32", gpu_memory="1KiB"))
    assert p.gpus is None and not p.fits and p.notes


def _sums_and_row(shape: dict, tokens: int, dtype: torch.dtype) -> tuple[int, int]:
    """Oracle for the memory beside the weights, from a built model: stage 1's float32 sums
    (clean activation, running sum, batch sum of every hooked site, [T, width] each) and one
    row at batch size 1 under the batch rule's 70 % margin, with the chunked LM head."""
    model = T_.AutoModelForCausalLM.from_config(T_.AutoConfig.for_model(**shape), dtype=dtype)
    from achilles.model.units import build_pool

    pool = build_pool(model, "paper")
    sums = sum(3 * 4 * tokens * s.width for s in pool.sites)
    widest = max(s.width for s in pool.sites)
    row = row_bytes_estimate(model, tokens, widest, logits=False)
    return sums, math.ceil(row / 0.7) + batching.head_bytes(model, tokens)


@pytest.mark.parametrize("tokens", [16, 128, 256])
@pytest.mark.parametrize("gpu_mib", [1, 4, 64])
def test_plan_never_says_fits_past_its_own_figure(tokens: int, gpu_mib: int) -> None:
    """Issue 21: '1 × 8 GiB, fullest GPU 20.3 GiB' (weights fitted, stage-1 sums did not).
    Whatever T and GPU size, a plan that fits has its fullest GPU (weights + share of the
    sums + one row + float32 re-check) within the GPU, and one that cannot says why."""
    shape = {**configs()["llama"].to_dict(), "num_hidden_layers": 4}
    settings = PlanConfig(dtype="bfloat16", tokens=tokens, gpu_memory=f"{gpu_mib}MiB")
    p = plan_model(shape, settings)
    sums, row = _sums_and_row(shape, tokens, torch.bfloat16)
    assert p.stage1_accumulator_bytes == sums and p.activation_bytes == row
    gpu = gpu_mib * 2**20
    if p.fits:
        assert p.gpus is not None
        assert p.gpu_load_bytes + row + p.fp32_check_bytes <= gpu
        assert p.gpu_load_bytes >= math.ceil(sums / p.gpus)
    else:
        assert p.gpus is None and any("does not fit" in n for n in p.notes)
    if row + p.fp32_check_bytes >= gpu:  # nothing but one row already fills a GPU
        assert not p.fits and "one row of T" in p.notes[-1]


def test_weights_that_fit_beside_sums_that_do_not_need_more_gpus(capsys) -> None:  # noqa: ANN001
    """The issue's case in small: the weights fit one GPU, weights and stage-1 sums do not."""
    shape = {**configs()["llama"].to_dict(), "num_hidden_layers": 4}
    weights = plan_model(shape, PlanConfig(dtype="float32", tokens=128)).weight_bytes["float32"]
    sums, row = _sums_and_row(shape, 128, torch.float32)
    gpu = row + weights + sums // 3  # a fit for the weights alone, not with all the sums
    settings = PlanConfig(dtype="float32", tokens=128, gpu_memory=f"{gpu / 2**20:.6f}MiB")
    assert weights < 0.9 * gpu
    p = plan_model(shape, settings)
    assert p.gpus is not None and p.gpus >= 2 and p.fits
    one = plan_model(shape, dataclasses.replace(settings, gpus=1))
    assert not one.fits and one.gpus == p.gpus and "only 1 given" in one.notes[-1]
    assert "DOES NOT FIT" in _describe(one) or "does NOT fit" in _describe(one)


def _describe(p) -> str:  # noqa: ANN001
    from achilles.commands.plan import describe

    return describe(p)


def test_tokens_past_the_context_are_refused_or_truncated() -> None:
    shape = configs()["llama"]  # max_position_embeddings 256
    with pytest.raises(AchillesError, match="T = 257 tokens is past the model's context of 256"):
        plan_model(shape, PlanConfig(tokens=257))
    p = plan_model(shape, PlanConfig(tokens=10**6), truncate=True)
    assert p.config["tokens"] == 256 and "cut to the model's context of 256" in p.notes[0]
    assert p.stage1_accumulator_bytes == 3 * 4 * 256 * p.units
    # a shape dict is checked only against a context it states (the class default is not the
    # model's), and says when a long T goes unchecked
    bare = {k: v for k, v in PAPER21[0]["config"].items()}
    assert "max_position_embeddings" not in bare
    long = plan_model({**bare, "num_hidden_layers": 1}, PlanConfig(tokens=5000))
    assert any("records no context length" in n for n in long.notes)
    short = plan_model({**bare, "num_hidden_layers": 1}, PlanConfig(tokens=115))
    assert not any("context" in n for n in short.notes)
    with pytest.raises(AchillesError, match="context of 512"):
        plan_model({**bare, "num_hidden_layers": 1, "max_position_embeddings": 512}, PlanConfig(tokens=513))


def test_plan_out_folder_is_refused_before_any_planning(tmp_path, capsys, monkeypatch) -> None:  # noqa: ANN001
    def no_work(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("planned before the destination was checked")

    monkeypatch.setattr("achilles.commands.plan.plan_entry", no_work)
    (tmp_path / "plans").mkdir()
    assert main(["plan", "--model", str(ROOT / "models" / "sink"), "--out", str(tmp_path / "plans")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a folder: name a file" in err[0]
    assert [p.name for p in tmp_path.iterdir()] == ["plans"] and not any((tmp_path / "plans").iterdir())


def test_batch_size_rule_is_choose_batch_sizes(monkeypatch) -> None:  # noqa: ANN001
    model = make_model("llama")
    monkeypatch.setattr(batching, "model_devices", lambda m: [torch.device("cuda", 0)])
    sizes = set()
    for free in (10**5, 10**6, 10**7, 10**9):  # what choose_batch_size would do on such a GPU
        monkeypatch.setattr(batching, "free_cuda_bytes", lambda d, free=free: free)
        for logits in (True, False):
            b = batching.choose_batch_size(model, 20, 100, 48, logits=logits)
            assert b == batch_size_for_memory(model, free, 20, 100, 48, logits=logits)
            sizes.add(b)
    assert len(sizes) >= 3  # the memory actually decides
    per_row = row_bytes_estimate(model, 20, 48, logits=False)
    free = int(10 * per_row / 0.7) + 1  # 70 % of free memory over the bytes of one row
    assert batch_size_for_memory(model, free, 20, 100, 48, logits=False) == 10
    assert batch_size_for_memory(model, free, 20, 4, 48, logits=False) == 4
    # the plan applies the same rule to the meta-device model of the same config
    plan = plan_model(configs()["llama"], PlanConfig(dtype="float32", tokens=20, max_neurons=100))
    assert plan.stage2["batch_size"] == 100


def test_parse_size() -> None:
    assert parse_size("141GB") == 141 * 10**9
    assert parse_size("80GiB") == 80 * 2**30
    with pytest.raises(AchillesError, match="not a memory size"):
        parse_size("80")


def test_meta_model_keeps_tied_embeddings() -> None:
    m = meta_model({**PAPER21[0]["config"], "num_hidden_layers": 1})
    assert m.get_output_embeddings().weight is m.get_input_embeddings().weight


def test_cli_plan_paper21_table(capsys) -> None:  # noqa: ANN001
    assert main(["plan", "--models", "paper21", "--gpu-memory", "141GB", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.count("| Qwen2.5-") == 7 and "| Llama-3.3-70B-Instruct |" in out
    assert "9,881,600" in out and "1,966,080" in out


def test_cli_plan_model_json(capsys, tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", str(ROOT / "models" / "sink"), "--json", "--tokens", "30",
                 "--out", str(out)]) == 0
    d = json.loads(capsys.readouterr().out.split("\nwritten:")[0])
    assert d["kind"] == "plan" and d["units"] == 6 * (4 * 192 + 3 * 512 + 2 * 192)
    assert json.loads(out.read_text())["plans"][0]["units"] == d["units"]
    # T from the model's own tokenizer when a text is given
    argv = ["plan", "--model", str(ROOT / "models" / "sink"), "--json"]
    assert main([*argv, "--text-file", str(ROOT / "data" / "demo.txt")]) == 0
    tokens = json.loads(capsys.readouterr().out)["config"]["tokens"]
    text = (ROOT / "data" / "demo.txt").read_text(encoding="utf-8")
    assert tokens == len(AutoTokenizer.from_pretrained(ROOT / "models" / "sink")(text).input_ids)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["plan"], "exactly one of --model or --models"),
        (["plan", "--model", "models/sink", "--gpu-memory", "lots"], "not a memory size"),
        (["plan", "--model", "no/such/folder/x"], "model path not found"),
        (["plan", "--models", "nolist.txt"], "model list not found"),
        (["plan", "--models", "paper21", "--text", "some text"], "give --tokens, not a text"),
        (["plan", "--models", "paper21", "--select", "gpt-5"], "--select names gpt-5"),
        (["plan", "--models", "paper21", "--select", " , "], "names no model"),
        (["plan", "--model", "models/sink", "--select", "sink"], "--select picks models of --models"),
    ],
)
def test_cli_plan_bad_input(argv, message, capsys) -> None:  # noqa: ANN001
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_check_bytes_are_the_largest_group_the_recheck_upcasts(arch: str, monkeypatch) -> None:  # noqa: ANN001
    """Oracle: run the in-place float32 forward on a built bf16 model and record the bytes each
    upcast adds; the plan's figure is the largest of them (one group is float32 at a time)."""
    from achilles.method import recheck

    model = make_model(arch).to(torch.bfloat16).eval()
    added: list[int] = []
    real = recheck._upcast

    def counting(module, recurse):  # noqa: ANN001, ANN202
        done = real(module, recurse)
        added.append(sum(store[name].numel() * (4 - 2) for store, name, _ in done))
        return done

    monkeypatch.setattr(recheck, "_upcast", counting)
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad(), recheck.float32_forward(model):
        model(ids)
    assert added, "the float32 forward upcast nothing"
    plan = plan_model(configs()[arch], PlanConfig(dtype="bfloat16"))
    assert plan.fp32_check_bytes == max(added)
    assert plan_model(configs()[arch], PlanConfig(dtype="float32")).fp32_check_bytes == 0

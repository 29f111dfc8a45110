"""achilles export: exact weight edits for every kind × architecture, streaming, refusals."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
import transformers as T
from safetensors import safe_open
from tiny import ARCHS, TEXT, configs, make_model

from achilles import Unit, build_pool, get_adapter, masked
from achilles.cli import main
from achilles.config import ModelSpec
from achilles.errors import AchillesError
from achilles.model.masking import weight_edits
from achilles.model.units import Site
from achilles.weights.export import MASK_FILE, export_masked

IDS = torch.tensor([[0, 5, 17, 42, 99, 3, 250, 7, 64, 11, 12, 200]])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _units_of_kind(sites: list[Site], kind: str) -> list[Unit]:
    """Two channels of the kind in layer 0 and one in the last layer."""
    chosen = [s for s in sites if s.component == kind]
    first, last = chosen[0], chosen[-1]
    return [Unit(first.module, 1, first.layer, kind), Unit(first.module, first.width - 2, first.layer, kind),
            Unit(last.module, 3, last.layer, kind)]


def _tensors(folder) -> dict[str, torch.Tensor]:  # noqa: ANN001
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(safetensors.torch.load_file(f))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_export_equals_hook_mask_for_every_kind(arch: str, tmp_path, tokenizer) -> None:  # noqa: ANN001
    """For every component kind, plain from_pretrained of the export == the hook-masked model."""
    model = make_model(arch)
    with torch.no_grad():  # biases start at 0 and norm gains at 1 (Gemma: 0): perturb them
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    src = tmp_path / "src"
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    pool = build_pool(model, "all")
    clean = _logits(model)
    kinds = list(get_adapter(model).components)
    assert len(kinds) >= 8
    for kind in kinds:
        units = pool.validate(_units_of_kind(list(pool.sites), kind))
        with masked(model, pool, units):
            want = _logits(model)
        assert not torch.equal(want, clean), f"{kind}: the mask must change the logits"
        out = tmp_path / kind
        export_masked(model, units, ModelSpec(model=str(src)), out)
        got = _logits(T.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval())
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=f"{arch} {kind}")
    side = {p.name for p in (tmp_path / kinds[0]).iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "README.md", MASK_FILE} <= side


def test_only_the_edited_slices_change_and_provenance_is_written(tmp_path, tokenizer) -> None:  # noqa: ANN001
    model = make_model("qwen2")  # q/k/v biases
    torch.nn.init.normal_(model.model.layers[0].self_attn.q_proj.bias)  # initialised to 0
    src = tmp_path / "src"
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    units = [Unit("model.layers.0.self_attn.q_proj", 4, 0, "attn.q"),
             Unit("model.layers.1.mlp.down_proj:input", 7, 1, "mlp.neuron")]
    export_masked(model, units, ModelSpec(model=str(src)), tmp_path / "out",
                  mask_source={"file": "x.json", "kind": "identification", "set": "minimal"})
    before, after = _tensors(src), _tensors(tmp_path / "out")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias",
                       "model.layers.1.mlp.down_proj.weight"}
    q = after["model.layers.0.self_attn.q_proj.weight"]
    assert torch.all(q[4] == 0) and torch.equal(torch.cat([q[:4], q[5:]]),
                                                torch.cat([before["model.layers.0.self_attn.q_proj.weight"][:4],
                                                           before["model.layers.0.self_attn.q_proj.weight"][5:]]))
    assert after["model.layers.0.self_attn.q_proj.bias"][4] == 0
    d, d0 = after["model.layers.1.mlp.down_proj.weight"], before["model.layers.1.mlp.down_proj.weight"]
    assert torch.all(d[:, 7] == 0) and torch.equal(d[:, :7], d0[:, :7]) and torch.equal(d[:, 8:], d0[:, 8:])
    prov = json.loads((tmp_path / "out" / MASK_FILE).read_text())
    assert prov["kind"] == "export" and prov["n_units"] == 2 and len(prov["edits"]) == 3
    assert prov["config"]["mask"]["file"] == "x.json" and prov["env"]["torch"]
    assert "L0.attn.q[4]" not in (tmp_path / "out" / "README.md").read_text()  # modules, not labels
    assert "model.layers.0.self_attn.q_proj" in (tmp_path / "out" / "README.md").read_text()


def test_gemma_norm_is_zeroed_by_minus_one(tmp_path, tokenizer) -> None:  # noqa: ANN001
    """Gemma's RMSNorm scales by 1 + w: the exact edit writes w = -1, not 0."""
    model = make_model("gemma")
    edits = weight_edits(model, [Unit("model.layers.0.input_layernorm", 5)])
    assert [(e.param, e.index, e.value) for e in edits] == [("model.layers.0.input_layernorm.weight", 5, -1.0)]
    llama = weight_edits(make_model("llama"), [Unit("model.layers.0.input_layernorm", 5)])
    assert [e.value for e in llama] == [0.0]


def test_sharded_checkpoint_is_streamed_shard_by_shard(tmp_path, tokenizer, monkeypatch) -> None:  # noqa: ANN001
    model = make_model("llama")
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="40KB")
    tokenizer.save_pretrained(src)
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    assert len(shards) >= 3
    pool = build_pool(model, "all")
    units = pool.validate([Unit("model.layers.0.mlp.down_proj", 2), Unit("model.layers.1.mlp.act_fn", 9),
                           Unit("model.layers.1.post_attention_layernorm", 4)])
    with masked(model, pool, units):
        want = _logits(model)
    written: list[set[str]] = []
    real_save = safetensors.torch.save_file

    def spy(tensors, filename, metadata=None):  # noqa: ANN001, ANN202
        written.append(set(tensors))
        return real_save(tensors, filename, metadata=metadata)

    def no_full_load(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("export must not load the whole model")

    monkeypatch.setattr("achilles.weights.export.save_file", spy)
    monkeypatch.setattr(T.AutoModelForCausalLM, "from_pretrained", no_full_load)
    export_masked(model.to("meta"), units, ModelSpec(model=str(src)), tmp_path / "out")
    monkeypatch.undo()
    # one write per shard, each holding exactly that shard's tensors
    assert written == [{k for k, v in index.items() if v == s} for s in shards]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == shards
    got = _logits(T.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_source_dtype_is_kept(tmp_path, tokenizer) -> None:  # noqa: ANN001
    model = make_model("llama").to(torch.float16)
    src = tmp_path / "src"
    model.save_pretrained(src)
    export_masked(model, [Unit("model.layers.0.mlp.up_proj", 3)], ModelSpec(model=str(src)), tmp_path / "o")
    with safe_open(str(tmp_path / "o" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # noqa: SIM118


def test_shared_weights_unknown_norms_and_input_sites_are_refused() -> None:
    model = make_model("llama")
    layers = model.model.layers
    layers[1].mlp.down_proj = layers[0].mlp.down_proj  # one weight, two layers
    with pytest.raises(AchillesError, match="shared with"):
        weight_edits(model, [Unit("model.layers.1.mlp.down_proj", 0)])
    with pytest.raises(AchillesError, match="input of a LlamaRMSNorm"):
        weight_edits(model, [Unit("model.layers.0.input_layernorm:input", 0)])

    class OddNorm(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.exp(self.weight)

    layers[0].input_layernorm = OddNorm()
    with pytest.raises(AchillesError, match="OddNorm is a norm whose gain form is not known"):
        weight_edits(model, [Unit("model.layers.0.input_layernorm", 0)])


def _cli(capsys, *argv) -> tuple[int, str, str]:  # noqa: ANN001
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def ranked(tmp_path_factory, tokenizer):  # noqa: ANN001, ANN201
    """A saved tiny Llama and a random ranking of it."""
    d = tmp_path_factory.mktemp("ranked")
    make_model("llama").save_pretrained(d / "model")
    tokenizer.save_pretrained(d / "model")
    assert main(["rank", "--model", str(d / "model"), "--text", TEXT, "--method", "random",
                 "--out", str(d / "ranking.json"), "--quiet"]) == 0
    return d


def test_cli_export_then_from_pretrained(ranked, tmp_path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "lesioned"
    code, stdout, _ = _cli(capsys, "export", "--model", ranked / "model", "--mask",
                           ranked / "ranking.json", "--top", 5, "--out", out, "--quiet")
    assert code == 0 and "written:" in stdout
    prov = json.loads((out / MASK_FILE).read_text())
    assert prov["n_units"] == 5 and prov["config"]["mask"]["top"] == 5
    T.AutoModelForCausalLM.from_pretrained(out)
    T.AutoTokenizer.from_pretrained(out)
    # a second export into the same folder needs --force
    code, _, err = _cli(capsys, "export", "--model", ranked / "model", "--mask",
                        ranked / "ranking.json", "--top", 2, "--out", out, "--quiet")
    assert code == 2 and "--force" in err and len(err.strip().splitlines()) == 1
    assert json.loads((out / MASK_FILE).read_text())["n_units"] == 5
    assert _cli(capsys, "export", "--model", ranked / "model", "--mask", ranked / "ranking.json",
                "--top", 2, "--out", out, "--force", "--quiet")[0] == 0
    assert json.loads((out / MASK_FILE).read_text())["n_units"] == 2


def test_cli_mask_for_another_model_is_refused_and_nothing_written(ranked, tmp_path, capsys,  # noqa: ANN001
                                                                     tokenizer) -> None:  # noqa: ANN001
    other = tmp_path / "gpt2"
    make_model("gpt2").save_pretrained(other)
    tokenizer.save_pretrained(other)
    out = tmp_path / "x"
    for argv in (["--model", other, "--mask", ranked / "ranking.json", "--top", 3],
                 ["--model", ranked / "model", "--mask", ranked / "ranking.json"],
                 ["--model", ranked / "model"],
                 ["--model", ranked / "model", "--mask", tmp_path / "missing.json", "--top", 1]):
        code, _, err = _cli(capsys, "export", *argv, "--out", out, "--quiet")
        assert code == 2 and err.startswith("achilles: error:") and len(err.strip().splitlines()) == 1
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".x.")]  # no temp folder left


def test_exported_files_follow_the_umask(ranked, tmp_path, capsys) -> None:  # noqa: ANN001
    """Issue 21: model.safetensors came out 0600 under umask 022 (safetensors' own mode), the
    other files 0644. Every file and the folder follow the umask, whatever the source's modes."""
    import os

    old = os.umask(0o022)
    try:
        out = tmp_path / "lesioned"
        assert _cli(capsys, "export", "--model", ranked / "model", "--mask", ranked / "ranking.json",
                    "--top", 3, "--out", out, "--quiet")[0] == 0
        os.umask(0o077)
        tight = tmp_path / "tight"
        assert _cli(capsys, "export", "--model", ranked / "model", "--mask", ranked / "ranking.json",
                    "--top", 3, "--out", tight, "--quiet")[0] == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in tight.iterdir()} == {0o600}


def test_configs_have_untied_embeddings() -> None:
    """The exactness tests above rely on tied-embedding refusal never triggering for them."""
    assert all(not getattr(c, "tie_word_embeddings", False) for c in configs().values())


def test_cli_identification_mask_and_another_size_is_refused(ranked, tmp_path, capsys, tokenizer) -> None:  # noqa: ANN001
    run = tmp_path / "run"
    assert main(["find", "--model", str(ranked / "model"), "--text", TEXT, "--samples", "4",
                 "--max-neurons", "30", "--epsilon", "1e-4", "--out-dir", str(run), "--quiet"]) == 0
    capsys.readouterr()
    ident = json.loads((run / "identification.json").read_text())
    code, _, err = _cli(capsys, "export", "--model", ranked / "model", "--mask", run / "identification.json",
                        "--set", "critical", "--out", tmp_path / "crit", "--quiet")
    assert ident["found"], "a random tiny model barely cares (Δ ≈ 1e-4), so ε is tiny here"
    assert code == 0, err
    prov = json.loads((tmp_path / "crit" / MASK_FILE).read_text())
    assert prov["n_units"] == len(ident["critical_set"]) and prov["config"]["mask"]["set"] == "critical"
    wider = configs()["llama"]
    wider.intermediate_size = 64  # same architecture, another size: the pool fingerprint differs
    T.AutoModelForCausalLM.from_config(wider).save_pretrained(tmp_path / "wide")
    tokenizer.save_pretrained(tmp_path / "wide")
    code, _, err = _cli(capsys, "export", "--model", tmp_path / "wide", "--mask", run / "identification.json",
                        "--out", tmp_path / "w", "--quiet")
    assert code == 2 and "unit pool does not match" in err and not (tmp_path / "w").exists()


def test_planning_works_on_meta_but_editing_refuses_it() -> None:
    from achilles.model.masking import zero_weights_

    model = make_model("llama").to("meta")
    assert weight_edits(model, [Unit("model.layers.0.mlp.down_proj", 1)])  # plans need no weights
    with pytest.raises(AchillesError, match="offloaded"):
        zero_weights_(model, [Unit("model.layers.0.mlp.down_proj", 1)])

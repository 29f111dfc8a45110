"""Self-contained acceptance checks for ``models/natural`` and ``models/sink``.

Plain torch + transformers (no achilles import), so it can validate the shipped
models independently of the library. For each model folder it measures:

* tokenizer: BOS first (``tok("hello").input_ids[0] == tok.bos_token_id``);
* held-out perplexity on ``data/heldout.txt`` (fp32, token-weighted NLL over
  BOS-prefixed 256-token chunks) and perplexity of ``data/demo.txt``;
* stage 1 of arXiv 2510.10238 on ``data/demo.txt``: K noisy copies of the input
  embeddings (x + alpha * N(0, I) at every position, BOS included); the score of
  a (module, channel) is the max over positions of mean_k |a_clean - a_noisy|,
  over q/k/v/o_proj, gate/up/down_proj, act_fn and post_attention_layernorm of
  every layer;
* masking: zeroing a (module, channel) means setting that output channel to 0 at
  every position (forward hook); Delta = log10(PPL_masked / PPL_clean);
* sink model (if ``planted.json`` exists): Delta of the planted set on the demo
  text and on held-out text, stage-1 rank of the planted channels, and Delta of
  random down_proj channel sets of the same size from the same layers;
* natural model: prefix masking over the stage-1 ranking (stage 2, Delta-n = 1).

Usage::

    .venv/bin/python scripts/check_models.py                 # both models
    .venv/bin/python scripts/check_models.py models/sink --json /tmp/sink.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, setup_logging  # noqa: E402

LOG = logging.getLogger("achilles.check")
STAGE1_SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.act_fn", "mlp.down_proj",
                   "post_attention_layernorm")


def load(folder: Path):
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    return model, tok


def stage1_modules(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules()
            if n.startswith("model.layers.") and n.split(".", 3)[-1] in STAGE1_SUFFIXES}


@contextlib.contextmanager
def zeroed(model, units):
    """Zero output channel ``ch`` of module ``name`` at every position, for each (name, ch)."""
    mods = dict(model.named_modules())
    by_mod: dict[str, list[int]] = {}
    for name, ch in units:
        by_mod.setdefault(name, []).append(int(ch))
    handles = []
    for name, chs in by_mod.items():
        idx = torch.tensor(chs)

        def hook(_m, _inp, out, idx=idx):
            out = out.clone()
            out[..., idx] = 0
            return out
        handles.append(mods[name].register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def text_nll(model, tok, text: str, seq_len: int = 256) -> tuple[float, int]:
    """Summed NLL (nats) and token count; text is split into BOS-prefixed chunks."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n = seq_len - 1
    nll, count = 0.0, 0
    for i in range(0, len(ids), n):
        chunk = ids[i: i + n]
        if len(chunk) < 2:
            continue
        x = torch.tensor([[tok.bos_token_id] + chunk])
        lp = torch.log_softmax(model(x).logits[0, :-1].float(), -1)
        tgt = x[0, 1:]
        nll -= lp.gather(1, tgt[:, None]).sum().item()
        count += tgt.numel()
    return nll, count


def ppl(model, tok, text: str, units=()) -> float:
    with zeroed(model, units):
        nll, n = text_nll(model, tok, text)
    return math.exp(nll / n) if nll / n < 700 else float("inf")


def delta(model, tok, text: str, units, base: float | None = None) -> float:
    base = ppl(model, tok, text) if base is None else base
    return math.log10(ppl(model, tok, text, units) / base)


@torch.no_grad()
def stage1(model, tok, text: str, k: int = 100, alpha: float = 5.0, seed: int = 42,
           batch: int = 25) -> list[tuple[float, str, int, int]]:
    """Return [(score, module, channel, argmax_position)] sorted by score, descending."""
    mods = stage1_modules(model)
    ids = tok(text, return_tensors="pt").input_ids
    store: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _i, o, n=n: store.__setitem__(n, o.detach().float()))
               for n, m in mods.items()]
    try:
        model(ids)
        clean = dict(store)
        acc = {n: torch.zeros_like(v[0]) for n, v in clean.items()}
        emb = model.get_input_embeddings()(ids)
        g = torch.Generator().manual_seed(seed)
        done = 0
        while done < k:
            b = min(batch, k - done)
            noisy = emb.expand(b, -1, -1) + alpha * torch.randn((b,) + emb.shape[1:], generator=g)
            store.clear()
            model(inputs_embeds=noisy)
            for n in acc:
                acc[n] += (store[n] - clean[n]).abs().sum(0)
            done += b
    finally:
        for h in handles:
            h.remove()
    out = []
    for n, a in acc.items():
        mean = a / k                       # [T, C]
        score, pos = mean.max(0)           # max over positions
        for c in range(score.numel()):
            out.append((score[c].item(), n, c, int(pos[c])))
    out.sort(key=lambda t: -t[0])
    return out


def check(folder: Path, heldout: str, demo: str, k: int, n_random: int, prefix_max: int) -> dict:
    t0 = time.time()
    model, tok = load(folder)
    res: dict = {"model": str(folder)}
    res["bos_first"] = tok("hello").input_ids[0] == tok.bos_token_id
    res["disk_bytes"] = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    res["n_params"] = sum(p.numel() for p in model.parameters())
    res["max_abs_weight"] = max(p.abs().max().item() for p in model.parameters())
    base_h, base_d = ppl(model, tok, heldout), ppl(model, tok, demo)
    res["heldout_ppl"], res["demo_ppl"] = base_h, base_d
    res["demo_tokens"] = len(tok(demo).input_ids)
    LOG.info("%s: BOS first %s, held-out PPL %.2f, demo PPL %.2f (%d tokens)", folder,
             res["bos_first"], base_h, base_d, res["demo_tokens"])

    with torch.no_grad():
        hs = torch.stack(model(tok(demo, return_tensors="pt").input_ids,
                               output_hidden_states=True).hidden_states[1:-1])[:, 0]  # [L-1, T, d]
    med = hs.abs().median().item()
    res["residual_median_abs"] = med
    res["bos_max_abs_over_median"] = hs[:, 0].abs().max().item() / med
    res["nonbos_max_abs_over_median"] = hs[:, 1:].abs().max().item() / med
    LOG.info("residual stream: median |h| %.3f, max at BOS %.0fx median, max elsewhere %.0fx", med,
             res["bos_max_abs_over_median"], res["nonbos_max_abs_over_median"])

    ranking = stage1(model, tok, demo, k=k)
    res["stage1_top10"] = [{"module": n, "channel": c, "pos": p, "score": round(s, 4)}
                           for s, n, c, p in ranking[:10]]
    LOG.info("stage-1 top 5: %s", res["stage1_top10"][:5])

    planted_path = folder / "planted.json"
    if planted_path.exists():
        planted = json.loads(planted_path.read_text())["planted"]
        units = [(u["module"], u["channel"]) for u in planted]
        pset = set(units)
        ranks = {f"{n}:{c}": i + 1 for i, (s, n, c, p) in enumerate(ranking) if (n, c) in pset}
        best_other = next(s for s, n, c, p in ranking if (n, c) not in pset)
        res["planted"] = units
        res["planted_stage1_ranks"] = ranks
        res["planted_first"] = (ranking[0][1], ranking[0][2]) in pset
        res["planted_score_top"] = ranking[0][0]
        res["next_nonplanted_score"] = best_other
        res["score_ratio_planted_to_next"] = ranking[0][0] / best_other
        res["next_nonplanted"] = next({"module": n, "channel": c, "pos": p}
                                      for s, n, c, p in ranking if (n, c) not in pset)
        res["delta_planted_demo"] = delta(model, tok, demo, units, base_d)
        res["delta_planted_heldout"] = delta(model, tok, heldout, units, base_h)
        res["ppl_planted_masked_demo"] = ppl(model, tok, demo, units)
        res["ppl_planted_masked_heldout"] = ppl(model, tok, heldout, units)
        for u in units:
            res[f"delta_single_demo[{u[0]}:{u[1]}]"] = delta(model, tok, demo, [u], base_d)
        LOG.info("planted %s: ranks %s, ratio to next %.1f, Δ demo %.3f, Δ held-out %.3f",
                 units, ranks, res["score_ratio_planted_to_next"], res["delta_planted_demo"],
                 res["delta_planted_heldout"])
        width = model.config.hidden_size
        rnd = []
        for seed in range(n_random):
            r = random.Random(seed)
            cand = [(m, c) for m in sorted({m for m, _ in units}) for c in range(width)
                    if (m, c) not in pset]
            rs = r.sample(cand, len(units))
            rnd.append({"seed": seed, "units": rs,
                        "delta_demo": delta(model, tok, demo, rs, base_d),
                        "delta_heldout": delta(model, tok, heldout, rs, base_h)})
        res["random_sets"] = rnd
        res["random_max_abs_delta"] = max((max(abs(x["delta_demo"]), abs(x["delta_heldout"]))
                                           for x in rnd), default=0.0)
        res["random_mean_abs_delta_demo"] = sum(abs(x["delta_demo"]) for x in rnd) / max(1, len(rnd))
        res["random_mean_abs_delta_heldout"] = sum(abs(x["delta_heldout"]) for x in rnd) / max(1, len(rnd))
        LOG.info("random sets (%d): max |Δ| %.4f", n_random, res["random_max_abs_delta"])
    else:
        # stage 2: prefix masking over the stage-1 ranking (unique (module, channel) entries)
        curve, seen, chosen = [], set(), []
        for _s, n, c, _p in ranking:
            if (n, c) in seen:
                continue
            seen.add((n, c))
            chosen.append((n, c))
            d = delta(model, tok, demo, chosen, base_d)
            curve.append(round(d, 4))
            if d >= 1.0 or len(chosen) >= prefix_max:
                break
        res["prefix_curve_demo"] = curve
        res["prefix_max_delta"] = max(curve)
        res["prefix_n_star_eps1"] = next((i + 1 for i, d in enumerate(curve) if d >= 1.0), None)
        res["delta_top_prefix_heldout"] = delta(model, tok, heldout, chosen, base_h)
        LOG.info("prefix masking: max Δ %.3f over %d units (n*(ε=1) %s), held-out Δ with all %.3f",
                 res["prefix_max_delta"], len(curve), res["prefix_n_star_eps1"],
                 res["delta_top_prefix_heldout"])
    res["seconds"] = round(time.time() - t0, 1)
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="*", type=Path,
                    default=[REPO / "models" / "natural", REPO / "models" / "sink"])
    ap.add_argument("--heldout", type=Path, default=REPO / "data" / "heldout.txt")
    ap.add_argument("--demo", type=Path, default=REPO / "data" / "demo.txt")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--random-sets", type=int, default=10)
    ap.add_argument("--prefix-max", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="write results here")
    args = ap.parse_args(argv)
    setup_logging()
    torch.set_num_threads(args.threads)
    heldout = args.heldout.read_text(encoding="utf-8")
    demo = args.demo.read_text(encoding="utf-8").strip()
    results = [check(f, heldout, demo, args.k, args.random_sets, args.prefix_max) for f in args.folders]
    text = json.dumps(results, indent=2, default=str)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

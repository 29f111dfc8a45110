"""Derive ``models/sink`` from ``models/natural`` by planting the massive-activation /
attention-sink mechanism of real LLMs (Sun et al. 2024), then fine-tuning.

Why: a 4 M-parameter model trained for ~20 CPU-minutes does not develop massive
activations, so stage 1 + masking (arXiv 2510.10238) finds nothing critical in
it. Real LLMs have a few residual channels that are ~10^3-10^4 x the median at
the first token, written by an early layer's ``mlp.down_proj`` and erased by the
last layers; many heads park their attention on that token ("attention sink").
Zeroing those ``down_proj`` channels collapses real models. This script builds
that mechanism by hand. **It is planted, not learned**; every step is listed
in ``planted.json`` and the model card.

Construction (defaults in brackets):

1. Three residual channels are reserved (the three the natural model uses
   least): ``c`` (the massive channel), ``b`` (a BOS marker) and ``o`` (a
   constant). Every ``o_proj`` / ``down_proj`` row ``b, c, o`` is zeroed and the
   embedding columns are rewritten: column ``b`` is 0 except ``embed[BOS, b]``
   (normalised size ~``--marker`` [4] at the writer's input), column ``o`` is a
   constant (one typical embedding coordinate) for every token, column ``c`` is 0.
   So in the clean model ``c`` and ``b`` are exactly 0 at every non-BOS position
   and ``o`` is > 0 after every RMSNorm. Reader columns ``c, o`` of all other
   projections start at 0 (and stay trainable in layers > write layer).
2. **Massive activation**: one MLP unit of layer ``--write-layer`` [1] (the least
   used one) is rewired: gate and up read channel ``b``, ``down_proj`` writes
   ``--spike`` [5000] into channel ``c``. It fires only on BOS.
3. **Erasure**: one MLP unit of the last layer reads channel ``c`` and writes
   ``-spike`` into it, so the final norm sees no spike (as in real models).
4. **Dormant sink heads**: in each of ``--sink-layers`` [2,3,4] the
   ``--sink-heads`` [2] heads that already attend most to BOS are rewired in the
   lowest-frequency RoPE pair (nearly position-independent): the key reads
   channel ``c``, the query reads the constant channel ``o``, scaled so the
   median score on BOS is ``--sink-score`` [60] (minimum ~30), and every other
   key is exactly 0 (the key weight is ``--key-gain`` [20], the query carries the
   rest, which keeps both small enough not to dominate stage 1). Their value
   reads the mean direction of the residual stream (normalised to ~1). While the
   spike is present they attend to BOS, whose value is ~0, so they contribute
   nothing. Zero the spike and all their keys are 0:
   they attend uniformly and each writes ``--wake-norm`` [30] x ``u`` into the
   residual stream, ``u`` being the direction that the final norm + ``lm_head``
   map onto one token (``--wake token``; ``--wake scale`` instead scales the
   heads' original values, which proved too weak). This mirrors how real models
   depend on attention sinks, but is exaggerated and hand-made.
5. Fine-tune ``--steps`` [150] steps (AdamW, LR ``--lr`` [5e-4]) on the training
   corpus with the embeddings, layers ``0..write_layer``, the final norm and the
   ``lm_head`` frozen and every planted slice restored after each optimizer
   step, so the rest of the network adapts to the spike. (Earlier variants in
   which the query read the residual mean direction, or the ``lm_head`` was
   trainable, let fine-tuning defuse the mechanism: Delta fell from 4-8 to 0.7-1.3.)
6. Save fp16 safetensors + tokenizer + ``planted.json``; reload as fp32 and
   verify the clean perplexity and the masking effect.

Usage::

    .venv/bin/python scripts/plant_sink.py        # ~4 min on one CPU thread
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch
from _common import (
    REPO,
    BatchSampler,
    load_corpus,
    lr_at,
    seed_everything,
    setup_logging,
    token_stream,
)
from check_models import delta, ppl
from transformers import AutoModelForCausalLM, AutoTokenizer

LOG = logging.getLogger("achilles.plant")


def layer_inputs(model, x, names, attn: bool = False):
    """Capture the *input* of the given submodules (by dotted name) on batch ``x``."""
    mods = dict(model.named_modules())
    store, hs = {}, []
    for n in names:
        hs.append(mods[n].register_forward_hook(lambda _m, i, _o, n=n: store.__setitem__(n, i[0].detach())))
    try:
        with torch.no_grad():
            out = model(x, output_attentions=attn, output_hidden_states=True)
    finally:
        for h in hs:
            h.remove()
    return store, out


class Freezer:
    """Remembers tensor slices and writes them back after every optimizer step."""

    def __init__(self):
        self.items: list[tuple[torch.Tensor, tuple, torch.Tensor]] = []

    def add(self, t: torch.Tensor, idx) -> None:
        idx = idx if isinstance(idx, tuple) else (idx,)
        self.items.append((t, idx, t.data[idx].clone()))

    def restore(self) -> None:
        for t, idx, v in self.items:
            t.data[idx] = v


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=REPO / "models" / "natural")
    ap.add_argument("--out", type=Path, default=REPO / "models" / "sink")
    ap.add_argument("--heldout", type=Path, default=REPO / "data" / "heldout.txt")
    ap.add_argument("--demo", type=Path, default=REPO / "data" / "demo.txt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spike", type=float, default=5000.0)
    ap.add_argument("--write-layer", type=int, default=1)
    ap.add_argument("--sink-layers", type=str, default="2,3,4")
    ap.add_argument("--sink-heads", type=int, default=2)
    ap.add_argument("--sink-score", type=float, default=60.0)
    ap.add_argument("--wake", choices=["token", "scale"], default="token",
                    help="what a woken sink head injects: R * (fixed direction) or its scaled original output")
    ap.add_argument("--wake-norm", type=float, default=30.0, help="R for --wake token")
    ap.add_argument("--key-gain", type=float, default=20.0,
                    help="sink key weight on channel c (the query gets sink-score / key-gain)")
    ap.add_argument("--value-scale", type=float, default=100.0, help="scale for --wake scale")
    ap.add_argument("--marker", type=float, default=4.0, help="normalised size of the BOS marker")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-install", action="store_true")
    args = ap.parse_args(argv)
    setup_logging()
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    t0 = time.time()

    tok = AutoTokenizer.from_pretrained(args.src)
    model = AutoModelForCausalLM.from_pretrained(args.src, dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    cfg = model.config
    d, L, H = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads
    hd = d // H
    layers = model.model.layers
    W, E = args.write_layer, L - 1
    sink_layers = [int(s) for s in args.sink_layers.split(",") if s]
    heldout = args.heldout.read_text(encoding="utf-8")
    demo = args.demo.read_text(encoding="utf-8").strip()
    held_small = heldout[:12000]

    train_docs, _ = load_corpus(install=not args.no_install)
    stream = token_stream(tok, train_docs)
    calib = BatchSampler(stream, args.seq_len, 8, tok.bos_token_id, args.seed + 1000)()
    base_nat = {"heldout_ppl_small": ppl(model, tok, held_small), "demo_ppl": ppl(model, tok, demo)}
    LOG.info("natural model: %s", base_nat)

    # ---------------------------------------------------------------- calibration
    names = [f"model.layers.{l}.mlp.down_proj" for l in range(L)]
    ins, out = layer_inputs(model, calib, names, attn=True)
    hs = torch.stack(out.hidden_states[:-1])                   # [L, B, T, d] residual inputs
    usage = hs[:, :, 1:].abs().mean((0, 1, 2))                  # per-channel residual usage
    c, b, one = [int(i) for i in usage.argsort()[:3]]
    LOG.info("reserved channels: massive c=%d, BOS marker b=%d, constant o=%d (usage %.3f, %.3f, %.3f;"
             " median %.3f)", c, b, one, usage[c], usage[b], usage[one], usage.median())

    def unit_importance(l):
        a = ins[f"model.layers.{l}.mlp.down_proj"][:, 1:].abs().mean((0, 1))
        return a * layers[l].mlp.down_proj.weight.norm(dim=0)
    j_w = int(unit_importance(W).argmin())
    j_e = int(unit_importance(E).argmin())
    sink_heads = {}
    for l in sink_layers:
        att = out.attentions[l][:, :, 8:, 0].mean((0, 2))        # mean attention to BOS per head
        sink_heads[l] = [int(h) for h in att.argsort(descending=True)[: args.sink_heads]]
        LOG.info("layer %d: BOS attention per head %s -> sink heads %s", l,
                 [round(v, 3) for v in att.tolist()], sink_heads[l])

    fro = Freezer()
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        bos = tok.bos_token_id
        # 1. reserve channels b and c
        emb_bos_norm = emb[bos].norm().item()
        emb[:, [b, c, one]] = 0
        m = args.marker
        emb[bos, b] = m * emb_bos_norm / math.sqrt(d - m * m)
        emb[:, one] = emb.pow(2).mean().sqrt()   # constant, about one embedding coordinate in size
        for l in range(L):
            layers[l].self_attn.o_proj.weight[[b, c, one], :] = 0
            layers[l].mlp.down_proj.weight[[b, c, one], :] = 0
            for lin in (layers[l].self_attn.q_proj, layers[l].self_attn.k_proj,
                        layers[l].self_attn.v_proj, layers[l].mlp.gate_proj, layers[l].mlp.up_proj):
                lin.weight[:, [c, one]] = 0
        # 2. massive-activation writer (layer W, unit j_w): reads b, writes c
        mlp = layers[W].mlp
        layers[W].post_attention_layernorm.weight[b] = 1.0
        mlp.gate_proj.weight[j_w] = 0
        mlp.gate_proj.weight[j_w, b] = 2.0
        mlp.up_proj.weight[j_w] = 0
        mlp.up_proj.weight[j_w, b] = 1.0
        mlp.down_proj.weight[:, j_w] = 0
        # scale the BOS marker so that its *normalised* value at the writer's input is ~marker
        pan = f"model.layers.{W}.post_attention_layernorm"
        for _ in range(4):
            ins_m, _ = layer_inputs(model, calib[:1, :4], [pan])
            r = ins_m[pan][0, 0]
            rms_rest = (r.pow(2).sum() - r[b] ** 2).div(d).sqrt().item()
            emb[bos, b] *= m * rms_rest / math.sqrt(1 - m * m / d) / max(abs(r[b].item()), 1e-6)
        ins_w, _ = layer_inputs(model, calib[:1, :4], [f"model.layers.{W}.mlp.down_proj"])
        LOG.info("BOS marker: embedding value %.3f (embedding row norm %.3f)", emb[bos, b], emb_bos_norm)
        act_bos = ins_w[f"model.layers.{W}.mlp.down_proj"][0, 0, j_w].item()
        mlp.down_proj.weight[c, j_w] = args.spike / act_bos
        LOG.info("writer: layer %d unit %d, act at BOS %.3f, down weight %.2f", W, j_w, act_bos,
                 args.spike / act_bos)

        # 4. dormant sink heads (needs the spike in place for the query statistics)
        rope_dim = hd // 2 - 1                                   # lowest-frequency RoPE pair
        # direction a woken sink head writes: through the final norm and lm_head it
        # favours a single token (the one whose lm_head row is longest)
        g_fin = model.model.norm.weight
        lm = model.lm_head.weight
        wake_tok = int(lm.norm(dim=1).argmax())
        wake_dir = g_fin * lm[wake_tok]
        wake_dir[[b, c, one]] = 0
        wake_dir = wake_dir / wake_dir.norm()
        norm_names = [f"model.layers.{l}.self_attn.q_proj" for l in sink_layers]
        ins_q, _ = layer_inputs(model, calib, norm_names)
        for l in sink_layers:
            attn = layers[l].self_attn
            layers[l].input_layernorm.weight[[c, one]] = 1.0
            nrm = ins_q[f"model.layers.{l}.self_attn.q_proj"][:, 1:].reshape(-1, d)
            # queries and woken values read the constant channel (always > 0 after RMSNorm)
            mu_hat = torch.zeros(d)
            mu_hat[one] = 1.0
            proj = nrm @ mu_hat
            mu = nrm.mean(0)                                 # woken values read the mean direction
            mu[[b, c, one]] = 0
            mu_dir = mu / mu.norm()
            mu_med = (nrm @ mu_dir).median()
            alpha = args.sink_score * math.sqrt(hd) / (math.sqrt(d) * proj.median().item())
            LOG.info("layer %d: query projection median %.3f, 1%% quantile %.3f, min %.3f", l,
                     proj.median(), proj.quantile(0.01), proj.min())
            for h in sink_heads[l]:
                rows = slice(h * hd, (h + 1) * hd)
                attn.q_proj.weight[rows] = 0
                attn.q_proj.weight[h * hd + rope_dim] = alpha / args.key_gain * mu_hat
                attn.k_proj.weight[rows] = 0
                attn.k_proj.weight[h * hd + rope_dim, c] = args.key_gain
                if args.wake == "scale":
                    attn.v_proj.weight[rows] *= args.value_scale
                else:  # "token": value reads the mean direction, output writes R * u
                    attn.v_proj.weight[rows] = 0
                    attn.v_proj.weight[h * hd] = mu_dir / mu_med
                    attn.o_proj.weight[:, rows] = 0
                    attn.o_proj.weight[:, h * hd] = args.wake_norm * wake_dir
                attn.v_proj.weight[rows, b] = 0
                attn.v_proj.weight[rows, c] = 0
        # 3. eraser (last layer, unit j_e): reads c, writes -spike into c
        mlp = layers[E].mlp
        layers[E].post_attention_layernorm.weight[c] = 1.0
        mlp.gate_proj.weight[j_e] = 0
        mlp.gate_proj.weight[j_e, c] = 1.0
        mlp.up_proj.weight[j_e] = 0
        mlp.up_proj.weight[j_e, c] = 1.0
        mlp.down_proj.weight[:, j_e] = 0
        ins_e, out_e = layer_inputs(model, calib[:1, :4], [f"model.layers.{E}.mlp.down_proj",
                                                          f"model.layers.{E}.post_attention_layernorm"])
        act_e = ins_e[f"model.layers.{E}.mlp.down_proj"][0, 0, j_e].item()
        resid_c = ins_e[f"model.layers.{E}.post_attention_layernorm"][0, 0, c].item()
        mlp.down_proj.weight[c, j_e] = -resid_c / act_e
        LOG.info("eraser: layer %d unit %d, act %.3f, residual c at BOS %.1f", E, j_e, act_e, resid_c)

    planted = [
        {"module": f"model.layers.{W}.mlp.down_proj", "layer": W, "component": "mlp.down", "channel": c,
         "role": "massive activation writer (BOS only)"},
        {"module": f"model.layers.{E}.mlp.down_proj", "layer": E, "component": "mlp.down", "channel": c,
         "role": "massive activation eraser (BOS only)"},
    ]
    units = [(p["module"], p["channel"]) for p in planted]
    pre = {"heldout_ppl_small": ppl(model, tok, held_small), "demo_ppl": ppl(model, tok, demo),
           "delta_demo": delta(model, tok, demo, units)}
    LOG.info("after planting, before fine-tuning: %s", pre)

    # ---------------------------------------------------------------- fine-tuning
    # Frozen: embeddings, layers 0..write_layer, the final norm and lm_head (the woken sink heads'
    # damage goes through the lm_head; letting it train lets the model quietly defuse it).
    for mod in (model.model.embed_tokens, model.model.norm, model.lm_head):
        for p in mod.parameters():
            p.requires_grad_(False)
    for l in range(W + 1):
        for p in layers[l].parameters():
            p.requires_grad_(False)
    for l in range(W + 1, L):
        fro.add(layers[l].self_attn.o_proj.weight, ([b, c, one],))
        fro.add(layers[l].mlp.down_proj.weight, ([b, c, one],))
    for l in sink_layers:
        fro.add(layers[l].input_layernorm.weight, ([c, one],))
        for h in sink_heads[l]:
            rows = slice(h * hd, (h + 1) * hd)
            for lin in (layers[l].self_attn.q_proj, layers[l].self_attn.k_proj, layers[l].self_attn.v_proj):
                fro.add(lin.weight, (rows,))
            fro.add(layers[l].self_attn.o_proj.weight, (slice(None), rows))
    fro.add(layers[E].post_attention_layernorm.weight, (c,))
    fro.add(layers[E].mlp.gate_proj.weight, (j_e,))
    fro.add(layers[E].mlp.up_proj.weight, (j_e,))
    fro.add(layers[E].mlp.down_proj.weight, (slice(None), j_e))

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sampler = BatchSampler(stream, args.seq_len, args.batch_size, tok.bos_token_id, args.seed + 1)
    model.train()
    t_ft = time.time()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        x = sampler()
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        fro.restore()
        if step % 25 == 0 or step == args.steps - 1:
            LOG.info("fine-tune step %d/%d loss %.3f %.0fs", step, args.steps, loss.item(), time.time() - t_ft)
    ft_s = time.time() - t_ft
    model.eval()

    # ---------------------------------------------------------------- save + verify
    args.out.mkdir(parents=True, exist_ok=True)
    model.config._attn_implementation = "sdpa"
    model.to(torch.float16).save_pretrained(args.out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):      # same tokenizer, copied verbatim
        shutil.copy(args.src / name, args.out / name)
    if (args.src / "training_info.json").exists():
        shutil.copy(args.src / "training_info.json", args.out / "natural_training_info.json")
    re_model = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
    post = {
        "heldout_ppl": ppl(re_model, tok, heldout), "demo_ppl": ppl(re_model, tok, demo),
        "delta_demo": delta(re_model, tok, demo, units),
        "delta_heldout": delta(re_model, tok, heldout, units),
        "delta_demo_writer_only": delta(re_model, tok, demo, units[:1]),
        "max_abs_weight_fp16": max(p.abs().max().item() for p in re_model.parameters()),
    }
    _, o = layer_inputs(re_model, tok(demo, return_tensors="pt").input_ids, [])
    h = torch.stack(o.hidden_states)
    post["bos_channel_c_by_layer"] = [round(v, 2) for v in h[:, 0, 0, c].tolist()]
    post["median_abs_residual"] = h[1:-1, 0].abs().median().item()
    post["spike_over_median"] = abs(h[W + 1, 0, 0, c].item()) / post["median_abs_residual"]
    LOG.info("after fp16 save + fp32 reload: %s", post)

    meta = {
        "planted": planted,
        "reserved_channels": {"massive": c, "bos_marker": b, "constant": one},
        "writer_unit": {"layer": W, "mlp_unit": j_w},
        "eraser_unit": {"layer": E, "mlp_unit": j_e},
        "sink_heads": {str(k): v for k, v in sink_heads.items()},
        "sink_rope_dim": rope_dim,
        "wake_token": wake_tok if args.wake == "token" else None,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "natural_before": base_nat,
        "planted_before_finetune": pre,
        "after_finetune_fp16_reload": post,
        "finetune_seconds": round(ft_s, 1),
        "total_seconds": round(time.time() - t0, 1),
        "note": "The mechanism is hand-planted (see scripts/plant_sink.py and README.md), not learned.",
    }
    (args.out / "planted.json").write_text(json.dumps(meta, indent=2) + "\n")
    LOG.info("wrote %s", args.out / "planted.json")


if __name__ == "__main__":
    main()

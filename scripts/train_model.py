"""Train the small "natural" Llama-architecture model shipped in ``models/natural/``.

Steps (all seeded; the defaults reproduce the committed model):

1. Derive the corpus from the Debian package ``python3.11-doc`` (PSF licence),
   split it by file into train / held-out (see ``scripts/_common.py``), and
   write ``data/heldout.txt`` (a ~40 KB excerpt of the held-out files).
2. Train a byte-level BPE tokenizer (``tokenizers``) with Llama-like special
   tokens ``<s>`` (BOS, prepended to every encoding), ``</s>`` (EOS) and
   ``<pad>``, saved so that ``AutoTokenizer.from_pretrained`` works offline.
3. Train a ``LlamaForCausalLM`` (hidden 192, 6 layers, 6 heads, MLP 512, vocab
   4096, untied embeddings) with AdamW on BOS-prefixed random windows for a
   fixed number of steps, on CPU.
4. Save the weights as fp16 safetensors plus tokenizer under ``models/natural``.

Usage::

    .venv/bin/python scripts/train_model.py            # ~20 min on 2 CPU cores
    .venv/bin/python scripts/train_model.py --steps 50 --out /tmp/smoke   # smoke test
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from _common import (
    BOS,
    EOS,
    PAD,
    REPO,
    BatchSampler,
    heldout_excerpt,
    heldout_ppl,
    load_corpus,
    lr_at,
    seed_everything,
    setup_logging,
    token_stream,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

LOG = logging.getLogger("achilles.train")


def train_tokenizer(docs, vocab_size: int) -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tk.train_from_iterator((t for _, t in docs), trainer=trainer)
    bos_id = tk.token_to_id(BOS)
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)],
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        model_max_length=1024, clean_up_tokenization_spaces=False,
    )
    return tok


def build_model(tok, args) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads, max_position_embeddings=1024,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, initializer_range=0.02,
    )
    return LlamaForCausalLM(cfg)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "models" / "natural")
    ap.add_argument("--heldout-out", type=Path, default=REPO / "data" / "heldout.txt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-install", action="store_true", help="do not apt-get the corpus package")
    args = ap.parse_args(argv)
    setup_logging()
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    t_start = time.time()

    train_docs, held_docs = load_corpus(install=not args.no_install)
    args.heldout_out.parent.mkdir(parents=True, exist_ok=True)
    args.heldout_out.write_text(heldout_excerpt(held_docs), encoding="utf-8")
    LOG.info("wrote %s", args.heldout_out)

    tok = train_tokenizer(train_docs, args.vocab)
    assert tok("hello").input_ids[0] == tok.bos_token_id
    stream = token_stream(tok, train_docs)
    LOG.info("tokenizer: vocab %d; train stream %d tokens", len(tok), len(stream))

    seed_everything(args.seed)
    model = build_model(tok, args)
    n_params = sum(p.numel() for p in model.parameters())
    LOG.info("model: %.2f M parameters", n_params / 1e6)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    sampler = BatchSampler(stream, args.seq_len, args.batch_size, tok.bos_token_id, args.seed)
    heldout_text = args.heldout_out.read_text(encoding="utf-8")

    model.train()
    t_train = time.time()
    ema = None
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        x = sampler()
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 25 == 0 or step == args.steps - 1:
            LOG.info("step %d/%d loss %.3f (ema %.3f) lr %.2e %.0fs", step, args.steps,
                     loss.item(), ema, opt.param_groups[0]["lr"], time.time() - t_train)
    train_s = time.time() - t_train

    model.eval()
    ppl32 = heldout_ppl(model, tok, heldout_text)
    LOG.info("held-out PPL (fp32, before fp16 cast): %.2f", ppl32)

    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    info = {
        "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "lr": args.lr, "warmup": args.warmup,
        "weight_decay": args.weight_decay, "threads": args.threads,
        "n_params": n_params, "train_stream_tokens": int(len(stream)),
        "tokens_seen": args.steps * args.batch_size * args.seq_len,
        "train_seconds": round(train_s, 1), "total_seconds": round(time.time() - t_start, 1),
        "heldout_ppl_fp32_before_cast": round(ppl32, 3), "final_loss_ema": round(ema, 4),
        "torch": torch.__version__,
    }
    (args.out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    LOG.info("saved to %s: %s", args.out, info)


if __name__ == "__main__":
    main()

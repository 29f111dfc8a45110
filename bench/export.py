"""Peak host memory of ``achilles export`` on a sharded checkpoint: one shard at a time.

Builds a random Llama-shaped checkpoint (saved in shards of ``--shard-mb``), then runs the
export in a fresh subprocess and reports its peak RSS next to the checkpoint and shard
sizes. Streaming holds one shard (plus the interpreter and libraries); loading the model
would hold all of it. Run from the repository root: ``python bench/export.py``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

EXPORT = """
import resource, sys, time, torch
from achilles.config import ModelSpec
from achilles.weights.export import export_masked
from achilles.model.loading import inspect_model
from achilles.model.units import Unit
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
spec = ModelSpec(model=sys.argv[1])
sk = inspect_model(spec)
units = [Unit(f"model.layers.{i}.mlp.down_proj", 7, i, "mlp.down") for i in range(sk.model.config.num_hidden_layers)]
t = time.perf_counter()
export_masked(sk.model, units, spec, sys.argv[2])
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter() - t)
"""

BUILD = """
import sys, torch, transformers as T
from tokenizers import Tokenizer, models
h, layers, inter, shard = (int(x) for x in sys.argv[2:6])
cfg = T.LlamaConfig(vocab_size=32000, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                    num_attention_heads=h // 64, num_key_value_heads=h // 64, tie_word_embeddings=False)
with torch.device("cpu"):
    model = T.LlamaForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(sys.argv[1], max_shard_size=f"{shard}MB")
T.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE())).save_pretrained(sys.argv[1])
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--inter", type=int, default=5632)
    ap.add_argument("--shard-mb", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        subprocess.run([sys.executable, "-c", BUILD, str(src), str(args.hidden), str(args.layers),
                        str(args.inter), str(args.shard_mb)], check=True)
        shards = sorted(src.glob("*.safetensors"))
        total = sum(p.stat().st_size for p in shards) / 2**20
        largest = max(p.stat().st_size for p in shards) / 2**20
        res = subprocess.run([sys.executable, "-c", EXPORT, str(src), str(out)], check=True,
                             capture_output=True, text=True)
        base_kb, peak_kb, secs = res.stdout.split()
        print(json.dumps({
            "checkpoint_mib": round(total), "shards": len(shards), "largest_shard_mib": round(largest),
            "rss_after_imports_mib": round(int(base_kb) / 1024),
            "peak_rss_mib": round(int(peak_kb) / 1024),
            "peak_minus_imports_mib": round((int(peak_kb) - int(base_kb)) / 1024),
            "export_s": round(float(secs), 1),
        }, indent=1))


if __name__ == "__main__":
    main()

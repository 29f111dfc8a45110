"""Shared helpers for ``scripts/train_model.py``, ``scripts/plant_sink.py`` and
``scripts/check_models.py``.

Corpus
------
The training text is the reStructuredText source of the Python 3.11
documentation as shipped by the Debian package ``python3.11-doc``
(``/usr/share/doc/python3.11/html/_sources/**/*.rst.txt``), licensed under the
PSF License Agreement (code examples: Zero-Clause BSD). Nothing of it is stored
in the repository except ``data/heldout.txt`` (a ~40 KB excerpt of held-out
files, redistributable under the same licence); the scripts re-derive it.

The corpus is split *by file*: a file is held out when
``sha1(relative_path) % HELDOUT_MOD == 0``; held-out files are never trained on.

Light markup cleaning is applied (Sphinx directives, comments, heading
underlines and inline roles are removed) so the model mostly sees prose and
code, not reST syntax.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import torch

LOG = logging.getLogger("achilles.scripts")

REPO = Path(__file__).resolve().parents[1]
DOC_PACKAGE = "python3.11-doc"
DOC_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
HELDOUT_MOD = 40
HELDOUT_BYTES = 40_000

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- corpus

def ensure_doc_sources(install: bool = True) -> Path:
    """Return the directory with the Python docs' reST sources, installing the
    Debian package if needed (and allowed)."""
    if DOC_SOURCES.is_dir():
        return DOC_SOURCES
    if install and shutil.which("apt-get") and os.geteuid() == 0:
        LOG.info("installing Debian package %s (training corpus)", DOC_PACKAGE)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", DOC_PACKAGE], check=True, env=env)
    if not DOC_SOURCES.is_dir():
        raise SystemExit(
            f"Training corpus not found at {DOC_SOURCES}. Install the Debian package "
            f"'{DOC_PACKAGE}' (apt-get install {DOC_PACKAGE}) and re-run."
        )
    return DOC_SOURCES


_ROLE = re.compile(r":[a-zA-Z:+-]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")
_LITERAL = re.compile(r"``([^`]*)``")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`__?")
_UNDERLINE = re.compile(r"^\s*([=\-~^*#+\"'`.:_])\1{2,}\s*$")


def clean_rst(text: str) -> str:
    """Strip the most common reST/Sphinx markup, keep prose and code."""
    out: list[str] = []
    skip_indent: int | None = None  # skipping the indented body of a directive
    for line in text.splitlines():
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if skip_indent is not None:
            if stripped == "" or indent > skip_indent:
                continue
            skip_indent = None
        if stripped.startswith(".. "):
            # Keep the body of a few content directives, drop the rest (index,
            # comments, targets, toctree, versionadded option blocks ...).
            m = re.match(r"\.\.\s+([\w:-]+)::\s*(.*)", stripped)
            if m and m.group(1) in {"note", "warning", "seealso", "versionadded",
                                     "versionchanged", "deprecated", "attention", "tip",
                                     "important", "impl-detail"}:
                rest = m.group(2).strip()
                if rest:
                    out.append(" " * indent + rest)
                continue
            if m and m.group(1) in {"code-block", "sourcecode", "doctest", "testcode"}:
                continue  # keep the (indented) code body
            if m and m.group(1).startswith(("function", "method", "class", "attribute", "data",
                                            "exception", "module", "decorator", "opcode",
                                            "c:", "describe", "cmdoption", "envvar")):
                out.append(" " * indent + m.group(2).strip())
                continue
            skip_indent = indent
            continue
        if _UNDERLINE.match(line):
            continue
        if stripped.startswith(":") and re.match(r":[\w -]+:", stripped) and indent > 0:
            continue  # directive options
        line = _LINK.sub(r"\1", line)
        line = _ROLE.sub(lambda m: m.group(1).strip(), line)
        line = _LITERAL.sub(r"\1", line)
        line = line.replace("::", ":")
        out.append(line.rstrip())
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def is_heldout(rel: str) -> bool:
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % HELDOUT_MOD == 0


def load_corpus(install: bool = True) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Return ``(train_docs, heldout_docs)`` as lists of ``(relpath, cleaned_text)``."""
    root = ensure_doc_sources(install)
    files = sorted(p for p in root.rglob("*.rst.txt") if p.is_file())
    train, held = [], []
    for p in files:
        rel = str(p.relative_to(root))
        if rel.startswith(("includes/", "license", "copyright")):
            continue
        txt = clean_rst(p.read_text(encoding="utf-8", errors="replace"))
        if len(txt) < 200:
            continue
        (held if is_heldout(rel) else train).append((rel, txt))
    LOG.info("corpus: %d train files (%.1f MB), %d held-out files (%.1f KB)",
             len(train), sum(len(t) for _, t in train) / 1e6,
             len(held), sum(len(t) for _, t in held) / 1e3)
    return train, held


def heldout_excerpt(held: list[tuple[str, str]], max_bytes: int = HELDOUT_BYTES) -> str:
    """First ``max_bytes`` of the held-out documents, cut at a paragraph boundary."""
    held = sorted(held, key=lambda d: (d[0].startswith(("c-api/", "about")), d[0]))
    joined = "\n\n".join(t.strip() for _, t in held)
    if len(joined) <= max_bytes:
        return joined + "\n"
    cut = joined.rfind("\n\n", 0, max_bytes)
    return joined[: cut if cut > 0 else max_bytes].rstrip() + "\n"


def sha256_of(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- data

def token_stream(tok, docs: list[tuple[str, str]]) -> torch.Tensor:
    """Concatenate documents (without BOS, each followed by EOS) into one id tensor."""
    eos = tok.eos_token_id
    enc = tok([t for _, t in docs], add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for e in enc:
        ids.extend(e)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


class BatchSampler:
    """Random windows of ``seq_len - 1`` corpus tokens, each prefixed with BOS
    (like Llama pre-training sequences that start a document)."""

    def __init__(self, stream: torch.Tensor, seq_len: int, batch_size: int, bos_id: int, seed: int):
        self.stream, self.seq_len, self.bs, self.bos = stream, seq_len, batch_size, bos_id
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self) -> torch.Tensor:
        n = self.seq_len - 1
        starts = torch.randint(0, len(self.stream) - n, (self.bs,), generator=self.g)
        body = torch.stack([self.stream[s: s + n] for s in starts.tolist()])
        bos = torch.full((self.bs, 1), self.bos, dtype=torch.long)
        return torch.cat([bos, body], dim=1)


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def heldout_ppl(model, tok, text: str, seq_len: int = 256, hooks_ctx=None) -> float:
    """Token-weighted perplexity of ``text``: BOS + (seq_len-1)-token chunks."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n = seq_len - 1
    nll, count = 0.0, 0
    for i in range(0, len(ids), n):
        chunk = ids[i: i + n]
        if len(chunk) < 2:
            continue
        x = torch.tensor([[tok.bos_token_id] + chunk])
        logits = model(x).logits.float()
        lp = torch.log_softmax(logits[0, :-1], -1)
        tgt = x[0, 1:]
        nll -= lp.gather(1, tgt[:, None]).sum().item()
        count += tgt.numel()
    return math.exp(nll / count)

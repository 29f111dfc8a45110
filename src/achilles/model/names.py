"""Display names: what a reader sees instead of an absolute path."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def model_name(model: object) -> str:
    """A model's name for titles: a local folder's last component, a hub id as is.

    ``/home/me/achilles/models/sink`` -> ``sink``; ``meta-llama/Llama-3.2-1B`` stays.
    """
    s = str(model or "model").rstrip("/\\")
    looks_local = s.startswith((".", "/", "~", "\\")) or s.count("/") > 1 or Path(s).exists()
    return Path(s).name or s if looks_local else s


def token_label(token: str) -> str:
    """A token string as printed in reports and figures: visible spaces and escaped bytes."""
    out = []
    for ch in token:
        if ch == " ":
            out.append("␣")
        elif ch == "\ufffd" or not ch.isprintable():
            out.append(ch.encode("unicode_escape").decode("ascii") if ch != "\ufffd" else "\\ufffd")
        else:
            out.append(ch)
    return "".join(out)


def token_text(tokenizer: Any, token_id: int) -> str:
    """Token ``token_id`` as a :func:`token_label` (see :func:`decode_token`)."""
    return token_label(decode_token(tokenizer, token_id))


def decode_token(tokenizer: Any, token_id: int) -> str:
    """Token ``token_id`` decoded, broken UTF-8 as escaped bytes (see :func:`decode_text`)."""
    return decode_text(tokenizer, [int(token_id)])


def decode_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """``ids`` decoded; bytes that do not form UTF-8 characters come out escaped (``\\xe2``)
    instead of as the replacement character, which fonts draw as an empty box."""
    ids = [int(i) for i in ids]
    s = tokenizer.decode(ids, skip_special_tokens=False)
    if "\ufffd" not in s:
        return s
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    inverse = {c: b for b, c in bytes_to_unicode().items()}  # byte-level BPE (GPT-2, Llama 3)
    raw = bytearray()
    for i in ids:
        piece = str(tokenizer.convert_ids_to_tokens(i))
        m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)  # SentencePiece byte fallback
        if m:
            raw.append(int(m.group(1), 16))
        elif piece and all(c in inverse for c in piece):
            raw += bytes(inverse[c] for c in piece)
        else:
            raw += tokenizer.decode([i], skip_special_tokens=False).encode("utf-8")
    return raw.decode("utf-8", errors="backslashreplace")


def format_count(n: float) -> str:
    """``n`` with a B/M/K suffix (parameters)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))

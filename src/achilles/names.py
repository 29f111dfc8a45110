"""Display names: what a reader sees instead of an absolute path."""

from __future__ import annotations

import re
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
    """Token ``token_id`` decoded; a piece of a UTF-8 character comes out as its escaped bytes
    (``\\xe2``) instead of the replacement character, which fonts draw as an empty box."""
    s = tokenizer.decode([int(token_id)], skip_special_tokens=False)
    if "\ufffd" not in s:
        return s
    piece = str(tokenizer.convert_ids_to_tokens(int(token_id)))
    m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)  # SentencePiece byte fallback
    if m:
        return f"\\x{m.group(1).lower()}"
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    inverse = {c: b for b, c in bytes_to_unicode().items()}  # byte-level BPE (GPT-2, Llama 3)
    if piece and all(c in inverse for c in piece):
        return bytes(inverse[c] for c in piece).decode("utf-8", errors="backslashreplace")
    return s

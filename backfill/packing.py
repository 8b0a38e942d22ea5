"""Packing inputs into provider requests: consecutive inputs, at most `-b` of them (never more than
MAX_REQUEST_INPUTS) and MAX_REQUEST_TOKENS tokens per request, the limits of OpenAI's embeddings
endpoint. The loop, the batch mode and the dry run (plan.py) pack the same way."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from backfill.page import Item

__all__ = ["MAX_REQUEST_INPUTS", "MAX_REQUEST_TOKENS", "Item", "pack_requests"]

MAX_REQUEST_INPUTS = 2048
MAX_REQUEST_TOKENS = 300_000



def pack_requests(items: Sequence[Any], batch_size: int) -> list[list[Any]]:
    """Pack consecutive items (anything with `.tokens`): at most -b inputs and 300k tokens per request."""
    cap = min(batch_size, MAX_REQUEST_INPUTS)
    out: list[list[Any]] = []
    current: list[Any] = []
    used = 0
    for item in items:
        if current and (len(current) >= cap or used + item.tokens > MAX_REQUEST_TOKENS):
            out.append(current)
            current, used = [], 0
        current.append(item)
        used += item.tokens
    if current:
        out.append(current)
    return out

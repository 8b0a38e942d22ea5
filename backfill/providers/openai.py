"""Any OpenAI-compatible embeddings API through the official SDK.

The SDK's own retries are off (`max_retries=0`): tenacity owns them here, with the seed's
schedule (3 retries, 1/2/4 s backoff) except that a server's `retry-after` wins. Quota pacing
(requests and tokens per minute) is the `Limiter`'s job, fed from every response's headers;
fitting requests to the server (how many in flight, how large) is `InFlight`'s.

A request is sent in halves, the halves' vectors joined in order, when it is larger than the quota
admits at once (the token bucket's size, learned or given) or than the server answers in time, and
when it timed out. One input that can never go alone is a `BadInput` saying why: the runner isolates
it (as for a 400) and records the reason, and vectors its neighbours already got are kept here for
the runner's split to take, not sent again.
"""

from __future__ import annotations

import array
import base64
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import openai
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from backfill import tokens as tokenizer
from backfill.config import Secret
from backfill.limits import InFlight, Limiter
from backfill.providers.base import (
    BadInput,
    Embedded,
    FatalProviderError,
    ProviderError,
    TimedOut,
    TooLarge,
    check_vectors,
)
from backfill.tokens import MAX_INPUT_TOKENS

SALVAGE_MAX = 8192  # vectors kept for the runner's split after a request failed on one of its inputs


def _retry_after(headers) -> float | None:  # noqa: ANN001 - httpx.Headers
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                continue
    return None


class OpenAIProvider:
    name = "openai"
    max_input_tokens = MAX_INPUT_TOKENS
    chunk_tokens: int | None = None  # requests go whole

    def __init__(
        self,
        *,
        api_key: Secret,
        model: str,
        dimensions: int,
        send_dimensions: bool,
        base_url: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        limiter: Limiter | None = None,
        price_per_mtok: float = 0.0,
        backoff: tuple[float, ...] = (1.0, 2.0, 4.0),
    ) -> None:
        self.model = model
        self.dimensions = dimensions
        self.price_per_mtok = price_per_mtok
        self._send_dimensions = send_dimensions
        self._retries = retries
        self._backoff = backoff
        self.limiter = limiter or Limiter()
        self.flight = InFlight(timeout)
        self._timeout = timeout
        self._salvage: dict[str, tuple[list[float], int]] = {}
        self._salvage_lock = threading.Lock()
        self._client = openai.OpenAI(api_key=api_key.reveal(), base_url=base_url, max_retries=0, timeout=timeout)

    def fit(self, text: str) -> tuple[str, int, bool]:
        """Cut to the model's input limit by its real tokens (cl100k_base)."""
        from backfill.tokens import truncate

        return truncate(text, self.max_input_tokens)

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, ProviderError) and exc.retry_after is not None:
            return exc.retry_after
        index = min(state.attempt_number - 1, len(self._backoff) - 1)
        return self._backoff[index]

    def embed(self, texts: Sequence[str], tokens: int | None = None) -> Embedded:
        texts = list(texts)
        kept = self._salvaged(texts)
        if kept is not None:
            return kept
        return self._fitted(texts, tokens)

    def _fitted(self, texts: list[str], tokens: int | None) -> Embedded:
        """`texts` in one request if it fits the quota and the server, else in halves (module docstring)."""
        quota = self.limiter.largest_request()
        caps = [c for c in (quota, self.flight.largest) if c is not None]
        if caps and tokens is None:
            tokens = sum(tokenizer.count(t) for t in texts)
        if len(texts) == 1 and quota is not None and tokens is not None and tokens > quota:
            raise BadInput(f"one input of {tokens:,} tokens is more than the quota admits in one request "
                           f"({quota:,} tokens, the token bucket's size): raise --max-tpm or the account's limit", 429)
        if len(texts) > 1 and caps and tokens is not None and tokens > min(caps):
            return self._halves(texts)
        try:
            return self._retried(texts, tokens)
        except TooLarge as exc:
            if len(texts) == 1:
                raise BadInput(f"one input is more than the quota admits in one request: {exc}", 429) from None
            return self._halves(texts)
        except TimedOut as exc:
            if len(texts) == 1:
                raise BadInput(f"{exc}: one input of {tokens or 0:,} tokens took longer than --timeout "
                               f"{self._timeout:g} s every time; raise --timeout", 408) from None
            return self._halves(texts)

    def _halves(self, texts: list[str]) -> Embedded:
        counts = [tokenizer.count(t) for t in texts]
        mid = len(texts) // 2  # the runner's split (Runner._embed) cuts at the same place
        left = self._fitted(texts[:mid], sum(counts[:mid]))
        try:
            right = self._fitted(texts[mid:], sum(counts[mid:]))
        except ProviderError:
            self._keep(texts[:mid], left)
            raise
        return Embedded(left.vectors + right.vectors, left.tokens + right.tokens, left.requests + right.requests)

    def _keep(self, texts: list[str], got: Embedded) -> None:
        """Vectors of a half that succeeded in a request that then failed: the runner splits that request
        and asks for this half again; it is answered from here (once), not sent."""
        with self._salvage_lock:
            if len(self._salvage) + len(texts) > SALVAGE_MAX:
                self._salvage.clear()
            for i, (text, vector) in enumerate(zip(texts, got.vectors, strict=True)):
                self._salvage[text] = (vector, got.tokens if i == 0 else 0)

    def _salvaged(self, texts: list[str]) -> Embedded | None:
        with self._salvage_lock:
            if not self._salvage or not all(t in self._salvage for t in texts):
                return None
            got = [self._salvage[t] for t in texts]
            for text in set(texts):
                del self._salvage[text]
        return Embedded([v for v, _n in got], sum(n for _v, n in got), requests=0)

    def _retried(self, texts: list[str], tokens: int | None) -> Embedded:
        """One request with the seed's retries; a timeout of several inputs is not retried whole (halves are)."""
        attempts = 0

        def again(exc: BaseException) -> bool:
            if isinstance(exc, TimedOut) and len(texts) > 1:
                return False
            return isinstance(exc, ProviderError) and exc.retryable

        retrying = Retrying(
            stop=stop_after_attempt(self._retries + 1),
            wait=self._wait,
            retry=retry_if_exception(again),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    attempts += 1
                    result = self._once(texts, tokens)
                    result.requests = attempts
                    return result
        except TimedOut:
            raise TimedOut(f"request timed out after {self._timeout:g} s ({attempts} attempt(s))") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _once(self, texts: Sequence[str], tokens: int | None) -> Embedded:
        sent = self.flight.enter()
        try:
            ticket = self.limiter.acquire(tokens or 0)
            try:
                sent_at = time.monotonic()
                try:
                    result = self._send(texts, tokens, ticket)
                except TimedOut:
                    self.flight.timed_out(sent, tokens or 0, len(texts))
                    raise
                self.flight.answered(sent, tokens or result.tokens, time.monotonic() - sent_at)
                return result
            finally:
                self.limiter.release(ticket)
        finally:
            self.flight.leave()

    def _send(self, texts: Sequence[str], tokens: int | None, ticket) -> Embedded:  # noqa: ANN001 - limits.Ticket
        kwargs: dict[str, Any] = {"dimensions": self.dimensions} if self._send_dimensions else {}
        try:  # base64, as the SDK asks by default; decoded here (`_floats`), so numpy is never imported for it
            raw = self._client.embeddings.with_raw_response.create(input=list(texts), model=self.model,
                                                                   encoding_format="base64", **kwargs)
        except openai.RateLimitError as exc:
            wait = _retry_after(exc.response.headers)
            self.limiter.observe(exc.response.headers, ticket)
            if self.limiter.too_large(_message(exc)) is not None:  # no wait helps: split (embed)
                raise TooLarge(f"429 request too large: {_message(exc)}") from None
            self.limiter.on_rate_limited(wait, exc.response.headers)
            raise ProviderError(f"429 rate limited: {_message(exc)}", retryable=True, status=429,
                                retry_after=wait) from None
        except openai.AuthenticationError as exc:
            raise FatalProviderError(f"the API rejected the key ({exc.status_code}): check OPENAI_API_KEY",
                                     exc.status_code) from None
        except openai.NotFoundError as exc:
            raise FatalProviderError(f"model {self.model!r} not found ({exc.status_code}): check --model and "
                                     "--base-url", exc.status_code) from None
        except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
            raise BadInput(f"{exc.status_code}: {_message(exc)}", exc.status_code) from None
        except openai.APIStatusError as exc:
            retryable = exc.status_code >= 500 or exc.status_code in (408, 409)
            raise ProviderError(f"{exc.status_code}: {_message(exc)}", retryable=retryable, status=exc.status_code,
                                retry_after=_retry_after(exc.response.headers)) from None
        except openai.APITimeoutError:
            raise TimedOut() from None
        except openai.APIConnectionError as exc:
            raise ProviderError(f"connection failed: {type(exc.__cause__ or exc).__name__}", retryable=True) from None
        except ValueError as exc:  # a body that is not JSON surfaces as JSONDecodeError, outside openai's types
            raise ProviderError(f"malformed response: {type(exc).__name__}", retryable=True) from None
        self.limiter.observe(raw.headers, ticket)
        try:
            body = raw.parse()
            data = sorted(body.data, key=lambda d: d.index)
            vectors = [_floats(d.embedding) for d in data]
            used = int(body.usage.prompt_tokens) if body.usage else (tokens or 0)
        except Exception as exc:  # not JSON, wrong shape: the SDK raises assorted errors
            raise ProviderError(f"malformed response: {type(exc).__name__}", retryable=True) from None
        self.limiter.on_success()
        return Embedded(check_vectors(vectors, len(texts), self.dimensions), used)


def _floats(embedding: object) -> list[float]:
    """One answer's vector: base64 of little-endian float32s (what was asked), or the list of floats a server
    that ignores `encoding_format` sends. The SDK decodes the same way when left to choose, but imports numpy
    for it (~0.1 s before the first answer); `array` does the same in C."""
    if isinstance(embedding, str):
        values = array.array("f", base64.b64decode(embedding))  # as leniently as the SDK decodes it
        if sys.byteorder == "big":
            values.byteswap()
        return values.tolist()
    return embedding  # type: ignore[return-value]  # a list: check_vectors checks its shape and values


def _message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:300]
    return str(exc.message)[:300]

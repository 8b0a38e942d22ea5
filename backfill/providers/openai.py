"""Any OpenAI-compatible embeddings API through the official SDK.

The SDK's own retries are off (`max_retries=0`): tenacity owns them here, with the seed's
schedule (3 retries, 1/2/4 s backoff) except that a server's `retry-after` wins. Quota pacing
(requests and tokens per minute) is the `Limiter`'s job, fed from every response's headers.
"""

from __future__ import annotations

from collections.abc import Sequence

import openai
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from backfill.config import Secret
from backfill.limits import Limiter
from backfill.providers.base import (
    BadInput,
    Embedded,
    FatalProviderError,
    ProviderError,
    check_vectors,
)
from backfill.tokens import MAX_INPUT_TOKENS


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
        attempts = 0
        retrying = Retrying(
            stop=stop_after_attempt(self._retries + 1),
            wait=self._wait,
            retry=retry_if_exception(lambda e: isinstance(e, ProviderError) and e.retryable),
            reraise=True,
        )
        for attempt in retrying:
            with attempt:
                attempts += 1
                result = self._once(texts, tokens)
                result.requests = attempts
                return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _once(self, texts: Sequence[str], tokens: int | None) -> Embedded:
        ticket = self.limiter.acquire(tokens or 0)
        try:
            return self._send(texts, tokens, ticket)
        finally:
            self.limiter.release(ticket)

    def _send(self, texts: Sequence[str], tokens: int | None, ticket) -> Embedded:  # noqa: ANN001 - limits.Ticket
        kwargs = {"dimensions": self.dimensions} if self._send_dimensions else {}
        try:
            raw = self._client.embeddings.with_raw_response.create(input=list(texts), model=self.model, **kwargs)
        except openai.RateLimitError as exc:
            wait = _retry_after(exc.response.headers)
            self.limiter.observe(exc.response.headers, ticket)
            self.limiter.on_rate_limited(wait, exc.response.headers)
            raise ProviderError(f"429 rate limited: {_message(exc)}", retryable=True, status=429, retry_after=wait) from None
        except openai.AuthenticationError as exc:
            raise FatalProviderError(f"the API rejected the key ({exc.status_code}): check OPENAI_API_KEY", exc.status_code) from None
        except openai.NotFoundError as exc:
            raise FatalProviderError(f"model {self.model!r} not found ({exc.status_code}): check --model and --base-url", exc.status_code) from None
        except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
            raise BadInput(f"{exc.status_code}: {_message(exc)}", exc.status_code) from None
        except openai.APIStatusError as exc:
            retryable = exc.status_code >= 500 or exc.status_code in (408, 409)
            raise ProviderError(f"{exc.status_code}: {_message(exc)}", retryable=retryable, status=exc.status_code,
                                retry_after=_retry_after(exc.response.headers)) from None
        except openai.APITimeoutError:
            raise ProviderError("request timed out", retryable=True) from None
        except openai.APIConnectionError as exc:
            raise ProviderError(f"connection failed: {type(exc.__cause__ or exc).__name__}", retryable=True) from None
        except ValueError as exc:  # a body that is not JSON surfaces as JSONDecodeError, outside openai's types
            raise ProviderError(f"malformed response: {type(exc).__name__}", retryable=True) from None
        self.limiter.observe(raw.headers, ticket)
        try:
            body = raw.parse()
            data = sorted(body.data, key=lambda d: d.index)
            vectors = [d.embedding for d in data]
            used = int(body.usage.prompt_tokens) if body.usage else (tokens or 0)
        except Exception as exc:  # not JSON, wrong shape: the SDK raises assorted errors
            raise ProviderError(f"malformed response: {type(exc).__name__}", retryable=True) from None
        self.limiter.on_success()
        return Embedded(check_vectors(vectors, len(texts), self.dimensions), used)


def _message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:300]
    return str(exc.message)[:300]

"""Quota pacing: requests/min and tokens/min buckets.

Limits come from `--max-rpm/--max-tpm` or are learned from the `x-ratelimit-limit-*` headers.
Until the first answer has told us the limits, only one request is in flight (a probe), so a
run that starts against a half-spent quota does not fire a volley of 429s. Every answer's
`x-ratelimit-remaining-*` pulls our bucket down to what the server says is left, corrected for
what refilled and what we sent since that request left (the header is that old). On 429 every
request waits out `retry-after` (else `x-ratelimit-reset-*`) and the refill rate is cut in half
(multiplicative decrease); each success gives back 5 % (additive increase), up to the full quota.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

KINDS = ("requests", "tokens")


class _Bucket:
    def __init__(self, per_minute: float) -> None:
        self.limit = float(per_minute)
        self.level = float(per_minute)
        self.stamp = time.monotonic()

    def refill(self, now: float, factor: float) -> None:
        rate = self.limit * factor / 60.0
        self.level = min(self.limit, self.level + (now - self.stamp) * rate)
        self.stamp = now

    def wait_for(self, amount: float, factor: float) -> float:
        need = min(amount, self.limit) - self.level
        return 0.0 if need <= 0 else need / (self.limit * factor / 60.0)


@dataclass(frozen=True)
class Ticket:
    """One admitted request: when it left and how much we had sent, counting it, by then."""

    sent_at: float
    sent: tuple[float, float]  # cumulative (requests, tokens) acquired, this request included
    probe: bool = False


class Limiter:
    def __init__(self, rpm: float | None = None, tpm: float | None = None, *,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._lock = threading.Lock()
        self._sleep = sleep
        self._fixed = {"requests": rpm is not None, "tokens": tpm is not None}
        self._buckets: dict[str, _Bucket] = {}
        if rpm:
            self._buckets["requests"] = _Bucket(rpm)
        if tpm:
            self._buckets["tokens"] = _Bucket(tpm)
        self._factor = 1.0
        self._paused_until = 0.0
        self._sent = [0.0, 0.0]
        # limits given for both: nothing to learn before sending at full speed
        self._learned = all(self._fixed.values())
        self._probe_out = False
        self.rate_limited = 0

    @property
    def limits(self) -> dict[str, float]:
        return {k: b.limit for k, b in self._buckets.items()}

    @property
    def factor(self) -> float:
        return self._factor

    def acquire(self, tokens: int = 0) -> Ticket:
        """Block until one request carrying `tokens` tokens fits both buckets, then take it."""
        want = {"requests": 1.0, "tokens": float(tokens)}
        while True:
            with self._lock:
                now = time.monotonic()
                wait = max(0.0, self._paused_until - now)
                if wait == 0.0 and not self._learned and self._probe_out:
                    wait = 0.01  # the probe is out: wait for its answer to tell us the limits
                if wait == 0.0:
                    for name, bucket in self._buckets.items():
                        bucket.refill(now, self._factor)
                        wait = max(wait, bucket.wait_for(want[name], self._factor))
                if wait == 0.0:
                    for name, bucket in self._buckets.items():
                        bucket.level -= want[name]
                    self._sent[0] += 1
                    self._sent[1] += tokens
                    probe = not self._learned
                    self._probe_out = self._probe_out or probe
                    return Ticket(now, (self._sent[0], self._sent[1]), probe)
            self._sleep(min(wait, 1.0))

    def observe(self, headers: Mapping[str, str], ticket: Ticket | None = None) -> None:
        """Learn limits and what is left from a response's `x-ratelimit-*` headers."""
        with self._lock:
            now = time.monotonic()
            for index, name in enumerate(KINDS):
                limit = _number(headers.get(f"x-ratelimit-limit-{name}"))
                if limit and not self._fixed[name]:
                    bucket = self._buckets.get(name)
                    if bucket is None:
                        self._buckets[name] = bucket = _Bucket(limit)
                        bucket.stamp = now
                    bucket.limit = limit
                remaining = _number(headers.get(f"x-ratelimit-remaining-{name}"))
                bucket = self._buckets.get(name)
                if bucket is not None and remaining is not None:
                    bucket.refill(now, self._factor)
                    estimate = remaining
                    if ticket is not None:  # the header is as old as the request: add the refill, less what we sent since
                        estimate += (now - ticket.sent_at) * bucket.limit / 60.0
                        estimate -= self._sent[index] - ticket.sent[index]
                    bucket.level = min(bucket.level, estimate)
            self._learned = True
            self._probe_out = False

    def release(self, ticket: Ticket | None) -> None:
        """The request ended without an answer that taught us anything: let the next probe go."""
        if ticket is not None and ticket.probe:
            with self._lock:
                self._probe_out = False

    def on_rate_limited(self, retry_after: float | None, headers: Mapping[str, str] | None = None) -> None:
        if retry_after is None and headers is not None:
            resets = [_duration(headers.get(f"x-ratelimit-reset-{name}")) for name in KINDS]
            retry_after = max((r for r in resets if r is not None), default=None)
        with self._lock:
            self.rate_limited += 1
            self._factor = max(0.05, self._factor * 0.5)
            self._paused_until = max(self._paused_until, time.monotonic() + (retry_after or 1.0))
            for bucket in self._buckets.values():  # the server says nothing is left
                bucket.level = min(bucket.level, 0.0)

    def on_success(self) -> None:
        with self._lock:
            self._factor = min(1.0, self._factor + 0.05)


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_SCALE = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(value: str | None) -> float | None:
    """OpenAI's reset format: "0s", "120ms", "1.5s", "6m0s", "1h2m3s"."""
    if not value:
        return None
    parts = _PART.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value.strip():
        return _number(value)
    return sum(float(n) * _SCALE[u] for n, u in parts)

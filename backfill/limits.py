"""Quota pacing: requests/min and tokens/min buckets.

Limits come from `--max-rpm/--max-tpm` or are learned from the `x-ratelimit-limit-*` headers;
the `x-ratelimit-remaining-*` headers pull our buckets down to what the server says is left.
On 429 every request waits out `retry-after` and the rate is cut in half (multiplicative
decrease); each success gives back 5 % (additive increase), up to the full quota.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Mapping


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
        self.rate_limited = 0

    @property
    def limits(self) -> dict[str, float]:
        return {k: b.limit for k, b in self._buckets.items()}

    def acquire(self, tokens: int = 0) -> None:
        """Block until one request carrying `tokens` tokens fits both buckets, then take it."""
        want = {"requests": 1.0, "tokens": float(tokens)}
        while True:
            with self._lock:
                now = time.monotonic()
                wait = max(0.0, self._paused_until - now)
                if wait == 0.0:
                    for name, bucket in self._buckets.items():
                        bucket.refill(now, self._factor)
                        wait = max(wait, bucket.wait_for(want[name], self._factor))
                if wait == 0.0:
                    for name, bucket in self._buckets.items():
                        bucket.level -= want[name]
                    return
            self._sleep(min(wait, 1.0))

    def observe(self, headers: Mapping[str, str]) -> None:
        with self._lock:
            now = time.monotonic()
            for name in ("requests", "tokens"):
                limit = _number(headers.get(f"x-ratelimit-limit-{name}"))
                if limit and not self._fixed[name]:
                    bucket = self._buckets.get(name)
                    if bucket is None:
                        self._buckets[name] = bucket = _Bucket(limit)
                    bucket.limit = limit
                remaining = _number(headers.get(f"x-ratelimit-remaining-{name}"))
                bucket = self._buckets.get(name)
                if bucket is not None and remaining is not None:
                    bucket.refill(now, self._factor)
                    bucket.level = min(bucket.level, remaining)

    def on_rate_limited(self, retry_after: float | None) -> None:
        with self._lock:
            self.rate_limited += 1
            self._factor = max(0.05, self._factor * 0.5)
            self._paused_until = max(self._paused_until, time.monotonic() + (retry_after or 1.0))

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

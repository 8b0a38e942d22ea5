"""Quota pacing: requests/min and tokens/min buckets.

Limits come from `--max-rpm/--max-tpm` or are learned from the `x-ratelimit-limit-*` headers.
Until the first answer has told us the limits, only one request is in flight (a probe), so a
run that starts against a half-spent quota does not fire a volley of 429s. Every answer's
`x-ratelimit-remaining-*` pulls our bucket down to what the server says is left, corrected for
what refilled and what we sent since that request left (the header is that old). On 429 every
request waits out `retry-after` (else `x-ratelimit-reset-*`) and the refill rate is cut in half
(multiplicative decrease); each success gives back 5 % (additive increase), up to the full quota.

A bucket may hold less than a minute's worth (a burst): its size is learned from the headers
(what is left plus what the reset time refills) or from a 429 "Request too large ... Limit N", and
`largest_request()` tells the provider the most tokens one request can carry, so a bigger request
is split instead of waiting for a level the bucket never reaches. A wait longer than WAIT_TOLD_S
is said once, on the terminal and in the JSON log (`quota_wait`).

`InFlight` fits requests to the server: an AIMD limit on requests in flight (the runner's pool may
hold more threads) and on tokens per request, cut when answers come slowly or a request times out.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from backfill import report

KINDS = ("requests", "tokens")
WAIT_TOLD_S = 10.0  # a wait longer than this is said (once per wait)
BURST_SHARE = 0.5  # a learned bucket size counts only when clearly below the per-minute limit
_TOO_LARGE = re.compile(r"request too large.*?limit\s+(\d+)", re.IGNORECASE | re.DOTALL)


class _Bucket:
    def __init__(self, per_minute: float) -> None:
        self.limit = float(per_minute)  # refill: this much per minute
        self.capacity = float(per_minute)  # the most it holds (a burst; a minute's worth unless learned)
        self.level = float(per_minute)
        self.stamp = time.monotonic()
        self.held = False  # the size was learned (a burst), not taken from the limit

    def refill(self, now: float, factor: float) -> None:
        rate = self.limit * factor / 60.0
        self.level = min(self.capacity, self.level + (now - self.stamp) * rate)
        self.stamp = now

    def wait_for(self, amount: float, factor: float) -> float:
        need = min(amount, self.capacity) - self.level
        return 0.0 if need <= 0 else need / (self.limit * factor / 60.0)

    def hold(self, capacity: float) -> None:
        self.capacity = min(self.limit, max(1.0, capacity))
        self.level = min(self.level, self.capacity)
        self.held = True

    def relimit(self, per_minute: float) -> None:
        if not self.held:
            self.capacity = per_minute
        self.limit = per_minute
        self.capacity = min(self.capacity, per_minute)


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
        self._burst_seen = 0.0  # the largest bucket size the headers implied
        self._told: tuple[str, float] | None = None  # (what, until): the wait last said

    def largest_request(self) -> int | None:
        """The most tokens one request can carry: the token bucket's size (None: not known yet)."""
        with self._lock:
            bucket = self._buckets.get("tokens")
            return None if bucket is None else int(bucket.capacity)

    def too_large(self, message: str) -> int | None:
        """A 429 saying "Request too large ... Limit N": no wait helps; N is the bucket's size. Returns N."""
        found = _TOO_LARGE.search(message or "")
        if not found:
            return None
        size = float(found.group(1))
        with self._lock:
            bucket = self._buckets.get("tokens")
            if bucket is None:
                self._buckets["tokens"] = bucket = _Bucket(size)
            bucket.hold(size)
            self._probe_out = False
        return int(size)

    @property
    def limits(self) -> dict[str, float]:
        return {k: b.limit for k, b in self._buckets.items()}

    @property
    def factor(self) -> float:
        return self._factor

    def acquire(self, tokens: int = 0) -> Ticket:
        """Block until one request carrying `tokens` tokens fits both buckets, then take it."""
        want = {"requests": 1.0, "tokens": float(tokens)}
        started = time.monotonic()
        while True:
            told = None
            with self._lock:
                now = time.monotonic()
                why = "retry_after"
                wait = max(0.0, self._paused_until - now)
                if wait == 0.0 and not self._learned and self._probe_out:
                    wait, why = 0.01, "first_answer"  # the probe is out: wait for its answer to tell us the limits
                if wait == 0.0:
                    for name, bucket in self._buckets.items():
                        bucket.refill(now, self._factor)
                        need = bucket.wait_for(want[name], self._factor)
                        if need > wait:
                            wait, why = need, name
                if wait == 0.0:
                    for name, bucket in self._buckets.items():
                        bucket.level -= want[name]
                    self._sent[0] += 1
                    self._sent[1] += tokens
                    probe = not self._learned
                    self._probe_out = self._probe_out or probe
                    return Ticket(now, (self._sent[0], self._sent[1]), probe)
                if now - started + wait > WAIT_TOLD_S:
                    told = self._tell(why, now, wait, now - started, want)
            if told is not None:
                report.say(told[0])
                report.event("quota_wait", message=told[0], **told[1])
            self._sleep(min(wait, 1.0))

    def _tell(self, why: str, now: float, wait: float, waited: float,
              want: dict[str, float]) -> tuple[str, dict[str, object]] | None:
        """What a wait over WAIT_TOLD_S waits for, once per wait (not per second, not per thread): the line
        and the event's fields, or None when this wait was said already."""
        if why == "first_answer":
            if waited < WAIT_TOLD_S:
                return None
            wait = 1.0  # open-ended: as long as the answer takes
        until = now + wait
        told = self._told
        self._told = (why, max(until, told[1]) if told and told[0] == why else until)
        if told is not None and told[0] == why and now <= told[1] + 1.0:
            return None  # this wait, or one right after it, was said already
        fields: dict[str, object] = {"waiting_for": why}
        if why == "first_answer":
            text = (f"waiting for the API's first answer ({waited:.0f} s so far): it tells the quota, "
                    "so one request goes until then")
        elif why == "retry_after":
            fields["wait_s"] = round(wait, 1)
            text = f"waiting {wait:.0f} s: the API answered 429 (rate limited) and asked to wait"
        else:
            bucket = self._buckets[why]
            need = min(want[why], bucket.capacity)
            fields.update(wait_s=round(wait, 1), need=int(need), left=max(0, int(bucket.level)),
                          per_minute=int(bucket.limit), bucket=int(bucket.capacity), rate_factor=round(self._factor, 2))
            slowed = f", paced at {self._factor:.0%} after 429s" if self._factor < 1.0 else ""
            text = (f"waiting {wait:.0f} s for the {why}-per-minute quota: the next request needs {need:,.0f} {why}, "
                    f"{max(0.0, bucket.level):,.0f} left ({bucket.limit:,.0f}/min, bucket of {bucket.capacity:,.0f}"
                    f"{slowed})")
        return text, fields

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
                    bucket.relimit(limit)
                remaining = _number(headers.get(f"x-ratelimit-remaining-{name}"))
                bucket = self._buckets.get(name)
                reset = _duration(headers.get(f"x-ratelimit-reset-{name}"))
                if name == "tokens" and bucket is not None and remaining is not None and reset is not None:
                    server_limit = limit or bucket.limit  # the server's rate, whatever --max-tpm says
                    self._learn_burst(bucket, remaining + reset * server_limit / 60.0, server_limit)
                if bucket is not None and remaining is not None:
                    bucket.refill(now, self._factor)
                    estimate = remaining
                    if ticket is not None:  # the header is as old as the request: add the refill, less sent since
                        estimate += (now - ticket.sent_at) * bucket.limit / 60.0
                        estimate -= self._sent[index] - ticket.sent[index]
                    bucket.level = min(bucket.level, estimate)
            self._learned = True
            self._probe_out = False

    def _learn_burst(self, bucket: _Bucket, size: float, per_minute: float) -> None:
        """What is left plus what the reset time refills is the bucket's size; the largest seen counts, and
        only when clearly below the per-minute limit (a minute's worth, as OpenAI's buckets hold)."""
        self._burst_seen = max(self._burst_seen, size)
        if self._burst_seen < BURST_SHARE * per_minute and self._burst_seen < bucket.capacity:
            bucket.hold(self._burst_seen)

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


SLOW_SHARE = 0.5  # an answer slower than this share of --timeout cuts the limits
TARGET_SHARE = 0.25  # ... to what should answer in this share of it
FAST_SHARE = 0.125  # an answer faster than this share lets them grow back
CEILING = 64  # requests in flight at most (the runner's pool holds fewer threads)


class InFlight:
    """Requests fitted to the server, AIMD on its latency: how many are in flight (the runner's pool may
    hold more threads, which then wait here) and how many tokens one carries. A slow answer cuts the count
    in proportion (a server that takes requests one at a time answers in proportion to the queue), or, one
    request at a time already, the size; a timeout halves the count; fast answers let both grow back. A cut
    counts once per round: a request sent under a larger limit than the present one does not cut again."""

    def __init__(self, timeout: float, ceiling: int = CEILING) -> None:
        self.timeout = float(timeout)
        self.ceiling = ceiling
        self.limit = float(ceiling)
        self.largest: int | None = None  # tokens per request, once the server has shown it needs a cap
        self.in_flight = 0
        self._cond = threading.Condition()

    def enter(self) -> tuple[int, float, int | None]:
        """Wait for a place; returns (requests in flight with this one, the limit and the size it went under)."""
        with self._cond:
            while self.in_flight >= max(1, int(self.limit)):
                self._cond.wait(1.0)
            self.in_flight += 1
            return self.in_flight, self.limit, self.largest

    def leave(self) -> None:
        with self._cond:
            self.in_flight -= 1
            self._cond.notify_all()

    def answered(self, sent: tuple[int, float, int | None], tokens: int, latency: float) -> None:
        told = None
        flying, limit, largest = sent
        with self._cond:
            if latency > SLOW_SHARE * self.timeout:
                scale = TARGET_SHARE * self.timeout / latency
                if flying > 1 and self.limit >= limit > 1:
                    self.limit = max(1.0, min(self.limit, float(flying)) * scale)
                    told = self._said(f"the server answers slowly ({latency:.0f} s for {tokens:,} tokens, "
                                      f"--timeout {self.timeout:g} s)", latency)
                elif flying == 1 and tokens > 1 and (self.largest is None or largest is not None
                                                     and self.largest >= largest):
                    self.largest = max(1, min(self.largest or tokens, int(tokens * scale)))
                    told = self._said(f"the server answers slowly ({latency:.0f} s for {tokens:,} tokens, "
                                      f"--timeout {self.timeout:g} s)", latency)
            elif latency < FAST_SHARE * self.timeout:
                self.limit = min(float(self.ceiling), self.limit + 1.0 / self.limit)
                if self.largest is not None and tokens * 2 >= self.largest:
                    self.largest = int(self.largest * 1.25) + 1
                    if self.largest > 1_000_000:
                        self.largest = None
            self._cond.notify_all()
        self._tell(told)

    def timed_out(self, sent: tuple[int, float, int | None], tokens: int, inputs: int) -> None:
        flying, limit, _largest = sent
        with self._cond:
            if self.limit >= limit:  # the timed-out request itself is sent again in halves (the provider)
                self.limit = max(1.0, min(self.limit, float(flying)) / 2)
            told = self._said(f"a request of {inputs} inputs ({tokens:,} tokens) timed out after "
                              f"{self.timeout:g} s: sent again in halves", None)
        self._tell(told)

    def _said(self, why: str, latency: float | None) -> tuple[str, dict[str, object]]:
        size = f", at most {self.largest:,} tokens each" if self.largest is not None else ""
        text = f"{why}; now {int(self.limit)} request(s) at a time{size}"
        return text, {"in_flight_limit": int(self.limit), "largest_request": self.largest,
                      "latency_s": None if latency is None else round(latency, 2), "timeout_s": self.timeout}

    @staticmethod
    def _tell(told: tuple[str, dict[str, object]] | None) -> None:
        if told is not None:
            report.say(told[0])
            report.event("server_fit", message=told[0], **told[1])

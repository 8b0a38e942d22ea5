"""Stopping a run: a flag set by a signal, `--limit`, `--max-runtime` or `cancel`, which the loop
checks between pages, so the page in flight always commits before the run stops."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

from sqlalchemy.engine import Engine

from backfill import db, jobs

LIMIT_REACHED = "limit reached"


class StopFlag:
    """Set by a signal, `--limit`, `--max-runtime` or `cancel`; checked between pages."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.signalled = False

    def set(self, reason: str, *, signalled: bool = False) -> None:
        if self.reason is None:
            self.reason = reason
            self.signalled = signalled

    @property
    def halts_new_pages(self) -> bool:
        """A page read ahead but not yet sent is dropped: stopped by a signal, the runtime or a cancel.
        Reaching `--limit` is set when the last page within it has been read; those pages still go."""
        return self.reason is not None and self.reason != LIMIT_REACHED


def check(stop: StopFlag, engine: Engine, job_id: int, *, started: float, max_runtime_s: float | None) -> None:
    """Between pages (or polls): stop at `--max-runtime`, or when `backfill cancel` marked the job."""
    if max_runtime_s is not None and time.monotonic() - started >= max_runtime_s:
        stop.set("max runtime reached")
    if db.retrying(engine, lambda conn: jobs.is_cancelled(conn, job_id), write=False):
        stop.set("cancelled")


class signals_stop:
    """SIGINT/SIGTERM finish the in-flight page, commit it and stop; a second SIGINT aborts."""

    def __init__(self, flag: StopFlag) -> None:
        self.flag = flag
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.flag.signalled and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.flag.set(f"interrupted by {signal.Signals(signum).name}", signalled=True)

    def __enter__(self) -> signals_stop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

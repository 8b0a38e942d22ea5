"""Stopping a run: a flag set by a signal, `--limit`, `--max-runtime` or `cancel`. The loop checks it
between pages and its requests between chunks (runner.py): once set, nothing new is sent, what is
in flight commits, and the run stops. A second signal aborts at once (the committed work stays)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Engine

from backfill import db, jobs

LIMIT_REACHED = "limit reached"


class StopFlag:
    """Set by a signal, `--limit`, `--max-runtime` or `cancel`; checked between pages."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.signalled = False
        self.aborted = False  # a second signal: abandon the work in flight

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
    check_runtime(stop, started=started, max_runtime_s=max_runtime_s)
    if db.retrying(engine, lambda conn: jobs.is_cancelled(conn, job_id), write=False):
        stop.set("cancelled")


ABORTED = threading.Event()  # a second signal: the process exits as soon as the summary is out (cli.main)


def check_runtime(stop: StopFlag, *, started: float, max_runtime_s: float | None) -> None:
    """`--max-runtime` alone (no database read): cheap enough to ask between a request's chunks."""
    if max_runtime_s is not None and time.monotonic() - started >= max_runtime_s:
        stop.set("max runtime reached")


class signals_stop:
    """SIGINT/SIGTERM: stop starting work, commit what is in flight and stop; a second signal aborts.

    The first signal only sets the flag; `notice` (what will happen, for the user) is called on a thread
    of its own, since a signal handler must not print while the main thread may hold an output lock."""

    def __init__(self, flag: StopFlag, notice: Callable[[], None] | None = None) -> None:
        self.flag = flag
        self.notice = notice
        self._old: dict[int, Any] = {}
        self._wake = threading.Event()
        self._done = False

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.flag.signalled:
            self.flag.aborted = True
            ABORTED.set()
            raise KeyboardInterrupt
        self.flag.set(f"interrupted by {signal.Signals(signum).name}", signalled=True)
        self.flag.signalled = True  # also when `--limit` had already stopped the reading: a second signal aborts
        self._wake.set()

    def _notify(self) -> None:
        self._wake.wait()
        if not self._done and self.notice is not None:
            self.notice()

    def __enter__(self) -> signals_stop:
        if threading.current_thread() is threading.main_thread():
            threading.Thread(target=self._notify, name="stop-notice", daemon=True).start()
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        if not self._wake.is_set():
            self._done = True
            self._wake.set()

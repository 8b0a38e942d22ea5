"""Waiting for a libSQL file's lock in Python, where the other threads can run meanwhile.

The libSQL driver (`libsql_experimental`) keeps the GIL while SQLite's busy handler waits for another
process's lock (measured: a thread counting in Python got 0.7 % of its usual share during a 2 s wait; with
stdlib sqlite3, all of it). With a busy timeout set, one of our threads waiting for the server's write lock
froze the others, among them the one whose read held the SHARED lock the server's commit was waiting for:
nobody moved until our 30 s timeout ran out, and the server's writes failed their own 5 s timeouts meanwhile
(reproduced beside `up -b 20` under load; py-spy showed the writer thread in BEGIN IMMEDIATE and the page
reader in a SELECT, /proc/locks the server holding PENDING, our process SHARED).

So the driver's busy timeout is 0, and the statement that found the database locked is retried here, with
sleeps that release the GIL, for as long as the busy timeout would have waited. Only where SQLite's own busy
handler would wait: a statement that starts a transaction (or runs outside one) and COMMIT. A statement
inside a transaction that holds a lock fails at once, as SQLite does (waiting there can deadlock); the
caller's transaction is then retried whole (db.retrying).
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

WAIT_S = 30.0  # as long as the busy timeout the driver had before
_FIRST_SLEEP_S = 0.002
_MAX_SLEEP_S = 0.05
# a locked file, as the SQLite family words it; db._TRANSIENT starts with the same alternatives
LOCKED = r"database is locked|database table is locked|database is busy|sqlite_busy"
_LOCKED = re.compile(f"(?i){LOCKED}")

T = TypeVar("T")


def _wait(call: Callable[[], T], *, outside: bool, before_retry: Callable[[], Any] | None = None) -> T:
    """Run `call`; while it finds the database locked and may wait (`outside`: the statement began no
    transaction of the caller's, or it is COMMIT), sleep, run `before_retry` and run `call` again."""
    give_up = time.monotonic() + WAIT_S
    sleep = _FIRST_SLEEP_S
    while True:
        try:
            return call()
        except ValueError as exc:  # the driver's errors are plain ValueErrors
            if not (outside and _LOCKED.search(str(exc))) or time.monotonic() >= give_up:
                raise
        time.sleep(sleep)
        sleep = min(sleep * 2, _MAX_SLEEP_S)
        if before_retry is not None:
            before_retry()


class Cursor:
    """The driver runs a query at its first fetch, so a fetch can find the database locked too: before any
    row came, the statement is run again and the fetch retried."""

    def __init__(self, conn: Any, raw: Any) -> None:
        self._conn = conn
        self._raw = raw
        self._call: Callable[[], Any] = lambda: None
        self._outside = False
        self._rows = False  # a row came from this execution: from here on a failure is final

    def _clear(self) -> None:
        """A statement run outside a transaction that failed may have left the one the driver began for it."""
        if self._outside and self._conn.in_transaction:
            self._conn.rollback()

    def _run(self, call: Callable[[], Any]) -> Cursor:
        self._outside, self._rows, self._call = not self._conn.in_transaction, False, call
        _wait(call, outside=self._outside, before_retry=self._clear)
        return self

    def _again(self) -> None:
        self._clear()
        _wait(self._call, outside=self._outside, before_retry=self._clear)

    # The retried calls are bound to the driver's cursor, not to this object: a closure over `self` would make a
    # reference cycle, and the driver's cursor (with its statement, and on a file the SHARED lock of a statement
    # not read to its end) would live until the cycle collector ran instead of until the last reference went.
    # That held our own next commit off for 60 s (`up --vector-column`, 2 runs in 6).
    def execute(self, sql: str, parameters: Any = ()) -> Cursor:
        return self._run(functools.partial(self._raw.execute, sql, parameters))

    def executemany(self, sql: str, seq: Any) -> Cursor:
        return self._run(functools.partial(self._raw.executemany, sql, seq))

    def _fetch(self, call: Callable[[], T]) -> T:
        got = _wait(call, outside=self._outside and not self._rows, before_retry=self._again)
        self._rows = self._rows or bool(got)
        return got

    def fetchone(self) -> Any:
        return self._fetch(self._raw.fetchone)

    def fetchmany(self, *args: Any) -> Any:
        return self._fetch(functools.partial(self._raw.fetchmany, *args))

    def fetchall(self) -> Any:
        return self._fetch(self._raw.fetchall)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class Connection:
    """A libSQL file connection whose lock waits happen in Python (module doc)."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        raw.execute("PRAGMA busy_timeout = 0")

    def cursor(self) -> Cursor:
        return Cursor(self._raw, self._raw.cursor())

    def execute(self, sql: str, parameters: Any = ()) -> Any:
        return self.cursor().execute(sql, parameters)

    def commit(self) -> None:
        _wait(self._raw.commit, outside=True)

    def create_function(self, *_args: Any, **_kwargs: Any) -> None:
        """libSQL has none; the dialect skips the call for the driver's own class, so this stands in for it."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._raw, name, value)

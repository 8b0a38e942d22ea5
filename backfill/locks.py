"""Cross-process locks that keep concurrent `backfill up`s from racing each other.

`schema_lock` serialises `migrate`: PostgreSQL takes a session advisory lock; a database file takes
an advisory `flock` on its folder (never on the file itself: closing another descriptor of the file
would drop SQLite's own POSIX locks). A remote libSQL database has no shared lock to take; its
migrations are single statements that the server serialises.

`jobs_lock` (in a transaction) makes "find the open job, else create it" atomic, so four workers
started at once share one job instead of creating four.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from backfill.db import RETRY_CAP_S, Database, is_transient

_PG_KEY = 0x6261_636B  # "back": one advisory key for backfill's schema
_PG_JOBS_KEY = _PG_KEY + 1
LOCK_WAIT_S = 120.0


@contextmanager
def schema_lock(target: Database, engine: Engine) -> Iterator[None]:
    if target.kind == "postgresql":
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": _PG_KEY})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_KEY})
                conn.commit()
        return
    if target.path is None:
        yield
        return
    fd = os.open(target.path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when the descriptor closes, or the process dies
        yield
    finally:
        os.close(fd)


def jobs_lock(conn: Connection, wait_s: float = LOCK_WAIT_S) -> None:
    """Take the write lock for this transaction before reading the jobs table."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_JOBS_KEY})
        return
    # SQLite/libSQL: a write statement (matching no row) takes the database's write lock now
    deadline = time.monotonic() + wait_s
    delay = 0.05
    while True:
        try:
            conn.execute(sa.text("UPDATE backfill_jobs SET id = id WHERE id < 0"))
            return
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(RETRY_CAP_S, delay * 2)
